"""Optimizer-state bytes of a Llama-1B-shaped model: AdamW, 8-bit AdamW, GaLore and 8-bit GaLore at several ranks.

The model is built on the meta device (shapes only, nothing allocated) and every number is counted from its
parameter shapes with the same rules the optimizers follow:
- AdamW (torch): two fp32 moments per element, plus a 4-byte step per tensor;
- 8-bit AdamW (bitsandbytes): two 1-byte moments plus one fp32 absmax per 256 elements for tensors of at least
  4096 elements, fp32 moments below that;
- GaLore (trainer.optim.galore): per target m x n an fp32 projector (min(m, n) x r for proj_type std) and two
  low-rank moments (max(m, n) x r), AdamW for the other tensors, an 8-byte step per tensor;
- 8-bit GaLore: the same with every moment of at least 4096 elements in bitsandbytes' 8-bit blockwise format.
Before printing, the rules are checked against the real state tensors of a small model trained for one step
(AdamW, bitsandbytes' AdamW8bit and our GaLore in both precisions); a mismatch stops the script.

    python benchmarks/galore_memory.py [--ranks 128 256 512] [--hidden 2048 --intermediate 5461 --layers 24]
"""

from __future__ import annotations

import argparse
import math

import torch
from llama_shape import add_shape_args, llama_of
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.optim.galore import MIN_8BIT_SIZE, GaLoreAdamW, expected_state_bytes, moment_bytes, state_bytes
from trainer.optim.lowrank_groups import lowrank_param_groups, select_targets
from trainer.recipe.schema import GaloreConfig, OptimizerConfig

GIB = 2**30


def adamw_bytes(shapes: list[tuple[int, ...]]) -> int:
    return sum(8 * math.prod(s) + 4 for s in shapes)


def adamw8bit_bytes(shapes: list[tuple[int, ...]]) -> int:
    return sum(2 * moment_bytes(math.prod(s), 8, MIN_8BIT_SIZE) for s in shapes)


def galore_bytes(model: torch.nn.Module, rank: int, bits: int, proj_type: str = "std") -> int:
    targets, _ = select_targets(model, None, rank)
    return sum(expected_state_bytes(tuple(p.shape), rank if p in targets else None, proj_type, bits)
               for p in model.parameters())


def check_rules_on_real_state() -> None:
    """The counting rules above against the state tensors optimizers really create (one step, CPU)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=344,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    shapes = [tuple(p.shape) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adamw.step()
    assert state_bytes(adamw) == adamw_bytes(shapes), "AdamW rule"
    a8 = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    a8.step()
    counted = sum(t.numel() * t.element_size() for s in a8.state.values() for k, t in s.items()
                  if isinstance(t, torch.Tensor) and k not in ("qmap1", "qmap2", "step"))  # maps are shared
    assert counted == adamw8bit_bytes(shapes), "AdamW8bit rule"
    for bits in (32, 8):
        cfg = OptimizerConfig(name="galore_adamw", galore=GaloreConfig(rank=32))
        groups, _ = lowrank_param_groups(model, cfg)
        opt = GaLoreAdamW(groups, lr=1e-3, bits=bits)
        opt.step()
        assert state_bytes(opt) == galore_bytes(model, 32, bits), f"GaLore {bits}-bit rule"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 256, 512])
    add_shape_args(ap, hidden=2048, intermediate=5461, layers=24, heads=32)
    args = ap.parse_args()
    check_rules_on_real_state()
    model = llama_of(args, meta=True)
    shapes = [tuple(p.shape) for p in model.parameters()]
    params = sum(math.prod(s) for s in shapes)
    targets, _ = select_targets(model, None, min(args.ranks))
    share = sum(p.numel() for p in targets) / params
    print(f"Llama-1B shape (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"vocab {args.vocab}, untied head): {params / 1e9:.3f} B parameters, {len(targets)} GaLore targets "
          f"({100 * share:.1f}% of the parameters); weights {4 * params / GIB:.2f} GiB fp32, "
          f"{2 * params / GIB:.2f} GiB bf16")
    print("counting rules checked against real optimizer state on a small model: ok\n")
    adamw, adamw8 = adamw_bytes(shapes), adamw8bit_bytes(shapes)
    print("| rank | AdamW | 8-bit AdamW | GaLore | 8-bit GaLore | GaLore / AdamW | 8-bit GaLore / AdamW |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rank in args.ranks:
        g32, g8 = galore_bytes(model, rank, 32), galore_bytes(model, rank, 8)
        print(f"| {rank} | {adamw / GIB:.2f} GiB | {adamw8 / GIB:.2f} GiB | {g32 / GIB:.2f} GiB | "
              f"{g8 / GIB:.2f} GiB | {g32 / adamw:.3f} | {g8 / adamw:.3f} |")


if __name__ == "__main__":
    main()
