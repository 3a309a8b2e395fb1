"""Shared test helpers: tiny recipes, the shared data folder, and running the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny(output_dir: Path, *extra: str, steps: int = 5) -> list[str]:
    """Overrides that shrink the quickstart to a seconds-long run writing into output_dir."""
    return [f"output_dir={output_dir}", f"train.max_steps={steps}", "model.config.hidden_size=64",
            "model.config.intermediate_size=128", "model.config.num_hidden_layers=2", "data.seq_len=64",
            "data.max_bytes=200000", "train.micro_batch_size=4", "train.eval_every_steps=0",
            "data.eval_fraction=0", "optimizer.warmup_steps=0", "logging.every_steps=1",
            "logging.progress_bar=false", "logging.plot=false", "checkpoint.every_steps=0", *extra]


def read_metrics(output_dir: Path, split: str = "train") -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], *, nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300,
            torchrun: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m trainer ...`, or under torchrun with nproc processes (always when nproc > 1)."""
    if nproc > 1 or torchrun:
        # --standalone picks a free port itself: no race with other tests choosing ports at the same time.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "trainer", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models in-process: a second BLAS thread only adds contention on a busy machine (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing (it ships beside the repository in CI)")
    return SHARED_DATA


def gpu_available() -> bool:
    return torch.cuda.is_available()


# kv heads = heads, so every linear weight is a multiple of 64 x 256 elements: bits/param come out exact.
LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
QWEN2 = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def save_base(directory: Path, arch: dict[str, Any]) -> Path:
    """A randomly initialized model saved like a hub checkpoint (safetensors + config + tokenizer)."""
    tok = byte_tokenizer()
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("llama"), LLAMA)


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("qwen2"), QWEN2)


