"""The data pipeline: exact packing, assistant-only labels, bad rows reported, an order that is a pure
function of (seed, epoch) and does not depend on how a global batch is split over ranks and micro-steps."""

from __future__ import annotations

import json
import logging
import os
import re
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.helpers import QUICKSTART, TEST_DATA
from trainer.__main__ import main
from trainer.data.batches import Batch, DataPosition, TrainData, collate
from trainer.data.order import Permutation, seed_int
from trainer.data.sources import read_stdlib
from trainer.errors import DataError
from trainer.recipe.schema import DataConfig
from trainer.model.tokenizer import byte_tokenizer

DATA = TEST_DATA
EOS = 258
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def make(tok: Any, *, seed: int = 0, rank: int = 0, world: int = 1, mb: int = 2, accum: int = 1,
         **data: Any) -> TrainData:
    return TrainData(DataConfig(**data), tok, seed=seed, rank=rank, world_size=world, micro_batch_size=mb,
                     grad_accum_steps=accum)


@dataclass
class View:
    """The train samples of a one-source TrainData in sample-index order: ids and labels, stacked when packed."""

    ids: Any
    labels: Any


def train(data: TrainData) -> View:
    (samples,) = data.train_sets
    pairs = [samples.get(i) for i in range(len(samples))]
    ids, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    if samples.mode == "concat":
        return View(np.stack(ids), np.stack(labels))
    return View(ids, labels)


def epoch_order(data: TrainData, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s order: the sample at each position."""
    n = data.num_train_samples
    return torch.from_numpy(Permutation(n, seed_int("order", data.seed, epoch))(np.arange(n)))


def write_json(path: Path, rows: list[Any], lines: bool = False) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows), encoding="utf-8")
    return str(path)


def texts_of(tok: Any, batch: Batch) -> list[str]:
    return [tok.decode(row) for row in batch.input_ids]


def reply_text(tok: Any, ids: torch.Tensor, labels: torch.Tensor) -> str:
    """What the loss trains on, decoded (labels are aligned with ids)."""
    return tok.decode(ids[labels != -100])


def run(data: TrainData, steps: int, pos: DataPosition | None = None) -> tuple[list[list[Batch]], DataPosition]:
    pos = pos or DataPosition()
    out = []
    for _ in range(steps):
        batches, pos = data.step_batches(pos)
        out.append(batches)
    return out, pos


def same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "attention_mask", "labels"))


def cat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, k) for b in batches]) for k in ("input_ids", "attention_mask", "labels")))


# ------------------------------------------------------------------------------------------------ text

def test_txt_packing_is_the_tokenized_stream_cut_into_blocks(tok: Any) -> None:
    data = make(tok, source=str(DATA / "shakespeare.txt"), seq_len=64, max_documents=300)
    text = (DATA / "shakespeare.txt").read_text(encoding="utf-8")
    docs = [p.strip("\n") for p in text.split("\n\n") if p.strip()][:300]
    stream = [t for doc in docs for t in [*doc.encode("utf-8"), EOS]]
    n = len(stream) // 64
    assert data.num_train_samples == n and n > 100
    blocks = train(data).ids
    assert blocks.shape == (n, 64)
    assert blocks.flatten().tolist() == stream[:n * 64]  # the tail shorter than seq_len is dropped
    assert data.summary["documents"] == 300 and data.summary["tokens"] == len(stream)


def test_text_json_rows_get_eos_between_documents(tok: Any, tmp_path: Path) -> None:
    src = write_json(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "world!", "id": 3}, {"text": "abc"}],
                     lines=True)
    data = make(tok, source=src, seq_len=8, mb=1)
    expected = [*b"hello", EOS, *b"wor", *b"ld!", EOS, *b"abc", EOS]
    assert train(data).ids.flatten().tolist() == expected[:16]
    (batch,), _ = data.step_batches(DataPosition())
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (1, 8)
    assert torch.equal(batch.labels, batch.input_ids) and batch.attention_mask.all()
    assert batch.num_tokens() == 8 and batch.num_loss_tokens() == 7


def test_a_literal_eos_string_inside_a_document_is_text(tok: Any, tmp_path: Path) -> None:
    src = write_json(tmp_path / "d.jsonl", [{"text": "a</s>b"}, {"text": "c"}], lines=True)
    data = make(tok, source=src, seq_len=8, mb=1)
    assert train(data).ids[0].tolist() == [*b"a</s>b", EOS, ord("c")]


def test_c4_jsonl_and_a_wrong_text_field(tok: Any) -> None:
    data = make(tok, source=str(DATA / "docs.jsonl"), seq_len=128, max_documents=20)
    assert data.summary["documents"] == 20 and data.summary["dropped"] == 0
    with pytest.raises(DataError, match=r"no usable rows.*no field 'body' \(fields: id, text; set data.text_field\)"):
        make(tok, source=str(DATA / "docs.jsonl"), seq_len=128, text_field="body")


def test_directory_of_files_in_path_order(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("two\n\n  \nthree\nlines\n", encoding="utf-8")
    write_json(tmp_path / "a.jsonl", [{"text": "one"}], lines=True)
    (tmp_path / ".hidden.txt").write_text("never", encoding="utf-8")
    (tmp_path / "notes.md").write_text("never", encoding="utf-8")
    data = make(tok, source=str(tmp_path), seq_len=8, mb=1)
    stream = tok.decode(train(data).ids.flatten())
    assert data.summary["documents"] == 3
    assert stream == "one</s>two</s>three\nli"  # 20 tokens -> 2 blocks of 8, tail "nes</s>" dropped
    assert make(tok, source=str(tmp_path), seq_len=8, mb=1, max_documents=2).summary["documents"] == 2


# ------------------------------------------------------------------------------------------- SFT labels

def test_alpaca_labels_are_exactly_the_outputs(tok: Any) -> None:
    rows = json.loads((DATA / "alpaca_tasks.json").read_text(encoding="utf-8"))[:40]
    data = make(tok, source=str(DATA / "alpaca_tasks.json"), format="alpaca", seq_len=4096, packing=False,
                max_documents=40)
    assert data.summary["dropped"] == 0 and data.num_train_samples == 40
    for row, ids, labels in zip(rows, train(data).ids, train(data).labels):
        ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert tok.decode(ids) == (f"<|im_start|>user\n{prompt}{END}\n<|im_start|>assistant\n"
                                   f"{row['output']}{END}\n")
        assert reply_text(tok, ids, labels) == row["output"] + END


def test_sharegpt_tool_chats_train_on_replies_and_calls_only(tok: Any) -> None:
    rows = json.loads((DATA / "sharegpt_tools.json").read_text(encoding="utf-8"))[:25]
    data = make(tok, source=str(DATA / "sharegpt_tools.json"), format="chat", seq_len=16384,
                packing=False, max_documents=25)
    assert data.summary["dropped"] == 0
    for row, ids, labels in zip(rows, train(data).ids, train(data).labels):
        ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
        turns = row["conversations"]
        learned = "".join(t["value"] + END for t in turns if t["from"] in ("gpt", "function_call"))
        assert reply_text(tok, ids, labels) == learned
        full = tok.decode(ids)
        for t in turns:  # prompts are in the input, never in the labels
            assert t["value"] in full
        if row.get("tools") and json.loads(row["tools"]):
            assert full.startswith("<|im_start|>system\n") and "# Tools" in full
            assert "# Tools" not in reply_text(tok, ids, labels)
    assert any(t["from"] == "function_call" for r in rows for t in r["conversations"])


def test_messages_format_with_system_and_multiple_turns(tok: Any, tmp_path: Path) -> None:
    conv = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2 é"}, {"role": "user", "content": "dangling"}]
    src = write_json(tmp_path / "c.json", [{"messages": conv}] * 4)
    data = make(tok, source=src, format="chat", seq_len=512, packing=False)
    ids, labels = (torch.from_numpy(a) for a in (train(data).ids[0], train(data).labels[0]))
    assert reply_text(tok, ids, labels) == f"A1{END}A2 é{END}"
    assert "dangling" not in tok.decode(ids)  # a trailing prompt has no reply to learn from


def bpe_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A real merged BPE vocabulary (trained here in well under a second) with its own chat template."""
    specials = ["<|begin|>", "<|header|>", "<|end_header|>", "<|eot|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox answers questions about the weather and the sea."] * 50
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|eot|>")
    tok.chat_template = template
    return tok


def test_tokenizer_own_template_with_merged_tokens(tmp_path: Path) -> None:
    tok = bpe_tokenizer("{{ bos_token }}{% for m in messages %}<|header|>{{ m['role'] }}<|end_header|>\n\n"
                        "{{ m['content'] | trim }}<|eot|>{% endfor %}"
                        "{% if add_generation_prompt %}<|header|>assistant<|end_header|>\n\n{% endif %}")
    rows = [{"instruction": "What about the weather?", "input": "the sea",
             "output": "The weather at sea answers the fox."}] * 3
    data = make(tok, source=write_json(tmp_path / "a.json", rows), format="alpaca", seq_len=256, packing=False,
                mb=1)
    ids, labels = (torch.from_numpy(a) for a in (train(data).ids[0], train(data).labels[0]))
    assert len(ids) < len(tok.decode(ids).encode("utf-8")) / 2  # merges happened: far fewer tokens than bytes
    assert reply_text(tok, ids, labels) == "The weather at sea answers the fox.<|eot|>"
    assert tok.decode(ids).startswith("<|begin|><|header|>user<|end_header|>\n\nWhat about the weather?")


def test_custom_template_string_and_chatml_override(tok: Any, tmp_path: Path) -> None:
    rows = [{"instruction": "hi", "input": "", "output": "hello"}] * 2
    src = write_json(tmp_path / "a.json", rows)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
    data = make(tok, source=src, format="alpaca", seq_len=64, packing=False, chat_template=template)
    ids, labels = (torch.from_numpy(a) for a in (train(data).ids[0], train(data).labels[0]))
    assert tok.decode(ids) == "[user]hi[/][assistant]hello[/]"
    assert reply_text(tok, ids, labels) == "hello[/]"
    own = bpe_tokenizer("{{ 'unused' }}")
    data = make(own, source=src, format="alpaca", seq_len=64, packing=False, chat_template="chatml")
    assert own.decode(train(data).ids[0]).startswith("<|im_start|>user\nhi")


def test_no_packing_pads_right_and_masks_padding(tok: Any, tmp_path: Path) -> None:
    rows = [{"instruction": "q" * (i + 1), "input": "", "output": "a" * (3 * i + 1)} for i in range(8)]
    data = make(tok, source=write_json(tmp_path / "a.json", rows), format="alpaca", seq_len=512, packing=False,
                mb=4)
    lengths = [len(x) for x in train(data).ids]
    order = epoch_order(data, 0)[:4].tolist()
    (batch,), _ = data.step_batches(DataPosition())
    assert batch.input_ids.shape == (4, max(lengths[i] for i in order))
    for row, i in enumerate(order):
        n = lengths[i]
        assert batch.input_ids[row, :n].tolist() == train(data).ids[i].tolist()
        assert batch.labels[row, :n].tolist() == train(data).labels[i].tolist()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all() and (batch.labels[row, n:] == -100).all()
        assert reply_text(tok, batch.input_ids[row], batch.labels[row]) == rows[i]["output"] + END
    assert batch.num_tokens() == sum(lengths[i] for i in order)
    assert batch.num_loss_tokens() == sum(len(rows[i]["output"]) + len(END) for i in order)


def test_concat_packing_runs_examples_into_each_other_with_their_masks(tok: Any, tmp_path: Path) -> None:
    rows = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(30)]
    src = write_json(tmp_path / "a.json", rows)
    loose = make(tok, source=src, format="alpaca", seq_len=128, packing=False)
    packed = make(tok, source=src, format="alpaca", seq_len=128, packing="concat")
    assert loose.summary["dropped"] == 0
    ids = np.concatenate(train(loose).ids)
    labels = np.concatenate(train(loose).labels)
    n = len(ids) // 128
    assert packed.num_train_samples == n
    assert train(packed).ids.flatten().tolist() == ids[:n * 128].tolist()
    assert train(packed).labels.flatten().tolist() == labels[:n * 128].tolist()
    (batch,), _ = packed.step_batches(DataPosition())
    assert batch.attention_mask.all() and (batch.labels == -100).any() and (batch.labels != -100).any()


LONG_ROWS = [{"instruction": "q", "input": "", "output": "x" * 100}] * 3 + [
    {"instruction": "q" * 100, "input": "", "output": "late"}, {"instruction": "q"},
    {"instruction": "q", "input": "", "output": "short"}]


def test_long_examples_are_dropped_by_default_with_file_and_row(tok: Any, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """data.too_long: drop (the default): an example longer than seq_len is never stored cut (it was, silently,
    with its reply's end and end-of-turn marker lost); it is dropped, counted and reported like a bad row."""
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        data = make(tok, source=write_json(tmp_path / "a.json", LONG_ROWS), format="alpaca", seq_len=80,
                    packing=False, mb=1)
    assert [tok.decode(ids) for ids in train(data).ids] == [
        f"<|im_start|>user\nq{END}\n<|im_start|>assistant\nshort{END}\n"]
    assert [(name, i, why) for name, i, why in data.dropped] == [
        ("a.json", 1, "162 tokens, longer than data.seq_len=80 (data.too_long: drop)"),
        ("a.json", 2, "162 tokens, longer than data.seq_len=80 (data.too_long: drop)"),
        ("a.json", 3, "162 tokens, longer than data.seq_len=80 (data.too_long: drop)"),
        ("a.json", 4, "165 tokens, longer than data.seq_len=80 (data.too_long: drop)"),
        ("a.json", 5, "missing or null 'output'")]  # in row order
    assert data.summary["dropped"] == 5 and data.summary["too_long"] == 4 and data.summary["tokens_cut"] == 0
    assert "dropped 5 of 6 rows" in caplog.text
    assert "a.json row 1: 162 tokens, longer than data.seq_len=80" in caplog.text


def test_long_examples_truncated_keep_their_end_of_turn_marker(tok: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """data.too_long: truncate: the first seq_len tokens less the end-of-turn marker, then the marker, which carries
    the loss when the cut falls in the reply; a row with no reply before the cut is dropped; the cut is counted."""
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        data = make(tok, source=write_json(tmp_path / "a.json", LONG_ROWS), format="alpaca", seq_len=80,
                    packing=False, too_long="truncate", mb=1)
    head = f"<|im_start|>user\nq{END}\n<|im_start|>assistant\n"
    kept = "x" * (80 - len(head) - len(END))  # byte-level: a token per character
    texts = [tok.decode(ids) for ids in train(data).ids]
    assert texts[:3] == [head + kept + END] * 3 and len(train(data).ids[0]) == 80
    assert reply_text(tok, torch.from_numpy(train(data).ids[0]), torch.from_numpy(train(data).labels[0])) == \
        kept + END
    assert texts[3] == f"{head}short{END}\n"
    assert [(i, why) for _, i, why in data.dropped] == [(4, "no reply within the first data.seq_len=80 tokens"),
                                                        (5, "missing or null 'output'")]
    assert data.summary["too_long"] == 4 and data.summary["tokens_cut"] == 3 * (162 - 80) + (165 - 80)
    assert "4 examples of" in caplog.text and "truncated to it, keeping their end-of-turn marker" in caplog.text
    assert f"{3 * 82 + 85} tokens cut" in caplog.text and "a.json row 1: 162 tokens" in caplog.text


def test_long_examples_as_an_error_name_the_row_and_the_other_choices(tok: Any, tmp_path: Path) -> None:
    src = write_json(tmp_path / "a.jsonl", LONG_ROWS[3:], lines=True)
    with pytest.raises(DataError) as e:
        make(tok, source=src, format="alpaca", seq_len=80, packing=False, too_long="error")
    assert "data.too_long = 'error': a.jsonl line 1 (counted from 1) is 165 tokens long, longer than " \
           "data.seq_len=80" in str(e.value)
    assert "drop" in str(e.value) and "truncate" in str(e.value)


def test_prepare_and_data_show_report_long_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [f"data.source={write_json(tmp_path / 'a.json', LONG_ROWS)}", "data.format=alpaca", "data.seq_len=80",
              "data.packing=false", "data.eval_fraction=0", "train.eval_every_steps=0", "train.micro_batch_size=1",
              f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
    assert main(["prepare", str(QUICKSTART), *common]) == 0
    out = capsys.readouterr().out
    assert "5 rows dropped: a.json row 1: 162 tokens, longer than data.seq_len=80 (data.too_long: drop)" in out
    assert "4 of the dropped rows are longer than data.seq_len=80 (data.too_long: drop)" in out
    assert main(["data", str(QUICKSTART), "--show", "1", *common]) == 0
    assert "6 rows, 5 dropped (4 of them longer than data.seq_len=80; data.too_long: drop);" in capsys.readouterr().out
    truncate = [*common, "data.too_long=truncate"]
    assert main(["prepare", str(QUICKSTART), *truncate]) == 0
    assert ("4 examples longer than data.seq_len=80 truncated to it (331 tokens cut): a.json row 1: 162 tokens; "
            "a.json row 2: 162 tokens") in capsys.readouterr().out
    assert main(["data", str(QUICKSTART), "--show", "1", *truncate]) == 0
    assert ("6 rows, 2 dropped, 4 truncated to data.seq_len=80 (331 tokens cut; data.too_long: truncate);"
            in capsys.readouterr().out)


def test_data_show_reports_the_fill_of_the_training_samples_only(tok: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The held-out rows are not in the training samples: `data --show` once divided every token, eval included, by
    the training positions (60.5% against train's log of 47.9% on the chat example). Reference: the samples."""
    source = str(DATA / "alpaca_tasks.json")
    overrides = [f"data.source={source}", "data.format=alpaca", "data.seq_len=128", "data.packing=false",
                 "data.eval_fraction=0.25", "train.micro_batch_size=2", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]
    assert main(["data", str(QUICKSTART), "--show", "1", *overrides]) == 0
    shown = float(re.search(r"([\d.]+)% of their positions hold tokens", capsys.readouterr().out).group(1))
    data = make(tok, source=source, format="alpaca", seq_len=128, packing=False, eval_fraction=0.25,
                cache_dir=str(tmp_path / "cache"))
    (samples,) = data.train_sets
    real = sum(len(samples.get(i)[0]) for i in range(len(samples)))
    assert data.num_eval_samples > 0.2 * len(samples)  # enough held out for the old figure to be far off
    assert shown == pytest.approx(100 * real / (len(samples) * 128), abs=0.05)
    assert shown == pytest.approx(100 * data.train_fill, abs=0.05)  # the figure `train` logs


def test_validate_finds_too_little_data_before_train_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """30 rows at eval_fraction 0.05 hold out one: validate said ok, then train stopped on the eval split, and its
    advice (set data.eval_fraction to 0) then failed on train.eval_every_steps. Now validate finds it (exit 2) from the
    rows alone, both name every fix, and the fix they name validates."""
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(30)]
    small = [f"data.source={write_json(tmp_path / 'small.json', rows)}", "data.format=alpaca", "data.seq_len=128",
             "data.eval_fraction=0.05", "train.eval_every_steps=10", "train.micro_batch_size=4",
             f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
    fixes = ("raise data.eval_fraction or use more data", "data.eval_fraction=0 together with train.eval_every_steps=0")
    assert main(["validate", str(QUICKSTART), *small]) == 2
    error = capsys.readouterr().err
    assert "data.eval_fraction = 0.05 (command line): holds out at most 1 eval samples, fewer than one micro-batch " \
           "per rank (4: micro_batch_size 4 x 1 rank)" in error and all(f in error for f in fixes), error
    assert not (tmp_path / "cache").exists()  # nothing was built to find it
    assert main(["data", str(QUICKSTART), *small, "--show", "1"]) == 1  # train's check, once the store is built
    error = capsys.readouterr().err
    assert "data.eval_fraction = 0.05 holds out 1 eval samples" in error and all(f in error for f in fixes), error
    assert main(["validate", str(QUICKSTART), *small, "data.eval_fraction=0", "train.eval_every_steps=0"]) == 0
    assert main(["validate", str(QUICKSTART), *small, "data.eval_fraction=0.2"]) == 0  # 6 held out
    capsys.readouterr()
    assert main(["validate", str(QUICKSTART), *small, "train.micro_batch_size=32", "data.eval_fraction=0",
                 "train.eval_every_steps=0"]) == 2
    assert "data.source = " in capsys.readouterr().err


def test_validate_bounds_plain_text_by_its_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Plain text is cut into seq_len blocks: 40 paragraphs of 20 bytes give at most 3 blocks of 256 tokens. A source
    it cannot count cheaply (a hub dataset name) is said to be left to train."""
    (tmp_path / "tiny.txt").write_text("\n\n".join(f"paragraph number {i:02d}" for i in range(40)), encoding="utf-8")
    common = [f"data.source={tmp_path / 'tiny.txt'}", f"output_dir={tmp_path / 'run'}", "train.eval_every_steps=0",
              "data.eval_fraction=0"]
    assert main(["validate", str(QUICKSTART), *common]) == 2
    assert "the data gives at most 3 training samples of data.seq_len=256 tokens, fewer than one global batch of 8" \
        in capsys.readouterr().err
    assert main(["validate", str(QUICKSTART), *common, "train.micro_batch_size=3"]) == 0
    hub = "data.source=someone/some-dataset"
    assert main(["validate", str(QUICKSTART), f"output_dir={tmp_path / 'run'}", hub]) == 0
    assert "# note: someone/some-dataset was not counted" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- bad rows

def test_bad_alpaca_rows_are_counted_with_row_numbers(tok: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    good = {"instruction": "i", "input": "", "output": "o"}
    rows = [good, {"instruction": "i"}, {"instruction": "i", "output": 5}, good, {"instruction": "i", "output": " "},
            {"output": "o"}, {"instruction": "i", "input": ["x"], "output": "o"}, good, good]
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        data = make(tok, source=write_json(tmp_path / "a.json", rows), format="alpaca", seq_len=64,
                    packing=False, mb=1)
    assert [(name, i) for name, i, _ in data.dropped] == [("a.json", n) for n in (2, 3, 5, 6, 7)]
    assert [why for *_, why in data.dropped] == [
        "missing or null 'output'", "'output' is a int, not a string", "'output' is empty",
        "missing or null 'instruction'", "'input' is a list, not a string"]
    assert data.num_train_samples == 4 and data.summary["dropped"] == 5
    assert "dropped 5 of 9 rows" in caplog.text and "a.json row 2: missing or null 'output'" in caplog.text


def test_bad_chat_and_text_rows(tok: Any, tmp_path: Path) -> None:
    ok = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    rows = [ok, {"conversations": [{"from": "alien", "value": "q"}]}, {"conversations": [{"from": "human",
            "value": "q"}]}, {"other": 1}, {"messages": [{"role": "user", "content": None}]}, ok]
    data = make(tok, source=write_json(tmp_path / "c.json", rows), format="chat", seq_len=64, packing=False,
                mb=1)
    assert [(i, why.split(" (")[0]) for _, i, why in data.dropped] == [
        (2, "turn 0: unknown from 'alien'"), (3, "no assistant turn with text"),
        (4, "no 'messages' or 'conversations' list"), (5, "turn 0: 'content' is not a string")]
    rows = [{"text": "fine"}, {"text": 5}, {"text": ""}, {"other": "x"}, {"text": None}, {"text": "more"}]
    data = make(tok, source=write_json(tmp_path / "t.jsonl", rows, lines=True), seq_len=8, mb=1)
    assert [i for _, i, _ in data.dropped] == [2, 3, 4, 5]  # JSON lines: line numbers, counted from 1


def test_all_rows_bad_raises_naming_source_format_and_reasons(tok: Any, tmp_path: Path) -> None:
    src = write_json(tmp_path / "bad.json", [{"prompt": "x", "completion": "y"}] * 3)
    with pytest.raises(DataError) as err:
        make(tok, source=src, format="alpaca", seq_len=64)
    msg = str(err.value)
    assert "bad.json" in msg and "alpaca" in msg and "3 of 3 dropped" in msg
    assert "row 1: missing or null 'instruction'" in msg and "counted from 1" in msg


def test_too_few_samples_raises_with_the_numbers_and_the_fix(tok: Any, tmp_path: Path) -> None:
    src = write_json(tmp_path / "d.jsonl", [{"text": "x" * 100}], lines=True)  # 101 tokens -> 3 blocks of 32
    assert make(tok, source=src, seq_len=32, mb=3).num_train_samples == 3
    with pytest.raises(DataError, match=r"gives 3 training samples.*global batch of 4 \(micro_batch_size 2 x "
                                        r"grad_accum_steps 1 x world_size 2\).*data.seq_len"):
        make(tok, source=src, seq_len=32, mb=2, world=2)


def test_missing_local_path_and_txt_for_chat_are_user_errors(tok: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        make(tok, source=str(tmp_path / "nope.jsonl"), seq_len=8)
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="format: text"):
        make(tok, source=str(tmp_path / "a.txt"), format="chat", seq_len=8)


# ------------------------------------------------------------------------------------------------ order

@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Documents whose blocks are all distinct, so comparing batches compares samples."""
    path = tmp_path_factory.mktemp("numbered") / "n.jsonl"
    return write_json(path, [{"text": f"doc {i:04d} " + "abcdefgh"[i % 8] * (i % 13)} for i in range(400)],
                      lines=True)


def test_order_is_a_pure_function_of_seed_and_epoch(tok: Any, numbered: str) -> None:
    first, _ = run(make(tok, source=numbered, seq_len=16), 5)
    torch.manual_seed(12345)  # the global RNG must not matter ...
    state = torch.get_rng_state()
    again, _ = run(make(tok, source=numbered, seq_len=16), 5)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be touched
    assert all(same(a[0], b[0]) for a, b in zip(first, again))
    other_seed, _ = run(make(tok, source=numbered, seq_len=16, seed=1), 5)
    assert not all(same(a[0], b[0]) for a, b in zip(first, other_seed))
    data = make(tok, source=numbered, seq_len=16)
    assert not torch.equal(epoch_order(data, 0), epoch_order(data, 1))
    assert sorted(epoch_order(data, 1).tolist()) == list(range(data.num_train_samples))


def test_two_ranks_consume_exactly_what_one_rank_does(tok: Any, numbered: str) -> None:
    single, pos1 = run(make(tok, source=numbered, seq_len=16, mb=4, accum=2), 6)
    ranks = [run(make(tok, source=numbered, seq_len=16, mb=2, accum=2, world=2, rank=r), 6) for r in range(2)]
    assert ranks[0][1] == ranks[1][1] == pos1
    for step in range(6):
        for k in range(2):
            assert same(cat([ranks[0][0][step][k], ranks[1][0][step][k]]), single[step][k])
            assert not same(ranks[0][0][step][k], ranks[1][0][step][k])


def test_accumulation_splits_the_same_global_batch(tok: Any, numbered: str) -> None:
    one, pos_a = run(make(tok, source=numbered, seq_len=16, mb=4, accum=1), 6)
    four, pos_b = run(make(tok, source=numbered, seq_len=16, mb=1, accum=4), 6)
    assert pos_a == pos_b == DataPosition(0, 24)
    for a, b in zip(one, four):
        assert len(b) == 4 and same(a[0], cat(b))


def test_resume_from_a_saved_position_continues_identically(tok: Any, numbered: str) -> None:
    straight, _ = run(make(tok, source=numbered, seq_len=16, mb=2, accum=3), 7)
    _, pos = run(make(tok, source=numbered, seq_len=16, mb=2, accum=3), 3)
    saved = json.loads(json.dumps(pos.state_dict()))
    resumed, _ = run(make(tok, source=numbered, seq_len=16, mb=2, accum=3), 4, DataPosition.from_state_dict(saved))
    assert all(same(x, y) for a, b in zip(straight[3:], resumed) for x, y in zip(a, b))


def test_epoch_rollover_skips_the_short_tail(tok: Any, numbered: str) -> None:
    data = make(tok, source=numbered, seq_len=16, mb=4, accum=2)  # G = 8
    n, steps = data.num_train_samples, data.steps_per_epoch
    assert n % 8 != 0 and steps == n // 8
    order = epoch_order(data, 0)
    seen: list[int] = []
    pos = DataPosition()
    for _ in range(steps):
        batches, pos = data.step_batches(pos)
        seen += [order[pos.cursor - 8 + j].item() for j in range(8)]
    assert pos == DataPosition(0, steps * 8) and len(set(seen)) == steps * 8
    batches, pos = data.step_batches(pos)
    assert pos == DataPosition(1, 8)
    first_of_epoch_1 = collate([data.train_sets[0].get(i) for i in epoch_order(data, 1)[:4].tolist()], tok.pad_token_id)
    assert same(batches[0], first_of_epoch_1)


# ------------------------------------------------------------------------------------------------- eval

def test_eval_split_holds_out_whole_documents(tok: Any, tmp_path: Path) -> None:
    rows = [{"text": f"<{i:03d}>" + "." * 20} for i in range(200)]
    src = write_json(tmp_path / "d.jsonl", rows, lines=True)
    data = make(tok, source=src, seq_len=16, eval_fraction=0.1)
    def docs(d: TrainData) -> set[str]:
        return set(re.findall(r"<(\d{3})>", tok.decode(train(d).ids.flatten())))

    train_docs = docs(data)
    eval_text = "".join(tok.decode(b.input_ids.flatten()) for b in data.eval_batches(10_000))
    eval_docs = set(re.findall(r"<(\d{3})>", eval_text))
    assert data.summary["eval_documents"] == 20 and len(eval_docs) >= 15
    assert not train_docs & eval_docs
    assert len(train_docs) == 180
    assert eval_docs == {f"{i:03d}" for i in range(9, 200, 10)}  # every tenth document, evenly spread
    again = make(tok, source=src, seq_len=16, eval_fraction=0.1)
    assert all(same(a, b) for a, b in zip(data.eval_batches(5), again.eval_batches(5)))
    other = make(tok, source=src, seq_len=16, eval_fraction=0.1, seed=7)
    assert docs(other) == train_docs  # the split needs no seed: one store serves every seed


def test_eval_batches_are_shared_evenly_over_ranks(tok: Any, numbered: str) -> None:
    single = make(tok, source=numbered, seq_len=16, eval_fraction=0.2, mb=4)
    ranks = [make(tok, source=numbered, seq_len=16, eval_fraction=0.2, mb=2, world=2, rank=r) for r in range(2)]
    full = list(single.eval_batches(10_000))
    per_rank = [list(r.eval_batches(10_000)) for r in ranks]
    assert len(full) == len(per_rank[0]) == len(per_rank[1]) == single.num_eval_samples // 4
    assert all(same(cat([a, b]), c) for a, b, c in zip(*per_rank, full))
    assert len(list(single.eval_batches(3))) == 3
    with pytest.raises(DataError, match="data.eval_fraction"):
        make(tok, source=numbered, seq_len=16, eval_fraction=0.01, mb=64)


# ---------------------------------------------------------------------------------------------- stdlib

def test_stdlib_source_is_sorted_capped_and_skips_tests() -> None:
    docs = list(read_stdlib(200_000))
    assert 0 < sum(len(d.encode("utf-8")) for d in docs) <= 200_000
    root = Path(sysconfig.get_paths()["stdlib"])
    first = sorted(p.relative_to(root).as_posix() for p in root.glob("*.py") if p.read_bytes().strip())[0]
    assert docs[0] == (root / first).read_text(encoding="utf-8")
    assert docs == list(read_stdlib(200_000)) and len(list(read_stdlib(200_000, max_documents=3))) == 3


def test_the_stdlib_corpus_loads_deterministically(tok: Any) -> None:
    data = make(tok, source="builtin:python_stdlib", seq_len=256, mb=8)
    tokens = data.summary["tokens"]  # bytes + one EOS per file
    assert 3_900_000 < tokens - data.summary["documents"] <= 4_000_000
    assert data.num_train_samples == tokens // 256
    again = make(tok, source="builtin:python_stdlib", seq_len=256, mb=8, max_bytes=4_000_000)
    assert np.array_equal(train(data).ids, train(again).ids)
    assert "def " in tok.decode(train(data).ids[0]) or "import" in tok.decode(train(data).ids[:4].flatten())


def test_json_loading_leaves_no_cache_behind(tok: Any, tmp_path: Path) -> None:
    home_cache = Path.home() / ".cache" / "huggingface" / "datasets"
    had = sorted(home_cache.rglob("*")) if home_cache.exists() else None
    tmp_before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("trainer-data-")}
    src = write_json(tmp_path / "d.json", [{"text": "some text here"}] * 10)
    make(tok, source=src, seq_len=8)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "d.json"]
    assert (sorted(home_cache.rglob("*")) if home_cache.exists() else None) == had
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("trainer-data-")} == tmp_before


def test_batch_counts_and_position_state() -> None:
    batch = Batch(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]), torch.tensor([[5, -100, 7, -100]]))
    assert batch.num_tokens() == 3 and batch.num_loss_tokens() == 1  # label at position 0 is never predicted
    pos = DataPosition(epoch=2, cursor=96)
    assert DataPosition.from_state_dict(pos.state_dict()) == pos and pos.state_dict() == {"epoch": 2, "cursor": 96}


def test_hub_names_go_to_load_dataset_with_split_and_cap(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub here: load_dataset is replaced, to check what the hub path asks for and does with the rows."""
    import datasets

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(name: str, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, kwargs))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        return datasets.Dataset.from_dict({"body": [f"row {i} " * 5 for i in range(50)], "id": list(range(50))})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = make(tok, source="org/corpus", split="validation", text_field="body", max_documents=10, seq_len=16)
    assert calls[0][0] == "org/corpus" and calls[0][1]["split"] == "validation" and calls[0][1]["streaming"]
    assert data.summary["documents"] == 10
    assert tok.decode(train(data).ids.flatten()).startswith("row 0 row 0 ")
    with pytest.raises(DataError, match=r"'org/missing' \(split 'train'\) could not be loaded.*doesn't exist"):
        make(tok, source="org/missing", seq_len=16)


def test_json_lines_that_cannot_be_read_are_bad_rows_with_line_numbers(tok: Any, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A line that is not UTF-8 or not JSON is a bad row of its own (the file is not rejected), located by its line
    counted from 1; a file where every line is bad is an error."""
    good = json.dumps({"text": "a good row " * 8}).encode()
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join([good, b'{"text": "caf\xe9"}', b"{not json", b"", good]) + b"\n")
    data = make(tok, source=str(path), seq_len=16, mb=1)
    assert [(i, why) for _, i, why in data.dropped] == [
        (2, "not UTF-8 (byte 0xe9 at column 14)"), (3, "not valid JSON (Expecting property name enclosed in double "
                                                      "quotes at column 2)")]
    assert "t.jsonl line 2: not UTF-8" in caplog.text and "counted from 1" in caplog.text
    path.write_bytes(b"{not json\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"no usable rows: 2 of 2 dropped.*t.jsonl line 1: not valid JSON"):
        make(tok, source=str(path), seq_len=16, mb=1)


def test_text_with_bytes_that_are_not_utf8_is_used_with_a_warning(tok: Any, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine line " * 20 + b"\nbad \xff byte here\n\nanother paragraph " * 10 + b"\n")
    data = make(tok, source=str(path), seq_len=16, mb=1)
    assert data.num_train_samples > 0
    assert "10 line(s) are not valid UTF-8 (lines 2, 5, 8" in caplog.text and "replaced with U+FFFD" in caplog.text
