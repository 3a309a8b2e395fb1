"""Gradient memory under DDP: torch's default (the reducer's buckets beside the .grad tensors) against what the
native engine does (`gradient_as_bucket_view=True`, gradients zeroed in place so they stay bucket views).

Each variant runs in its own torchrun launch of 2 ranks (peak RSS only grows), on a stack of fp32 linear layers
(no activations to speak of), with AdamW and gradient accumulation 2, and prints the peak RSS of rank 0 over
the steps (sampled after each backward, step and zero_grad; glibc told to return freed blocks), and how much
more than the trainer's way each variant holds, in units of the gradient size.

    python benchmarks/ddp_gradient_memory.py [--hidden 2048] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"torch default (buckets + .grad)": {"view": False, "set_to_none": True},
            "bucket views, set_to_none": {"view": True, "set_to_none": True},
            "bucket views, zeroed in place (trainer)": {"view": True, "set_to_none": False}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(args.hidden, args.hidden, bias=False)
                                      for _ in range(args.layers)])
        ddp = DDP(model, gradient_as_bucket_view=args.view)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)  # no foreach temporaries
        x = torch.randn(4, args.hidden)
        weights = sum(p.numel() * 4 for p in model.parameters())
        samples = []
        for _ in range(4):
            for micro in range(2):
                ctx = ddp.no_sync() if micro == 0 else torch.enable_grad()
                with ctx:
                    ddp(x).square().mean().backward()
                samples.append(rss_bytes())
            opt.step()
            samples.append(rss_bytes())
            opt.zero_grad(set_to_none=args.set_to_none)
            samples.append(rss_bytes())
        peak = max(samples[3:])  # from the second step on: the optimizer state exists
        base = samples[2]
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps({"peak": peak, "base": base, "grads": weights}))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--view", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--set-to-none", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.view, args.set_to_none = bool(args.view), bool(args.set_to_none)
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave the RSS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, v in VARIANTS.items():
            out = Path(tmp, "result.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            __file__, "--worker", f"--hidden={args.hidden}", f"--layers={args.layers}",
                            f"--view={int(v['view'])}", f"--set-to-none={int(v['set_to_none'])}", f"--out={out}"],
                           check=True, env=env, capture_output=True)
            rows.append((name, json.loads(out.read_text())))
    grads = rows[0][1]["grads"]
    print(f"{args.layers} x Linear({args.hidden}, {args.hidden}) fp32, 2 ranks, accumulation 2: gradients "
          f"{grads / 2**20:.0f} MiB per rank\n")
    print(f"{'variant':42} {'peak RSS':>10} {'above the trainer':>18} {'x gradients':>13}")
    for name, r in rows:
        extra = r["peak"] - rows[-1][1]["peak"]
        print(f"{name:42} {r['peak'] / 2**20:6.0f} MiB {extra / 2**20:14.0f} MiB {extra / grads:12.2f}x")


if __name__ == "__main__":
    main()
