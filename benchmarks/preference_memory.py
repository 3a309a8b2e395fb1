"""Peak RSS of preference training against supervised fine-tuning of the same model on the same sequences: DPO's
reference must cost no second model (LoRA: the base with the adapters disabled; full training: log-probs stored
beside the token store).

A Llama-shaped model of about 57M parameters (hidden 768, 8 layers, the byte tokenizer) is saved once; each run
trains it for a few steps through the real CLI, in its own process, and reports the peak RSS the loop logs
(`peak_mem_bytes`, the process's own high-water mark, VmHWM). SFT takes micro-batches of 8 prompt +
chosen-response rows; DPO micro-batches of 4 pairs, the same 8 sequences per forward. A reference copy of the
model would add its weights (`copy` column) to DPO's peak.

    python benchmarks/preference_memory.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
        "num_key_value_heads": 12, "max_position_embeddings": 512}


def save_model(folder: Path) -> int:
    """The model, saved like a hub checkpoint; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.model.tokenizer import byte_tokenizer, save_tokenizer

    tok = byte_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **ARCH)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    save_tokenizer(tok, folder)
    return sum(p.numel() for p in model.parameters())


def peak_rss(out: Path, base: Path, data: Path, steps: int, *extra: str) -> float:
    """Peak RSS in MiB of a run of `steps` steps."""
    args = [sys.executable, "-m", "trainer", "train", "recipes/quickstart.yaml", f"output_dir={out}",
            "model.config=null", f"model.name_or_path={base}", "model.tokenizer=null", f"data.source={data}",
            "data.chat_template=chatml", "data.seq_len=128", f"data.cache_dir={out.parent / 'cache'}",
            "data.eval_fraction=0", "train.eval_every_steps=0", f"train.max_steps={steps}",
            "logging.progress_bar=false", "logging.plot=false", "checkpoint.save_final=false", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_bytes"] for r in rows) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    steps = parser.parse_args().steps
    pairs = json.loads((ROOT / "recipes/examples/data/preference_facts.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        params = save_model(folder / "base")
        (folder / "pairs.json").write_text(json.dumps(pairs))
        sft_rows = [{"instruction": p["prompt"], "input": "", "output": p["chosen"]} for p in pairs]
        (folder / "sft.json").write_text(json.dumps(sft_rows))
        sft = ["data.format=alpaca", "data.packing=none", "train.micro_batch_size=8"]
        dpo = ["data.format=preference", "objective.name=dpo", "train.micro_batch_size=4"]
        cases = [("LoRA r16, fp32 base", ["adapter.type=lora", "adapter.rank=16"]),
                 ("full training, fp32, AdamW", ["adapter.type=none"])]
        print(f"model: {params / 1e6:.1f}M parameters, fp32 weights {4 * params / 2**20:.0f} MiB; "
              f"8 sequences of <= 128 tokens per forward; {steps} steps")
        print("| training | SFT peak RSS | DPO peak RSS | DPO - SFT | a reference copy would add |")
        print("|---|---|---|---|---|")
        for label, extra in cases:
            a = peak_rss(folder / f"sft-{len(label)}", folder / "base", folder / "sft.json", steps, *sft, *extra)
            b = peak_rss(folder / f"dpo-{len(label)}", folder / "base", folder / "pairs.json", steps, *dpo, *extra)
            print(f"| {label} | {a:.0f} MiB | {b:.0f} MiB | {b - a:+.0f} MiB | {4 * params / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
