"""The token store: built once and reused, rebuilt when anything that changes its tokens changes, never left
half-built by a crash, built by one process while others wait (and taken over from a builder that died), and the
sources and mixtures it is made from."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.helpers import QUICKSTART, ROOT, TEST_DATA, read_only, run_cli, tiny
from trainer.data.batches import DataPosition, TrainData, open_stores
from trainer.data.store import MANIFEST, token_dtype
from trainer.errors import DataError
from trainer.recipe.schema import DataConfig
from trainer.model.tokenizer import CHATML, byte_tokenizer


def stores(tmp: Path, tok: Any = None, **data: Any) -> list[Any]:
    return open_stores(DataConfig(cache_dir=str(tmp / "cache"), **data), tok or byte_tokenizer())


def write_rows(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def many_docs(path: Path, n: int) -> str:
    return write_rows(path, [{"text": f"document {i} " + "lorem ipsum " * (i % 7 + 1)} for i in range(n)])


def test_a_store_is_reused_and_rebuilt_when_its_tokens_would_change(tmp_path: Path) -> None:
    src = many_docs(tmp_path / "d.jsonl", 40)
    (first,) = stores(tmp_path, source=src)
    assert first.built and first.store.manifest["documents"] == 40
    (again,) = stores(tmp_path, source=src)
    assert not again.built and again.store.path == first.store.path
    assert not stores(tmp_path, source=src, seq_len=64)[0].built  # plain text: packed when read, not stored so
    time.sleep(0.01)
    Path(src).write_text(Path(src).read_text() + json.dumps({"text": "one more"}) + "\n", encoding="utf-8")
    (edited,) = stores(tmp_path, source=src)
    assert edited.built and edited.store.path != first.store.path and edited.store.manifest["documents"] == 41
    other = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend_tokenizer, eos_token="</s>",
                                    pad_token="<pad>")
    other.add_tokens(["lorem"])
    assert stores(tmp_path, other, source=src)[0].built  # another tokenizer
    chats = write_rows(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a" * 50}] * 12)
    assert stores(tmp_path, source=chats, format="alpaca", seq_len=512)[0].built
    assert not stores(tmp_path, source=chats, format="alpaca", seq_len=512)[0].built
    assert stores(tmp_path, source=chats, format="alpaca", seq_len=64)[0].built  # chats are cut to seq_len
    assert stores(tmp_path, source=chats, format="alpaca", seq_len=64, too_long="truncate")[0].built  # so: how
    assert not stores(tmp_path, source=src, too_long="truncate")[0].built  # plain text is never cut when stored
    template = CHATML.replace("<|im_start|>", "<|turn|>")
    assert stores(tmp_path, source=chats, format="alpaca", seq_len=64, chat_template=template)[0].built
    assert stores(tmp_path, source=src, eval_fraction=0.1)[0].built  # the split is in the store


def test_token_ids_use_the_smallest_type_that_holds_the_vocabulary(tmp_path: Path) -> None:
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    vocab = {f"w{i}": i for i in range(70_000)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1", pad_token="w2")
    src = write_rows(tmp_path / "d.jsonl", [{"text": "w69999 w5 w12"}] * 30)
    (opened,) = stores(tmp_path, big, source=src, seq_len=8)
    assert opened.store.manifest["dtype"] == "uint32" and int(opened.store.train.tokens.max()) == 69999
    (small,) = stores(tmp_path, source=src, seq_len=8)
    assert small.store.manifest["dtype"] == "uint16"
    assert small.store.bytes_on_disk < 2.2 * sum(small.store.manifest["tokens"].values()) + 4096  # ~2 bytes/token


def prepare(cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", "prepare", str(QUICKSTART), *args, f"data.cache_dir={cache}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def valid_stores(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if (p / MANIFEST).is_file()] if cache.is_dir() else []


@pytest.mark.slow
def test_a_crash_mid_build_leaves_no_store_that_looks_valid(tmp_path: Path) -> None:
    src = many_docs(tmp_path / "d.jsonl", 1500)  # 3 chunks of rows
    cache = tmp_path / "cache"
    crashed = prepare(cache, f"data.source={src}", env={"TRAINER_FAULT": "crash_in_prepare@2"})
    _, err = crashed.communicate(timeout=300)
    assert crashed.returncode == 13, err[-2000:]
    assert valid_stores(cache) == [] and list(cache.glob(".tmp-*"))  # a partial folder, which no one reads
    done = prepare(cache, f"data.source={src}")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert "built in" in out and "1,500 documents" in out
    assert "taking over the lock" in err and "has exited" in err  # the crashed builder's lock
    assert len(valid_stores(cache)) == 1 and not list(cache.glob(".tmp-*"))


@pytest.mark.slow
def test_two_processes_started_together_build_once(tmp_path: Path) -> None:
    src = many_docs(tmp_path / "d.jsonl", 3000)
    cache = tmp_path / "cache"
    procs = [prepare(cache, f"data.source={src}") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    hows = sorted("built in" in out for out, _ in outs)
    assert hows == [False, True], [out for out, _ in outs]  # one built, the other waited and opened it
    assert len(valid_stores(cache)) == 1


def test_a_waiting_process_takes_over_from_a_dead_builder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = many_docs(tmp_path / "d.jsonl", 20)
    cfg = DataConfig(source=src, cache_dir=str(tmp_path / "cache"))
    (opened,) = open_stores(cfg, byte_tokenizer())
    key = opened.store.path.name
    for f in opened.store.path.rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted(opened.store.path.rglob("*"), reverse=True):
        d.rmdir()
    opened.store.path.rmdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "cache" / f".{key}.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "job": "", "started": time.time()}))
    (again,) = open_stores(cfg, byte_tokenizer())
    assert again.built and "has exited" in caplog.text


def test_mixture_shares_follow_the_weights_and_the_seed(tmp_path: Path) -> None:
    a = many_docs(tmp_path / "a.jsonl", 300)
    b = write_rows(tmp_path / "b.jsonl", [{"text": f"BBBB {i} " * 6} for i in range(200)])
    mix = [{"source": a, "weight": 0.7}, {"source": b, "weight": 0.3}]

    def data(seed: int) -> TrainData:
        return TrainData(DataConfig(sources=mix, seq_len=32, cache_dir=str(tmp_path / "cache")), byte_tokenizer(),
                         seed=seed, rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1)

    d = data(0)
    assert d.shares[0] / sum(d.shares) == pytest.approx(0.7, abs=0.005)
    pos, from_b, tokens = DataPosition(), 0, 0
    for _ in range(d.steps_per_epoch):
        (batch,), pos = d.step_batches(pos)
        for row in batch.input_ids:
            text = bytes(t for t in row.tolist() if t < 256).decode(errors="replace")
            from_b += ("BBBB" in text) * len(row)
            tokens += len(row)
    assert from_b / tokens == pytest.approx(0.3, abs=0.02)  # the realized token share over an epoch
    first = [d.step_batches(DataPosition(0, i * 4))[0][0].input_ids for i in range(5)]
    again = [data(0).step_batches(DataPosition(0, i * 4))[0][0].input_ids for i in range(5)]
    other = [data(1).step_batches(DataPosition(0, i * 4))[0][0].input_ids for i in range(5)]
    assert all((x == y).all() for x, y in zip(first, again)) and not all((x == y).all() for x, y in zip(first, other))


def test_parquet_and_save_to_disk_sources_give_the_rows_of_jsonl(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((TEST_DATA / "alpaca_tasks.json").read_text())[:60]
    jsonl = write_rows(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))

    def tokens(source: str) -> np.ndarray:
        (opened,) = stores(tmp_path, source=source, format="alpaca", seq_len=256)
        return np.asarray(opened.store.train.tokens)

    reference = tokens(jsonl)
    assert len(reference) > 1000
    assert np.array_equal(tokens(str(tmp_path / "a.parquet")), reference)
    assert np.array_equal(tokens(str(tmp_path / "saved")), reference)


def test_an_empty_source_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="has no usable rows: 0 of 0 dropped.*the source is empty"):
        TrainData(DataConfig(source=str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "cache")),
                  byte_tokenizer(), seed=0, rank=0, world_size=1, micro_batch_size=1, grad_accum_steps=1)


@pytest.mark.slow
def test_train_logs_whether_it_built_or_opened_the_store(tmp_path: Path) -> None:

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    first = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "a", cache, steps=1)])
    second = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "b", cache, steps=1)])
    assert first.returncode == second.returncode == 0
    assert "data: built the token store" in first.stderr and "data: opened the token store" in second.stderr


# ------------------------------------------------------------------------------------------- damaged stores

def built_store(tmp_path: Path, n: int = 400) -> tuple[DataConfig, Any]:
    """A plain-text store of n documents in its own cache, and the config that opens it."""
    cfg = DataConfig(source=many_docs(tmp_path / "d.jsonl", n), seq_len=32, cache_dir=str(tmp_path / "cache"))
    (opened,) = open_stores(cfg, byte_tokenizer())
    assert opened.built
    return cfg, opened.store


def train_data(cfg: DataConfig) -> TrainData:
    return TrainData(cfg, byte_tokenizer(), seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1)


def every_sample(data: TrainData) -> None:
    for samples in data.train_sets:
        for i in range(len(samples)):
            samples.get(i)


def test_a_truncated_token_file_is_reported_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """tokens.bin cut to half trained on half the tokens, the missing samples padded, with no message: opening a
    store now checks every file's size against its manifest (O(1)) and rebuilds a damaged one."""
    cfg, store = built_store(tmp_path)
    tokens = np.array(store.train.tokens)
    path = store.path / "train" / "tokens.bin"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    data = train_data(cfg)
    assert (f"the token store {store.path} is damaged: train/tokens.bin is {size // 2:,} bytes; the manifest says "
            f"{size:,} bytes; rebuilding it") in caplog.text
    assert data.stores[0].path == store.path and np.array_equal(np.asarray(data.stores[0].train.tokens), tokens)
    assert data.stores[0].content == store.content  # the same content, built again
    assert data.num_train_samples == len(tokens) // 32


def test_flipped_bytes_stop_the_run_with_the_store_and_prepare_rebuilds_it(tmp_path: Path) -> None:
    """One byte per KiB flipped: an id outside the vocabulary is refused as it is read, naming the store and the
    command that rebuilds it (it was an IndexError from the embedding); prepare's full check (every file's SHA-256)
    finds the damage, also a flip that leaves the id inside the vocabulary, and rebuilds the store."""
    cfg, store = built_store(tmp_path)
    original = np.array(store.train.tokens)
    path = store.path / "train" / "tokens.bin"
    raw = bytearray(path.read_bytes())
    for at in range(1023, len(raw), 1024):  # the high byte of a uint16 id: 0 -> 255, far outside 259 ids
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    data = train_data(cfg)  # the sizes are right: it opens
    with pytest.raises(DataError) as e:
        every_sample(data)
    message = str(e.value)
    assert f"the token store {store.path} is damaged: train/tokens.bin holds the id" in message
    assert "outside the vocabulary of 259 ids" in message and "python -m trainer prepare RECIPE" in message
    (checked,) = open_stores(cfg, byte_tokenizer(), verify=True)  # what prepare does
    assert checked.built and np.array_equal(np.asarray(checked.store.train.tokens), original)

    raw = bytearray(path.read_bytes())
    raw[1024] ^= 0x01  # a low byte: another id inside the vocabulary, which no bound check can see
    path.write_bytes(bytes(raw))
    every_sample(train_data(cfg))
    (checked,) = open_stores(cfg, byte_tokenizer(), verify=True)
    assert checked.built and np.array_equal(np.asarray(checked.store.train.tokens), original)
    (again,) = open_stores(cfg, byte_tokenizer(), verify=True)
    assert not again.built  # a whole store passes the full check


def test_damaged_offsets_and_masks_are_refused_as_they_are_read(tmp_path: Path) -> None:
    chats = write_rows(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "a" * (i % 9 + 1)}
                                              for i in range(40)])
    cfg = DataConfig(source=chats, format="alpaca", seq_len=128, packing="none", cache_dir=str(tmp_path / "cache"))
    (opened,) = open_stores(cfg, byte_tokenizer())
    mask = opened.store.path / "train" / "mask.bin"
    raw = bytearray(mask.read_bytes())
    raw[-3] = 7
    mask.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train/mask.bin holds a value other than 0 or 1"):
        every_sample(train_data(cfg))
    offsets = opened.store.path / "train" / "offsets.bin"
    values = np.fromfile(offsets, dtype=np.uint64)
    values[5] = values[-1] + 10
    values.tofile(offsets)
    with pytest.raises(DataError, match=r"train/offsets.bin gives document 4 the tokens"):
        every_sample(train_data(cfg))


def test_a_damaged_store_that_cannot_be_written_is_refused_with_the_command(tmp_path: Path) -> None:
    cfg, store = built_store(tmp_path)
    path = store.path / "train" / "tokens.bin"
    os.truncate(path, path.stat().st_size // 2)
    with read_only(Path(cfg.cache_dir)), pytest.raises(DataError) as e:  # type: ignore[arg-type]
        train_data(cfg)
    assert f"the token store {store.path} is damaged (train/tokens.bin is" in str(e.value)
    assert "cannot be rebuilt from here" in str(e.value) and "python -m trainer prepare RECIPE" in str(e.value)
    train_data(cfg)  # writable again: rebuilt
