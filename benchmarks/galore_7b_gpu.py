"""Peak GPU memory and time of one training step of a LLaMA-7B-shaped model with 8-bit GaLore + per-layer updates +
gradient checkpointing (the GaLore paper's 22.0 GB setting: random bf16 weights, seq 256, batch 1), under
`torch.cuda.set_per_process_memory_fraction` capped at 24 GiB; then the same step with bitsandbytes' 8-bit AdamW
(full gradients, no cap: it does not fit in 24 GiB) for time.

Weights are bf16 with no fp32 master copy (`precision.master_weights: false`), as in the paper; GaLore rank 1024,
scale 0.25. The first step refreshes every projector (SVD of 224 matrices), so it is timed apart from a
second, plain step.

    python benchmarks/galore_7b_gpu.py [--svd randomized|full] [--cap-gib 24]
    python benchmarks/galore_7b_gpu.py --tiny     # the same code on a small model on CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.optim.lowrank_groups import build_lowrank
from trainer.optim.per_layer import PerLayerUpdates
from trainer.recipe.schema import GaloreConfig, OptimizerConfig

GIB = 2**30


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)


def build(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 7B in fp32 would not fit under the cap
    try:
        with device:
            model = LlamaForCausalLM(model_config(args.tiny))
    finally:
        torch.set_default_dtype(before)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(model: LlamaForCausalLM, ids: torch.Tensor, device: torch.device,
             after_backward: callable) -> float:  # type: ignore[valid-type]
    sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    after_backward()
    sync(device)
    return time.perf_counter() - t0


def galore_run(args: argparse.Namespace, device: torch.device, ids: torch.Tensor) -> dict[str, float]:
    model = build(args, device)
    galore = GaloreConfig(rank=args.rank, scale=0.25, update_gap=500, svd=args.svd)
    cfg = OptimizerConfig(name="galore_adamw8bit", lr=1e-5, weight_decay=0.0, galore=galore)
    opt = build_lowrank(model, cfg, shard_state=False)
    updates = PerLayerUpdates(model, opt, grad_clip=None, world_size=1)  # type: ignore[arg-type]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    refresh = one_step(model, ids, device, updates.finish)
    plain = one_step(model, ids, device, updates.finish)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
    del model, opt, updates
    return {"refresh_s": refresh, "plain_s": plain, "peak_gib": peak}


def adamw8bit_run(args: argparse.Namespace, device: torch.device, ids: torch.Tensor) -> dict[str, float]:
    import bitsandbytes as bnb

    model = build(args, device)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-5)

    def step(opt: torch.optim.Optimizer = opt) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = one_step(model, ids, device, step)
    plain = one_step(model, ids, device, step)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
    del model, opt, step
    return {"first_s": first, "plain_s": plain, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small model on CPU: check the script itself")
    ap.add_argument("--svd", choices=["full", "randomized"], default="randomized")
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--cap-gib", type=float, default=24.0)
    args = ap.parse_args()
    if args.tiny:
        device, args.rank = torch.device("cpu"), 64
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny for a CPU smoke test)")
    else:
        device = torch.device("cuda")
    ids = torch.randint(0, model_config(args.tiny).vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    galore = galore_run(args, device, ids)
    print(f"8-bit GaLore rank {args.rank} ({args.svd} SVD) + per-layer + checkpointing: peak "
          f"{galore['peak_gib']:.2f} GiB ({galore['peak_gib'] * GIB / 1e9:.2f} GB) under a {args.cap_gib:g} GiB cap; "
          f"first step (refresh) {galore['refresh_s']:.2f} s, plain step {galore['plain_s']:.2f} s")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    adam = adamw8bit_run(args, device, ids)
    print(f"bitsandbytes AdamW8bit + checkpointing (no cap): peak {adam['peak_gib']:.2f} GiB; first step "
          f"{adam['first_s']:.2f} s, plain step {adam['plain_s']:.2f} s; GaLore plain step / AdamW8bit = "
          f"{galore['plain_s'] / adam['plain_s']:.2f}")


if __name__ == "__main__":
    main()
