"""Optimizer state and weight bytes of a LLaMA-7B-shaped model: AdamW, 8-bit AdamW, GaLore, 8-bit GaLore, APOLLO
and APOLLO-Mini, each with bf16 weights and with INT8 weights (precision.weights: int8).

The model is built on the meta device (shapes only) and every number comes from the rules the optimizers and
the memory plan use (trainer/optim/lowrank_groups.py state_cost, trainer/adapters/footprint.py for AdamW and
8-bit AdamW, trainer/model/int8_weights.py for INT8 weights). Before printing, the rules are checked against the real
tensors of a small model after one step (every optimizer of the table, INT8 weights included); a mismatch stops
the script. Settings: GaLore at rank 1024 (the GaLore paper's 7B run), APOLLO at its default rank 256,
APOLLO-Mini at rank 1; weights in bf16 without an fp32 master copy (the 7B recipes' setting), so "INT8" replaces
the bf16 targets (attention and MLP projections) by 1 byte per element and a bf16 scale per row, and the
embeddings and head stay bf16. INT8 weights need a stochastic-rounding update, which the trainer's GaLore and
APOLLO perform; for AdamW and 8-bit AdamW the INT8 column is what it would take, not something it offers.

    PYTHONPATH=. python benchmarks/optimizer_memory.py [--hidden 4096 --intermediate 11008 --layers 32]
"""

from __future__ import annotations

import argparse
import math

import torch
from llama_shape import add_shape_args, llama_of
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.model import int8_weights
from trainer.adapters.footprint import optimizer_state_bytes
from trainer.optim.lowrank import state_bytes
from trainer.optim.lowrank_groups import build_lowrank, lowrank_defaults, rank_of, select_targets, state_cost
from trainer.recipe.schema import ApolloConfig, GaloreConfig, OptimizerConfig

GIB = 2**30
FAMILY = {"GaLore": OptimizerConfig(name="galore_adamw", galore=GaloreConfig(rank=1024)),
          "8-bit GaLore": OptimizerConfig(name="galore_adamw8bit", galore=GaloreConfig(rank=1024)),
          "APOLLO": OptimizerConfig(name="apollo_adamw"),
          "APOLLO-Mini": OptimizerConfig(name="apollo_mini")}


def family_bytes(model: torch.nn.Module, cfg: OptimizerConfig) -> int:
    """State of a low-rank optimizer over the model, by its own per-parameter rule."""
    rank = rank_of(cfg)
    targets, _ = select_targets(model, None, rank)
    defaults = lowrank_defaults(cfg)
    return sum(state_cost(p, {**defaults, "rank": rank if p in targets else None}) for p in model.parameters())


def state_of(model: torch.nn.Module, name: str) -> int:
    numels = [p.numel() for p in model.parameters()]
    if name == "AdamW":
        return optimizer_state_bytes("adamw", numels)
    if name == "8-bit AdamW":
        return optimizer_state_bytes("adamw8bit", numels)
    return family_bytes(model, FAMILY[name])


def weight_bytes(model: torch.nn.Module, int8: bool) -> int:
    """bf16 weights, or INT8 targets (1 B per element, a bf16 scale per row) with the rest in bf16."""
    targets, _ = select_targets(model, None, 1)
    total = 0
    for p in model.parameters():
        total += int8_weights.expected_bytes(tuple(p.shape), 2) if int8 and p in targets else 2 * p.numel()
    return total


def check_rules_on_real_state() -> None:
    """The rules above against real tensors: each optimizer after one step on a small model, and the bytes of
    INT8 weights made by the trainer's own transform."""
    import bitsandbytes as bnb

    def small() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=344,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            tie_word_embeddings=False))

    model = small()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adamw.step()
    assert state_bytes(adamw) == state_of(model, "AdamW"), "AdamW rule"
    a8 = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    a8.step()
    assert state_bytes(a8) == state_of(model, "8-bit AdamW"), "8-bit AdamW rule"
    for name, cfg in FAMILY.items():
        small_cfg = cfg.model_copy(update={"galore": GaloreConfig(rank=32), "apollo": ApolloConfig(rank=32)}) \
            if name != "APOLLO-Mini" else cfg
        opt = build_lowrank(model, small_cfg, shard_state=False)
        opt.step()
        assert state_bytes(opt) == family_bytes(model, small_cfg), f"{name} rule"
    quantized = small().to(torch.bfloat16)
    targets, _ = select_targets(quantized, None, 1)
    int8_weights.quantize_weights(quantized, targets)
    real = sum(int8_weights.weight_bytes(p) for p in quantized.parameters())
    assert real == weight_bytes(small(), int8=True), "INT8 weight rule"


def peer_state(rank: int) -> tuple[int, int] | None:
    """(our APOLLO state bytes, apollo-torch's APOLLOAdamW state bytes) on the small model after one step, its
    projection matrices included (it stores them; ours keeps a seed). None without apollo-torch."""
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        return None
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    cfg = OptimizerConfig(name="apollo_adamw", apollo=ApolloConfig(rank=rank))
    ours = build_lowrank(model, cfg, shard_state=False)
    ours.step()
    targets, _ = select_targets(model, None, rank)
    rest = [p for p in model.parameters() if p not in targets]
    peer = APOLLOAdamW([{"params": rest}, {"params": list(targets), "rank": rank, "proj": "random",
                                           "scale_type": "channel", "scale": 1, "update_proj_gap": 200,
                                           "proj_type": "std"}], lr=1e-3)
    peer.step()
    counted = 0
    for state in peer.state.values():
        for value in state.values():
            tensor = getattr(value, "ortho_matrix", value)  # its projector object holds the matrix
            if isinstance(tensor, torch.Tensor):
                counted += tensor.numel() * tensor.element_size()
    return state_bytes(ours), counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, hidden=4096, intermediate=11008, layers=32, heads=32)
    args = ap.parse_args()
    check_rules_on_real_state()
    model = llama_of(args, meta=True)
    params = sum(math.prod(p.shape) for p in model.parameters())
    bf16, int8 = weight_bytes(model, False), weight_bytes(model, True)
    print(f"LLaMA-7B shape (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}, untied head): {params / 1e9:.2f} B parameters; weights {bf16 / GIB:.2f} GiB in bf16, "
          f"{int8 / GIB:.2f} GiB with INT8 targets")
    print("counting rules checked against real optimizer state and INT8 weights on a small model: ok\n")
    print("| optimizer | state | state + bf16 weights | state + INT8 weights |")
    print("|---|---:|---:|---:|")
    for name in ("AdamW", "8-bit AdamW", *FAMILY):
        state = state_of(model, name)
        print(f"| {name} | {state / GIB:.2f} GiB | {(state + bf16) / GIB:.2f} GiB | {(state + int8) / GIB:.2f} GiB |")
    side = peer_state(32)
    if side is None:
        print("\napollo-torch is not installed: no peer comparison (pip install apollo-torch, a benchmark-only peer)")
    else:
        print(f"\nsmall model (hidden 128, rank 32), state after one step: ours {side[0]:,} B, apollo-torch "
              f"APOLLOAdamW {side[1]:,} B (it stores each projection matrix; ours regenerates it from a seed)")


if __name__ == "__main__":
    main()
