"""Preference training (objective.name dpo/simpo/orpo/kto): the pair and KTO data formats through the token store,
the reference (adapters disabled, or stored log-probs), and the loop's preference loss and metrics."""

from __future__ import annotations

import gc
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.helpers import QUICKSTART, ok, read_metrics, run_cli
from trainer import adapters
from trainer.data.batches import Batch, DataPosition, TrainData
from trainer.distributed import distributed_context
from trainer.errors import ConfigError
from trainer.model.loss import IGNORE
from trainer.model.tokenizer import byte_tokenizer
from trainer.recipe.resolve import resolve
from trainer.recipe.schema import DataConfig
from trainer.run.loop import run_loop, setup
from trainer.run.preference import sequence_logps

END = "<|im_end|>"
COLOURS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "navy")


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def make(tok: Any, tmp: Path, rows: list[Any], mb: int = 1, **data: Any) -> TrainData:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(source=str(write_json(tmp / "rows.json", rows)), chat_template="chatml",
                     cache_dir=str(tmp / "cache"), **{"format": "preference", "seq_len": 128, **data})
    return TrainData(cfg, tok, seed=0, rank=0, world_size=1, micro_batch_size=mb, grad_accum_steps=1)


def decoded(tok: Any, batch: Batch, row: int) -> tuple[str, str]:
    """(the whole sequence, its loss tokens) of one row of a batch."""
    length = int(batch.attention_mask[row].sum())
    ids, labels = batch.input_ids[row, :length], batch.labels[row, :length]
    return tok.decode(ids), tok.decode(labels[labels != IGNORE])


def separable_pairs(n: int = 64) -> list[dict[str, str]]:
    """Each prompt names a colour by number; the chosen reply repeats that colour, the rejected one is another."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        k = i % len(COLOURS)
        other = COLOURS[(k + 1 + rng.randrange(len(COLOURS) - 1)) % len(COLOURS)]
        rows.append({"prompt": f"Colour {k}?", "chosen": f"{COLOURS[k]} {COLOURS[k]}", "rejected": f"{other}!"})
    return rows


# ------------------------------------------------------------------------------------------------- data

@pytest.mark.parametrize("row", [
    {"prompt": "Say hi", "chosen": "hi there", "rejected": "no"},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi there"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"conversations": [{"from": "human", "value": "Say hi"}], "chosen": {"from": "gpt", "value": "hi there"},
     "rejected": {"from": "gpt", "value": "no"}},
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "no"}]},
    {"prompt": "Say hi",
     "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "no"}]},
], ids=["text", "messages", "sharegpt", "whole-conversations", "prompt-and-whole-conversations"])
def test_pair_forms_give_the_same_pair_with_loss_on_the_responses_only(tok: Any, tmp_path: Path,
                                                                       row: dict[str, Any]) -> None:
    data = make(tok, tmp_path, [row, row])
    (batch,), _ = data.step_batches(DataPosition())
    assert batch.preference is not None and batch.preference.pairs and batch.num_loss_units() == 1
    chosen, chosen_loss = decoded(tok, batch, 0)
    rejected, rejected_loss = decoded(tok, batch, 1)
    prompt = f"<|im_start|>user\nSay hi{END}\n<|im_start|>assistant\n"
    assert chosen.startswith(prompt) and rejected.startswith(prompt)
    assert (chosen_loss, rejected_loss) == (f"hi there{END}", f"no{END}")
    assert batch.preference.documents.tolist() in ([0, 1], [2, 3])  # the pair's two documents, one after the other


def test_a_long_pair_is_cut_in_its_prompt_first_and_alike_in_both(tok: Any, tmp_path: Path) -> None:
    long_prompt = "word " * 30
    rows = [{"prompt": long_prompt + "end", "chosen": "yes yes", "rejected": "no"}] * 2
    data = make(tok, tmp_path, rows, seq_len=64, too_long="truncate")
    (batch,), _ = data.step_batches(DataPosition())
    (chosen, chosen_loss), (rejected, rejected_loss) = decoded(tok, batch, 0), decoded(tok, batch, 1)
    assert (chosen_loss, rejected_loss) == (f"yes yes{END}", f"no{END}")  # the responses are whole
    assert len(tok(chosen)["input_ids"]) <= 64
    cut = chosen[:chosen.index("<|im_start|>assistant")]
    assert cut == rejected[:rejected.index("<|im_start|>assistant")]  # the same prompt tokens remain
    assert cut.endswith(f"end{END}\n") and not cut.startswith("<|im_start|>user")  # its start was cut
    assert data.summary["too_long"] == 2 and data.summary["tokens_cut"] > 0
    dropped = make(tok, tmp_path / "drop", [*rows, {"prompt": "a", "chosen": "b", "rejected": "c"}], seq_len=64)
    assert dropped.summary["too_long"] == 2 and dropped.summary["dropped"] == 2  # reported like other long rows


def test_a_pair_stays_together_in_one_split(tok: Any, tmp_path: Path) -> None:
    data = make(tok, tmp_path, separable_pairs(20), eval_fraction=0.25)
    assert data.num_train_samples == 15 and data.num_eval_samples == 5
    (batch,) = list(data.eval_batches(1))
    assert batch.preference is not None
    chosen, _ = decoded(tok, batch, 0)
    rejected, _ = decoded(tok, batch, 1)
    assert chosen.split("assistant")[0] == rejected.split("assistant")[0]


def test_kto_rows_keep_their_labels(tok: Any, tmp_path: Path) -> None:
    rows = [{"prompt": "Colour 1?", "completion": "blue", "label": True},
            {"prompt": "Colour 1?", "completion": "red", "label": False},
            {"prompt": "Colour 2?", "completion": "green", "label": "yes"}]
    data = make(tok, tmp_path, rows, format="kto", mb=2)
    assert data.summary["dropped"] == 1 and "'label'" in data.dropped[0][2]
    (batch,), _ = data.step_batches(DataPosition())
    assert batch.preference is not None and not batch.preference.pairs
    by_reply = {decoded(tok, batch, i)[1]: bool(batch.preference.desirable[i]) for i in range(2)}  # type: ignore[index]
    assert by_reply == {f"blue{END}": True, f"red{END}": False}


@pytest.mark.parametrize("overrides, key", [
    (["objective.name=dpo"], "data.format"),
    (["data.format=preference"], "objective.name"),
    (["objective.name=dpo", "data.format=preference", "data.packing=isolated"], "data.packing"),
    (["objective.name=dpo", "data.format=preference", "objective.reference=adapters_disabled"],
     "objective.reference"),
    (["objective.name=kto", "data.format=preference"], "data.format"),
])
def test_an_objective_without_its_data_is_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(QUICKSTART, overrides)
    assert f"{key} = " in str(caught.value)


@pytest.mark.parametrize("key, value", [("model.head_in_loss", "true"), ("distributed.sequence_parallel", "2")])
def test_what_splits_or_replaces_the_logits_is_refused_with_a_preference_objective(key: str, value: str) -> None:
    """Per-sequence log-probs need each sequence's whole logits on one rank."""
    with pytest.raises(ConfigError) as caught:
        resolve(QUICKSTART, ["objective.name=dpo", "data.format=preference", f"{key}={value}"], world_size=2)
    line = next(x for x in str(caught.value).splitlines() if "a preference objective" in x)
    assert f"{key} = " in line


# ------------------------------------------------------------------------------------------------- runs

def run_args(out: Path, base: Path, data: Path, *extra: str, steps: int = 30) -> list[str]:
    return [f"output_dir={out}", "model.config=null", f"model.name_or_path={base}", "model.tokenizer=null",
            f"data.source={data}", "data.format=preference", "data.chat_template=chatml", "data.seq_len=128",
            f"data.cache_dir={out.parent / 'cache'}", "data.eval_fraction=0", "train.eval_every_steps=0",
            f"train.max_steps={steps}", "train.micro_batch_size=4", "objective.name=dpo", "adapter.type=lora",
            "adapter.rank=8", "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
            "logging.every_steps=1", "logging.progress_bar=false", "logging.plot=false", "checkpoint.every_steps=0",
            *extra]


def live_models() -> int:
    """Causal LMs alive in this process (a reference copy of the base would be a second one)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module-level objects warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
                   for o in gc.get_objects())


@pytest.fixture(scope="module")
def lora_dpo(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> dict[str, Any]:
    """30 LoRA DPO steps in this process on the separable pairs, with the reference log-probs of the first batch
    taken with the adapters disabled after training."""
    tmp = tmp_path_factory.mktemp("lora-dpo")
    data = write_json(tmp / "pairs.json", separable_pairs())
    cfg = resolve(QUICKSTART, run_args(tmp / "run", llama_base, data, "data.eval_fraction=0.125",
                                       "train.eval_every_steps=15", "train.eval_batches=2"))
    with distributed_context() as dist:
        t = setup(cfg, dist)
        models = live_models()
        first = t.data.step_batches(DataPosition())[0][0]
        run_loop(t)
        t.metrics.close()
        with torch.no_grad(), adapters.adapters_disabled(t.engine.module):
            disabled, _ = sequence_logps(t.engine.forward(**first.model_inputs(dist.device)).logits, first.labels)
        return {"out": tmp / "run", "first": first, "disabled": disabled, "models": models}


@pytest.mark.slow
def test_lora_dpo_starts_at_ln2_with_zero_rewards(lora_dpo: dict[str, Any]) -> None:
    first = read_metrics(lora_dpo["out"])[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert first[name] == pytest.approx(0.0, abs=1e-6)
    assert first["logps_chosen"] < 0 and first["logps_rejected"] < 0


@pytest.mark.slow
def test_lora_dpo_margins_grow_and_accuracy_rises(lora_dpo: dict[str, Any]) -> None:
    """On the training pairs, and on held-out ones (evaluated at steps 15 and 30)."""
    evals = read_metrics(lora_dpo["out"], "eval")
    assert [r["step"] for r in evals] == [15, 30] and "perplexity" not in evals[0]
    assert evals[1]["reward_margin"] > evals[0]["reward_margin"] > 0 and evals[1]["loss"] < math.log(2)
    rows = read_metrics(lora_dpo["out"])
    early, late = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "reward_margin") > mean(early, "reward_margin") + 0.5
    assert mean(late, "reward_accuracy") >= 0.9 > mean(early, "reward_accuracy")
    assert mean(late, "loss") < 0.75 * math.log(2)


@pytest.mark.slow
def test_the_adapter_reference_is_the_base_without_a_copy(lora_dpo: dict[str, Any], llama_base: Path) -> None:
    """The adapters-disabled forward of the trained model equals a frozen copy of the base loaded apart; and the
    run held one model (the peft wrapper's base), no reference copy."""
    assert lora_dpo["models"] == 1
    frozen = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).eval()
    first = lora_dpo["first"]
    with torch.no_grad():
        want, _ = sequence_logps(frozen(input_ids=first.input_ids, attention_mask=first.attention_mask).logits,
                                 first.labels)
    assert torch.allclose(lora_dpo["disabled"], want, rtol=1e-5, atol=1e-4)


def full_args(out: Path, base: Path, data: Path, *extra: str, steps: int = 4) -> list[str]:
    """Full-training DPO (reference log-probs stored): a global batch of 4 pairs, 2 per micro-batch."""
    return run_args(out, base, data, "adapter.type=none", "optimizer.lr=3e-4", "train.micro_batch_size=2",
                    "train.global_batch_size=4", *extra, steps=steps)


@pytest.fixture(scope="module")
def full_dpo(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> dict[str, Any]:
    """4 full-training DPO steps in this process; the stored reference log-probs and how many models were alive."""
    tmp = tmp_path_factory.mktemp("full-dpo")
    data = write_json(tmp / "pairs.json", separable_pairs())
    cfg = resolve(QUICKSTART, full_args(tmp / "run", llama_base, data))
    with distributed_context() as dist:
        t = setup(cfg, dist)
        models = live_models()
        assert t.data.reference is not None
        stored = np.array(t.data.reference[0]["train"])
        documents = [t.data.train_sets[0].document(d) for d in range(t.data.stores[0].train.documents)]
        run_loop(t)
        t.metrics.close()
    return {"tmp": tmp, "data": data, "out": tmp / "run", "stored": stored, "documents": documents,
            "models": models}


@pytest.mark.slow
def test_stored_reference_log_probs_equal_the_base_on_the_fly(full_dpo: dict[str, Any], llama_base: Path) -> None:
    """Every document's stored log-prob equals a frozen copy of the base's, computed one sequence at a time; the run
    held one model (no reference model), and its first step is ln 2 with zero rewards."""
    assert full_dpo["models"] == 1
    frozen = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).eval()
    want = []
    with torch.no_grad():
        for ids, labels in full_dpo["documents"]:
            logps, _ = sequence_logps(frozen(input_ids=torch.from_numpy(ids)[None]).logits,
                                      torch.from_numpy(labels)[None])
            want.append(float(logps[0]))
    assert len(want) == 128 and np.allclose(full_dpo["stored"], want, rtol=1e-5, atol=1e-4)
    first = read_metrics(full_dpo["out"])[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["reward_margin"] == pytest.approx(0.0)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_stored_reference_is_reused_by_a_resume_on_two_ranks(full_dpo: dict[str, Any], llama_base: Path) -> None:
    """2 steps on 1 process, then resumed on 2 ranks: the stored log-probs are read, not computed again (the folder
    is untouched), and steps 3 and 4 (rewards included) equal the uninterrupted run's."""
    out = full_dpo["tmp"] / "resumed"
    ok(run_cli(["train", str(QUICKSTART), *full_args(out, llama_base, full_dpo["data"], "checkpoint.every_steps=2",
                                                    steps=2)]))
    (folder,) = (full_dpo["tmp"] / "cache").glob("*.reference/*")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    proc = ok(run_cli(["train", str(QUICKSTART), *full_args(out, llama_base, full_dpo["data"])], nproc=2,
                      timeout=600))
    assert "reference log-probs read from" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    whole, resumed = read_metrics(full_dpo["out"]), read_metrics(out)
    for step in (3, 4):
        a, b = whole[step - 1], resumed[step - 1]
        assert b["step"] == step
        for name in ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (step, name)


def kto_rows() -> list[dict[str, Any]]:
    """Each separable pair as two unpaired rows: the chosen reply desirable, the rejected one not."""
    return [{"prompt": p["prompt"], "completion": reply, "label": label} for p in separable_pairs(32)
            for reply, label in ((p["chosen"], True), (p["rejected"], False))]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kto", "simpo", "orpo"])
def test_kto_simpo_and_orpo_train_in_the_loop(objective: str, tmp_path: Path, llama_base: Path) -> None:
    """Three steps of each; KTO starts at its step-0 value (every log-ratio 0: 1 - sigmoid(0) = 0.5 per completion)
    with zero rewards; SimPO and ORPO (no reference) log their rewards, margins and log-probs."""
    rows, fmt = (kto_rows(), "kto") if objective == "kto" else (separable_pairs(), "preference")
    data = write_json(tmp_path / "rows.json", rows)
    cfg = resolve(QUICKSTART, run_args(tmp_path / "run", llama_base, data, f"objective.name={objective}",
                                       f"data.format={fmt}", steps=3))
    with distributed_context() as dist:
        t = setup(cfg, dist)
        run_loop(t)
        t.metrics.close()
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["logps_chosen"]) for r in metrics)
    if objective == "kto":
        assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6)
        assert metrics[0]["rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(metrics[0])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_reference_log_probs_computed_on_two_ranks_equal_one_process(tmp_path: Path, llama_base: Path) -> None:
    """The reference pass shares its micro-batches between the ranks (31 of them here: the second rank repeats the
    last one and drops it) and adds the results up: the stored log-probs equal those of one process."""
    data = write_json(tmp_path / "pairs.json", separable_pairs(62))
    stored = {}
    for nproc in (1, 2):
        out = tmp_path / f"on{nproc}" / "run"
        ok(run_cli(["train", str(QUICKSTART), *full_args(out, llama_base, data, steps=1)], nproc=nproc, timeout=300))
        (folder,) = (out.parent / "cache").glob("*.reference/*")
        stored[nproc] = np.fromfile(folder / "train.bin", dtype=np.float64)
    assert len(stored[1]) == 124 and (stored[1] < 0).all()
    assert np.allclose(stored[2], stored[1], rtol=1e-6, atol=1e-5)
