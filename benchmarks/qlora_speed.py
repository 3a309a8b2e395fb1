"""Steps/s of our QLoRA step against the same step through the Hugging Face Trainer + peft + bitsandbytes.

Both sides: the same saved base model (random weights, Llama-shaped), NF4 + double quant with bf16 compute,
LoRA rank 16 on every linear layer, bf16 autocast, AdamW, constant LR, grad clip 1.0, the same packed Alpaca
blocks. The HF side is the usual recipe: `from_pretrained(quantization_config=BitsAndBytesConfig(...))`,
`prepare_model_for_kbit_training`, `get_peft_model`, `Trainer(...).train()`. Each side warms up, then is timed
over the same number of steps (per-step times from a callback on the HF side); the sides alternate for several
rounds. On a shared machine other processes slow a round down by up to 10x (CPU seconds per step too, from
thread oversubscription), so the table reports each side's best round (the least disturbed), the median beside.

    python benchmarks/qlora_speed.py [--steps 10] [--rounds 3] [--hidden 512] [--layers 4] [--seq 256] [--batch 4]
    # on a GPU, the issue's setting (peak memory reported too; not run in this session: no GPU was lent):
    python benchmarks/qlora_speed.py --shape llama3-8b --seq 2048 --batch 2 --gradient-checkpointing --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0}


def save_base(directory: Path, args: argparse.Namespace) -> None:
    """Random weights in bf16 (an 8B model in fp32 would need 32 GB of host memory to save)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    h = args.hidden
    sizes = LLAMA3_8B if args.shape == "llama3-8b" else {
        "hidden_size": h, "intermediate_size": int(h * 3.5) // 64 * 64, "num_hidden_layers": args.layers,
        "num_attention_heads": h // 64, "num_key_value_heads": max(1, h // 256), "vocab_size": len(tok)}
    config = LlamaConfig(**sizes, max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    tok.save_pretrained(directory)


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def overrides(base: Path, args: argparse.Namespace, out: Path, max_steps: int) -> list[str]:
    return [f"output_dir={out}", "model.config=null", f"model.name_or_path={base}", f"data.source={DATA}",
            "data.format=alpaca", f"data.seq_len={args.seq}", "data.eval_fraction=0", "train.eval_every_steps=0",
            f"train.micro_batch_size={args.batch}", "train.grad_accum_steps=1", f"train.max_steps={max_steps}",
            "precision.dtype=bf16", "adapter.type=qlora", "adapter.rank=16", "adapter.alpha=32",
            "optimizer.name=adamw", "optimizer.lr=2e-4", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
            "optimizer.weight_decay=0", "optimizer.grad_clip=1.0", "logging.progress_bar=false", "logging.plot=false",
            "logging.every_steps=1000", "checkpoint.every_steps=0", "checkpoint.save_final=false",
            "checkpoint.resume=never", f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]


def time_ours(base: Path, args: argparse.Namespace, out: Path) -> tuple[float, float, float]:
    from trainer.distributed import distributed_context
    from trainer.run.loop import run_loop, setup
    from trainer.recipe.resolve import resolve

    resolved = resolve(ROOT / "recipes" / "quickstart.yaml", overrides(base, args, out, args.warmup + args.steps))
    reset_peak()
    with distributed_context() as dist:
        run = setup(resolved, dist)
        run_loop(run, until_step=args.warmup)
        t0, c0 = time.perf_counter(), time.process_time()
        run_loop(run)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        run.metrics.close()
    return args.steps / elapsed, cpu / args.steps, peak_gib()


def blocks(base: Path, args: argparse.Namespace, n: int) -> list[dict[str, torch.Tensor]]:
    """The same packed Alpaca samples our pipeline trains on, one dict per sequence for the HF Trainer."""
    from trainer.data.batches import DataPosition, TrainData
    from trainer.recipe.read import load_recipe
    from trainer.model.tokenizer import build_tokenizer

    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides(base, args, Path("unused"), n))[0]
    data = TrainData(cfg.data, build_tokenizer(cfg.model), seed=0, rank=0, world_size=1,
                     micro_batch_size=args.batch, grad_accum_steps=1)
    pos, rows = DataPosition(), []
    for _ in range(n):
        (b,), pos = data.step_batches(pos)
        rows += [{"input_ids": b.input_ids[i], "attention_mask": b.attention_mask[i], "labels": b.labels[i]}
                 for i in range(b.input_ids.size(0))]
    return rows


def time_hf(base: Path, args: argparse.Namespace, out: Path,
            rows: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
    """The same step as most QLoRA tutorials write it: transformers + peft + bitsandbytes + HF Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    reset_peak()
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map={"": 0} if cuda else "cpu",
                                                 dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=2e-4, lr_scheduler_type="constant",
                              weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=True, use_cpu=not cuda,
                              gradient_checkpointing=args.gradient_checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False},
                              logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                              remove_unused_columns=False, disable_tqdm=True, seed=0)
    Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Stamp()]).train()
    timed = stamps[args.warmup - 1:]
    steps = len(timed) - 1
    return steps / (timed[-1][0] - timed[0][0]), (timed[-1][1] - timed[0][1]) / steps, peak_gib()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shape", choices=["small", "llama3-8b"], default="small",
                   help="small: Llama-shaped with --hidden/--layers; llama3-8b: the real sizes (for a GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        save_base(base, args)
        rows = blocks(base, args, args.warmup + args.steps)
        ours, hf = [], []
        for r in range(args.rounds):
            ours.append(time_ours(base, args, Path(tmp) / f"ours{r}"))
            hf.append(time_hf(base, args, Path(tmp) / f"hf{r}", rows))
            print(f"round {r + 1}: ours {ours[-1][0]:.3f} steps/s ({ours[-1][1]:.2f} CPU s/step), HF Trainer "
                  f"{hf[-1][0]:.3f} steps/s ({hf[-1][1]:.2f} CPU s/step)", flush=True)
    o, h = max(r[0] for r in ours), max(r[0] for r in hf)
    oc, hc = min(r[1] for r in ours), min(r[1] for r in hf)
    omed, hmed = statistics.median(r[0] for r in ours), statistics.median(r[0] for r in hf)
    om, hm = max(r[2] for r in ours), max(r[2] for r in hf)
    tokens = args.batch * args.seq
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    shape = "Llama-3-8B" if args.shape == "llama3-8b" else f"Llama hidden {args.hidden}, {args.layers} layers"
    ckpt = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"\nQLoRA step (NF4 + double quant, LoRA r=16 all-linear, bf16, AdamW{ckpt}), {shape}, batch "
          f"{args.batch} x seq {args.seq}, {where}, best of {args.rounds} rounds x {args.steps} steps")
    print("| implementation | steps/s | tokens/s | time per step vs HF | CPU s per step | median steps/s "
          "| peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    rows = [("trainer (ours)", o, oc, omed, om), ("HF Trainer + peft + bitsandbytes", h, hc, hmed, hm)]
    for name, rate, cpu, med, peak in rows:
        print(f"| {name} | {rate:.3f} | {rate * tokens:.0f} | {h / rate:.3f}x | {cpu:.2f} | {med:.3f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
