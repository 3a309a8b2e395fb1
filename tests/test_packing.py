"""Packing without cross-contamination (trainer/data/packing.py): `isolated` blocks give the loss and gradients of
the same examples run one by one, `document_mask` gives plain text's per-document loss, and the bin packer places
every example once, in blocks of at most seq_len, deterministically from the seed."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import LLAMA, QWEN2, QUICKSTART, TEST_DATA, read_only, run_cli, snapshot, tiny
from trainer.data.batches import Batch, DataPosition, TrainData, collate, open_stores
from trainer.data.plans import best_fit_decreasing
from trainer.model.loss import IGNORE, token_loss_sum
from trainer.recipe.schema import DataConfig
from trainer.model.tokenizer import byte_tokenizer

ALPACA = str(TEST_DATA / "alpaca_tasks.json")
EOS = 258


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


def make(tok: Any, *, seed: int = 0, rank: int = 0, world: int = 1, mb: int = 2, **data: Any) -> TrainData:
    return TrainData(DataConfig(**data), tok, seed=seed, rank=rank, world_size=world, micro_batch_size=mb,
                     grad_accum_steps=1)


def tiny_model(arch: dict[str, Any], attention: str) -> torch.nn.Module:
    tok = byte_tokenizer()
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32)
    return model.train(False)  # no dropout: the two ways must see the same function


def loss_and_grads(model: torch.nn.Module, inputs: list[dict[str, Any]], labels: list[torch.Tensor]
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """The summed token loss of several forwards and the gradient of that sum."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for kwargs, lab in zip(inputs, labels):
        loss = token_loss_sum(model(**kwargs, use_cache=False).logits, lab)
        loss.backward()
        total += loss.detach().double()
    return float(total), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------- isolated packing

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_isolated_blocks_give_the_loss_and_gradients_of_one_by_one(tok: Any, arch: dict[str, Any],
                                                                     attention: str) -> None:
    packed = make(tok, source=ALPACA, format="alpaca", seq_len=384, packing="isolated", max_documents=40)
    loose = make(tok, source=ALPACA, format="alpaca", seq_len=384, packing="none", max_documents=40)
    bins = packed.train_sets[0]
    chosen = (0, 1, len(bins) - 1)  # full bins and the emptiest one
    batch = collate([bins.get(b) for b in chosen], tok.pad_token_id)
    assert batch.position_ids is not None and bool((batch.attention_mask == 0).any())  # padding in the batch
    examples = [int(d) for b in chosen for d in bins.items[bins.bin_offsets[b]:bins.bin_offsets[b + 1]]]
    assert len(examples) >= 5
    model = tiny_model(arch, attention)

    got_loss, got_grads = loss_and_grads(model, [batch.model_inputs(torch.device("cpu"))], [batch.labels])
    one_by_one = [loose.train_sets[0].get(d) for d in examples]  # each example alone: no padding, no neighbours
    want_loss, want_grads = loss_and_grads(
        model, [{"input_ids": torch.from_numpy(ids)[None]} for ids, _, _ in one_by_one],
        [torch.from_numpy(labels)[None] for _, labels, _ in one_by_one])
    assert batch.num_loss_tokens() == sum(int((torch.from_numpy(lab)[1:] != IGNORE).sum())
                                          for _, lab, _ in one_by_one)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert_grads_close(got_grads, want_grads)

    # the control: the same block with attention and positions running across examples is a different loss
    crossed = Batch(batch.input_ids, batch.attention_mask, batch.labels)
    crossed_loss, _ = loss_and_grads(model, [crossed.model_inputs(torch.device("cpu"))], [crossed.labels])
    assert abs(crossed_loss - want_loss) > 1e-4 * want_loss  # ten times the tolerance above


def test_isolated_blocks_are_nearly_full_and_positions_restart_per_example(tok: Any) -> None:
    packed = make(tok, source=ALPACA, format="alpaca", seq_len=512, packing="isolated")
    loose = make(tok, source=ALPACA, format="alpaca", seq_len=512, packing="none")
    bins = packed.train_sets[0]
    assert bins.fill > 0.9 and len(bins) < len(loose.train_sets[0]) / 3
    ids, labels, positions = bins.get(3)
    starts = np.flatnonzero(positions == 0)
    docs = bins.items[bins.bin_offsets[3]:bins.bin_offsets[4]]
    assert len(starts) == len(docs) and len(ids) <= 512
    for start, doc in zip(starts, docs):
        doc_ids, doc_labels, _ = loose.train_sets[0].get(int(doc))
        end = start + len(doc_ids)
        assert ids[start:end].tolist() == doc_ids.tolist()
        assert positions[start:end].tolist() == list(range(len(doc_ids)))
        assert labels[start] == IGNORE and labels[start + 1:end].tolist() == doc_labels[1:].tolist()


def test_padding_after_a_short_block_is_a_piece_of_its_own_with_no_loss(tok: Any) -> None:
    long = (np.arange(6), np.arange(6), np.array([0, 1, 2, 0, 1, 2]))
    short = (np.arange(3), np.arange(3), np.array([0, 1, 2]))
    batch = collate([long, short], pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    assert batch.labels[1, 3:].tolist() == [IGNORE] * 3 and batch.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch.model_inputs(torch.device("cpu"))["attention_mask"] is None


# ----------------------------------------------------------------------------------- document masking

def test_document_mask_gives_the_per_document_loss_of_plain_text(tok: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n))) for n in rng.integers(5, 90, 60)]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    data = make(tok, source=str(src), seq_len=64, document_mask=True)
    stream, bounds = [], [0]
    for d in docs:
        stream += [*d.encode(), EOS]
        bounds.append(len(stream))
    model = tiny_model(LLAMA, "sdpa")
    for block in (0, 5, 11):
        ids, labels, positions = data.train_sets[0].get(block)
        start = block * 64
        assert ids.tolist() == stream[start:start + 64]
        cuts = sorted({0, 64, *(b - start for b in bounds if start < b < start + 64)})
        pieces = [torch.tensor(stream[start + a:start + b])[None] for a, b in zip(cuts, cuts[1:])]
        assert positions.tolist() == [i for a, b in zip(cuts, cuts[1:]) for i in range(b - a)]
        batch = collate([(ids, labels, positions)], tok.pad_token_id)
        got, got_grads = loss_and_grads(model, [batch.model_inputs(torch.device("cpu"))], [batch.labels])
        want, want_grads = loss_and_grads(model, [{"input_ids": p} for p in pieces], [p.clone() for p in pieces])
        assert got == pytest.approx(want, rel=1e-5)
        assert_grads_close(got_grads, want_grads)


def test_plain_text_packing_without_the_mask_is_unchanged(tok: Any) -> None:
    data = make(tok, source=str(TEST_DATA / "shakespeare.txt"), seq_len=64, max_documents=50)
    ids, labels, positions = data.train_sets[0].get(2)
    assert positions is None and len(ids) == 64 and (labels == ids).all()


# ---------------------------------------------------------------------------------------------- packer

def best_fit_bins_naive(lengths: list[int], capacity: int) -> int:
    """How many bins best-fit-decreasing opens, by the textbook quadratic loop (the number does not depend on
    which of several equally good bins an item goes to)."""
    rooms: list[int] = []
    for length in sorted(lengths, reverse=True):
        fits = [i for i, room in enumerate(rooms) if room >= length]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= length
        else:
            rooms.append(capacity - length)
    return len(rooms)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300).flatmap(lambda cap: st.tuples(
    st.just(cap), st.lists(st.integers(1, cap), min_size=0, max_size=200), st.integers(0, 3))))
def test_best_fit_decreasing_places_every_item_once_within_capacity(case: tuple[int, list[int], int]) -> None:
    capacity, lengths, seed = case
    offsets, items = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity, seed)
    assert sorted(items.tolist()) == list(range(len(lengths)))
    sizes = [sum(lengths[i] for i in items[a:b]) for a, b in zip(offsets, offsets[1:])]
    assert all(0 < s <= capacity for s in sizes)
    assert len(sizes) == best_fit_bins_naive(lengths, capacity)
    again = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity, seed)
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], items)


def test_every_example_appears_once_per_epoch_across_ranks(tok: Any) -> None:
    ranks = [make(tok, source=ALPACA, format="alpaca", seq_len=256, packing="isolated", mb=1, rank=r, world=2)
             for r in range(2)]
    bins = ranks[0].train_sets[0]
    seen: list[tuple[int, ...]] = []
    positions = [DataPosition()] * 2
    for _ in range(ranks[0].steps_per_epoch):
        for r, data in enumerate(ranks):
            (batch,), positions[r] = data.step_batches(positions[r])
            seen += _examples_of(batch)
    skipped = len(bins) - ranks[0].steps_per_epoch * 2  # the tail shorter than a global batch
    assert 0 <= skipped <= 1
    documents = Counter(_tokens(bins, d) for d in range(bins.part.documents))  # some rows repeat: multisets
    assert not Counter(seen) - documents  # nothing twice
    missing = documents - Counter(seen)
    bin_contents = [Counter(_tokens(bins, int(d)) for d in bins.items[bins.bin_offsets[b]:bins.bin_offsets[b + 1]])
                    for b in range(len(bins))]
    assert (not missing) if not skipped else missing in bin_contents  # all, or all but the one bin left over


def _tokens(bins: Any, document: int) -> tuple[int, ...]:
    return tuple(np.asarray(bins.part.document(document)[0][:bins.seq_len]).tolist())


def _examples_of(batch: Batch) -> list[tuple[int, ...]]:
    """The examples a one-row batch holds, as token tuples."""
    ids, positions, mask = batch.input_ids[0], batch.position_ids[0], batch.attention_mask[0].bool()
    starts = torch.nonzero((positions == 0) & mask).flatten().tolist() + [int(mask.sum())]
    return [tuple(ids[a:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_the_packing_depends_on_the_seed_only_and_resumes_exactly(tok: Any, tmp_path: Path) -> None:
    def batches(data: TrainData, steps: int, pos: DataPosition) -> tuple[list[Batch], DataPosition]:
        out = []
        for _ in range(steps):
            (batch,), pos = data.step_batches(pos)
            out.append(batch)
        return out, pos

    cfg = {"source": ALPACA, "format": "alpaca", "seq_len": 256, "packing": "isolated",
           "cache_dir": str(tmp_path / "cache")}
    straight, _ = batches(make(tok, seed=5, **cfg), 6, DataPosition())
    first, pos = batches(make(tok, seed=5, **cfg), 3, DataPosition())
    resumed, _ = batches(make(tok, seed=5, **cfg), 3, pos)  # a new process: the bins come from the stored plan
    for a, b in zip(straight, first + resumed):
        assert all(torch.equal(getattr(a, k), getattr(b, k))
                   for k in ("input_ids", "labels", "attention_mask", "position_ids"))
    store = make(tok, seed=5, **cfg).stores[0]
    assert (store.path / "train" / "bins-256-5.npz").is_file()  # written while the store was built
    other = make(tok, seed=6, **cfg).train_sets[0]
    same_seed = make(tok, seed=5, **cfg).train_sets[0]
    assert not np.array_equal(other.items, same_seed.items)  # ties among equal lengths break by the seed
    assert math.isclose(other.fill, same_seed.fill, rel_tol=0.02)


# ------------------------------------------------------------------------------- a store is never written

def test_a_run_writes_nothing_into_a_built_store(tok: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The packing plan is built with the store (for the builder's seed); a run with another seed computes its
    plan and keeps it in its own output_dir, so a store on a read-only or shared filesystem works. Before, every
    run wrote bins-<seq_len>-<seed>.npz into the store."""
    cfg = DataConfig(source=ALPACA, format="alpaca", seq_len=256, cache_dir=str(tmp_path / "cache"))
    (opened,) = open_stores(cfg, tok, seed=0)  # as prepare builds it
    store = opened.store.path
    assert opened.built and (store / "train" / "bins-256-0.npz").is_file()
    assert "train/bins-256-0.npz" in opened.store.manifest["files"]
    before = snapshot(store)
    plans = tmp_path / "run" / "packing-plans"

    def data(seed: int) -> TrainData:
        return TrainData(cfg, tok, seed=seed, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1,
                         plan_dir=plans)

    with read_only(store), caplog.at_level(logging.INFO, logger="trainer.data"):
        same_seed, other_seed = data(0), data(1)
        for d in (same_seed, other_seed):
            d.step_batches(DataPosition())
        data(1)  # the plan kept in the run's folder is used again
    assert snapshot(store) == before
    assert [p.name for p in plans.iterdir()] == [f"{store.name}-train-bins-256-1.npz"]
    assert caplog.text.count("packing plan of") == 1  # seed 1's, computed once
    fresh = TrainData(cfg, tok, seed=1, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1)
    assert np.array_equal(fresh.train_sets[0].items, other_seed.train_sets[0].items)  # in memory: the same plan


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_creates_or_modifies_nothing_in_a_prepared_store(tmp_path: Path) -> None:
    """prepare builds the store and its plan; train (also with another seed, on the store made read-only) opens
    it and writes nothing under it: same names, sizes and modification times."""
    cache = tmp_path / "cache"
    common = [f"data.cache_dir={cache}", f"data.source={ALPACA}", "data.format=alpaca", "data.seq_len=128",
              "data.max_documents=300", "data.eval_fraction=0", "train.eval_every_steps=0", "train.micro_batch_size=2"]
    prepared = run_cli(["prepare", str(QUICKSTART), f"output_dir={tmp_path / 'a'}", *common])
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    (store,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    before = snapshot(store)
    for seed, name in ((0, "a"), (3, "b")):
        with read_only(store):
            proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / name, *common, f"train.seed={seed}",
                                                             steps=2)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "data: opened the token store" in proc.stderr
        assert snapshot(store) == before
    assert not (tmp_path / "a" / "packing-plans").exists()  # the store holds seed 0's plan
    assert [p.name for p in (tmp_path / "b" / "packing-plans").iterdir()] == [f"{store.name}-train-bins-128-3.npz"]
