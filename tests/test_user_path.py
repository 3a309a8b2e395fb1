"""The user's path when nothing goes wrong: train, export, generate and chat, the chat template kept, a finished
run left alone, the shipped recipes listed and copied, the data shown before training, errors under torchrun shown
once, and the small things (help text, file modes, `null` restoring a default)."""

from __future__ import annotations

import io
import json
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.helpers import QUICKSTART, ROOT, TEST_DATA, run_cli, tiny
from trainer.__main__ import main
from trainer.checkpoint.layout import complete_checkpoints
from trainer.model.tokenizer import CHATML

ALPACA = [f"data.source={TEST_DATA / 'alpaca_tasks.json'}", "data.format=alpaca", "data.packing=false",
          "data.seq_len=128"]
CONVERSATION = [{"role": "user", "content": "Reverse the letters of the word.\n\nriver"},
                {"role": "assistant", "content": "revir"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short chat fine-tune from scratch with the byte tokenizer, which has no chat template of its own."""
    out = tmp_path_factory.mktemp("chat") / "run"
    proc = run_cli(["train", str(QUICKSTART), *tiny(out, *ALPACA, steps=6)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat template: ChatML: the tokenizer has none" in proc.stderr
    return out


@pytest.mark.slow
def test_exports_carry_inference_defaults_and_the_chat_template(chat_run: Path, tmp_path: Path) -> None:
    """The exported model generates with the KV cache (a saved `use_cache: false` made generate() 45x slower), and
    its tokenizer renders a conversation exactly as training did (the run fell back to ChatML)."""
    ckpt = complete_checkpoints(chat_run)[-1][1]
    export = tmp_path / "export"
    assert main(["export", str(chat_run), "--out", str(export)]) == 0
    for folder in (ckpt / "hf", export):
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True
        assert GenerationConfig.from_pretrained(folder).use_cache is not False
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == CHATML
        rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
        assert rendered == ("<|im_start|>user\nReverse the letters of the word.\n\nriver<|im_end|>\n"
                            "<|im_start|>assistant\nrevir<|im_end|>\n")
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.use_cache and model.generation_config.use_cache


@pytest.mark.slow
def test_generate_and_chat_on_a_run_and_an_export(chat_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.use.chat import chat_loop, generate, load

    export = tmp_path / "export"
    assert main(["export", str(chat_run), "--out", str(export)]) == 0
    capsys.readouterr()
    assert main(["generate", str(chat_run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(export), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("def ")  # greedy: the same model, same text
    loaded = load(export)
    assert loaded.model.config.use_cache
    manual = loaded.model.generate(input_ids=torch.tensor([list(b"def ")]), max_new_tokens=12, do_sample=False,
                                   pad_token_id=loaded.tokenizer.pad_token_id)
    assert from_run.rstrip("\n") == "def " + loaded.tokenizer.decode(manual[0, 4:], skip_special_tokens=True)
    assert generate(loaded, "def ", max_new_tokens=12) == from_run.rstrip("\n")[4:]
    out = io.StringIO()
    chat_loop(loaded, read=io.StringIO("Reverse the letters of the word.\n/reset\nhello\n/exit\n"), write=out,
              max_new_tokens=16, temperature=0.0)
    assert out.getvalue().count("model> ") == 2 and "chatting with export" in out.getvalue()


class RecordingGenerate:
    """The model's own generate(), with the arguments of each call kept (what the chat asked for)."""

    def __init__(self, model: object) -> None:
        self.real = model.generate  # type: ignore[attr-defined]
        self.calls: list[dict] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, **kwargs: object) -> torch.Tensor:
        self.calls.append(kwargs)
        self.outputs.append(self.real(**kwargs))
        return self.outputs[-1]


@pytest.mark.slow
def test_a_long_chat_keeps_to_the_context_and_the_system_prompt(chat_run: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    """The chat model's context is 256 tokens (bytes) and chat asks for 256 new ones by default: the whole history
    went to generate() (transformers: "exceeded the model's predefined maximum length", then degraded output). Now
    each prompt plus its reply fits, the oldest exchanges are left out (said once), the system prompt stays, and a
    reply stops at <|im_end|> (ten byte tokens here: a stop string)."""
    from trainer.use.chat import chat_loop, load

    loaded = load(chat_run)
    assert loaded.model.config.max_position_embeddings == 256
    recording = RecordingGenerate(loaded.model)
    loaded.model.generate = recording
    turns = "".join(f"Reverse the letters of word number {i}: {'river' * 8}\n" for i in range(5))
    out = io.StringIO()
    chat_loop(loaded, read=io.StringIO(turns), write=out, temperature=0.0, system="You reverse words.")
    assert out.getvalue().count("model> ") == 5
    assert out.getvalue().count("its oldest exchanges are left out") == 1
    prompts = [loaded.tokenizer.decode(call["input_ids"][0]) for call in recording.calls]
    for call, prompt in zip(recording.calls, prompts):
        assert call["input_ids"].size(1) + call["max_new_tokens"] <= 256
        assert prompt.startswith("<|im_start|>system\nYou reverse words.<|im_end|>")
        assert call["stop_strings"] == ["<|im_end|>"]
    assert "word number 0" in prompts[0] and "word number 0" not in prompts[-1] and "word number 4" in prompts[-1]
    assert "predefined maximum length" not in capfd.readouterr().err


def test_a_reply_ends_at_the_templates_end_of_turn_token() -> None:
    """<|im_end|> as one token of the vocabulary: generation stops at it, not at max_new_tokens (the reply ran on
    to the limit and was cut afterwards). A model that can only say <|im_end|> (its head a bias on that token)."""
    from transformers import AutoConfig

    from trainer.use.chat import Loaded, reply
    from trainer.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    end = tok.convert_tokens_to_ids("<|im_end|>")
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.lm_head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[end] = 10.0
    recording = RecordingGenerate(model)
    model.generate = recording
    answer, left_out = reply(Loaded(model, tok, torch.device("cpu"), "tiny", context=128),
                             [{"role": "user", "content": "hi"}], max_new_tokens=20, temperature=0.0)
    assert (answer, left_out) == ("", 0)
    assert end in recording.calls[0]["eos_token_id"]
    new = recording.outputs[0][0, recording.calls[0]["input_ids"].size(1):].tolist()
    assert new == [end]


@pytest.mark.slow
def test_a_finished_run_is_left_alone(tmp_path: Path) -> None:
    assert run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=3)]).returncode == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    again = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "train.eval_batches=2", steps=3)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already at step 3 of 3 in {tmp_path}: nothing to do; raise train.max_steps to continue" in again.stdout
    assert "nan" not in again.stdout + again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_a_recipe_error_is_shown_once_and_every_worker_stops(tmp_path: Path) -> None:
    """Every rank refuses the recipe before any collective (exit 2); a rank slower to get there may be stopped by
    torchrun first, once another has failed (SIGTERM: seen under load 3). The error is shown once."""
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "optimizer.lrr=1", steps=2)], nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count("error: recipe") == 1 and proc.stderr.count("optimizer.lrr") >= 1
    summary = proc.stderr[proc.stderr.index("Failures:"):]  # torchrun's own summary, after its own traceback
    exits = re.findall(r"exitcode  : (-?\d+)", summary)
    assert len(exits) == 2 and "2" in exits and set(exits) <= {"2", "-15"}, summary  # both workers
    root = summary[summary.index("Root Cause"):]
    assert "exitcode  : 2" in root and "traceback : recipe" in root and 'File "' not in root


def test_shipped_recipes_are_listed_and_copied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "24gb/llama3-8b-qlora" in listing and "9.17 GiB per GPU" in listing and "quickstart" in listing
    assert main(["recipes", "copy", "24gb/llama3-8b-qlora", str(tmp_path)]) == 0
    copied = tmp_path / "llama3-8b-qlora.yaml"
    assert copied.read_text() == (ROOT / "recipes" / "24gb" / "llama3-8b-qlora.yaml").read_text()
    assert main(["recipes", "copy", "llama3-8b-qlora", str(copied)]) == 1  # exists: never overwritten silently
    assert main(["recipes", "copy", "nope", str(tmp_path)]) == 1 and "lists them" in capsys.readouterr().err


def test_recipes_lists_the_plans_peak_not_the_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header's planned peak is a note for its reader and can lag behind the plan (11.64 GiB stated, 11.63 planned):
    `recipes` prints the plan's own figure for the header's number of GPUs."""
    from trainer.plan import catalog
    from trainer.plan.peak import plan
    from trainer.recipe.resolve import resolve

    shipped = (ROOT / "recipes" / "24gb" / "llama3-8b-qlora.yaml").read_text()
    (tmp_path / "24gb").mkdir()
    stale = tmp_path / "24gb" / "llama3-8b-qlora.yaml"
    stale.write_text(re.sub(r"planned peak [\d.]+ GiB", "planned peak 99.99 GiB", shipped))
    monkeypatch.setattr(catalog, "RECIPES", tmp_path)
    listing = catalog.table()
    planned = plan(resolve(stale)).peak_bytes / 2**30
    assert "99.99" not in listing and f"1 x 24GiB   {planned:.2f} GiB per GPU" in listing, listing


@pytest.mark.slow
def test_the_wheel_carries_the_recipes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("trainer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trainer/recipes/quickstart.yaml" in names and "trainer/recipes/24gb/llama3-8b-qlora.yaml" in names
    assert "trainer/data/corpora/shakespeare.txt.gz" in names  # builtin:shakespeare, the quickstart's data


def test_data_show_marks_the_tokens_that_carry_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(QUICKSTART), "--show", "2", *ALPACA, "data.eval_fraction=0",
                 "train.eval_every_steps=0"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample ") == 2
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out  # only the replies are learned
    assert re.search(r"240 rows, \d+ dropped( \(\d+ of them longer than data.seq_len=128; data.too_long: drop\))?; "
                     r"[\d,]+ tokens", out) and "of their positions hold tokens" in out


def test_small_things(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    help_text = run_cli(["train", "--help"], timeout=120).stdout
    assert help_text.startswith("usage: python -m trainer train [-h] [--force] recipe [key=value ...]")
    flat = " ".join(help_text.split())
    for meaning in ("memory plan predicts more than the GPU's free memory", "move unusable checkpoints",
                    "resume an adapter over a base model that differs"):  # every meaning of train --force
        assert meaning in flat, flat
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "replace an earlier export in --out" in flat and "with --merge, merge even with a base model" in flat
    assert main(["validate", str(QUICKSTART), "adapter.type=null", "train.seed=null"]) == 0  # null: the default
    assert main(["validate", str(QUICKSTART), "optimizer.warmup_steps=500"]) == 0
    assert "# warning: optimizer.warmup_steps=500 > train.max_steps=150" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_files_are_readable_like_any_other(tmp_path: Path) -> None:
    assert run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=1)]).returncode == 0
    ckpt = complete_checkpoints(tmp_path)[-1][1]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == modes["config.yaml"] == 0o644, modes
