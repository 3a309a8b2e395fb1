"""Model-state memory (weights, gradients, optimizer state) of full fine-tuning, LoRA and QLoRA.

Two parts:
1. validation: a Llama-shaped model small enough for this machine is built for real for each method (4-bit
   weights quantized by bitsandbytes, LoRA by peft, one optimizer step taken), and the bytes held by its tensors
   are compared with the formula `trainer.adapters.footprint.predicted` computes from shapes alone;
2. the table: the same formula for a Llama-3-8B-shaped model built on the meta device (no memory).
Activations, the CUDA context and allocator slack are not model states and are not counted here
(`python -m trainer plan` adds them).

    python benchmarks/qlora_memory.py [--rank 16] [--skip-validation]
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "rope_theta": 500000.0}
SMALL = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 4, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def methods(rank: int) -> list[tuple[str, object, str, str]]:
    """(label, AdapterConfig, precision, optimizer) for each row."""
    from trainer.recipe.schema import AdapterConfig, QuantConfig

    def qlora(**q: object) -> AdapterConfig:
        return AdapterConfig(type="qlora", rank=rank, quant=QuantConfig(**q))

    return [
        ("full fine-tune, AdamW (fp32 master)", AdapterConfig(type="none"), "bf16", "adamw"),
        ("full fine-tune, AdamW8bit", AdapterConfig(type="none"), "bf16", "adamw8bit"),
        (f"LoRA r={rank}, bf16 base, AdamW", AdapterConfig(type="lora", rank=rank), "bf16", "adamw"),
        (f"QLoRA NF4 r={rank}, AdamW", qlora(double_quant=False), "bf16", "adamw"),
        (f"QLoRA NF4 + double quant r={rank}, AdamW", qlora(), "bf16", "adamw"),
        (f"QLoRA NF4 + double quant r={rank}, paged AdamW8bit", qlora(), "bf16", "paged_adamw8bit"),
        (f"QLoRA LLM.int8 r={rank}, AdamW", qlora(type="int8"), "bf16", "adamw"),
    ]


def llama(**sizes: object) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(**sizes)


def validate(rank: int) -> None:
    """Build each method on a small model for real; predicted must equal measured, byte for byte."""
    from transformers import AutoModelForCausalLM

    from trainer.adapters.footprint import measured, predicted
    from trainer.adapters.targets import meta_model
    from trainer.model.build import build_model
    from trainer.optim import build_optimizer
    from trainer.recipe.resolve import resolve_recipe
    from trainer.recipe.schema import DataConfig, ModelConfig, OptimizerConfig, PrecisionConfig, Recipe
    from trainer.model.tokenizer import byte_tokenizer

    config = llama(**SMALL)
    print(f"validation: Llama hidden {SMALL['hidden_size']}, {SMALL['num_hidden_layers']} layers, vocab "
          f"{SMALL['vocab_size']} ({sum(p.numel() for p in meta_model(config).parameters()) / 1e6:.1f}M parameters)")
    print("| method | predicted bytes (w / g / opt) | measured bytes (w / g / opt) | equal |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        tok = byte_tokenizer()
        ids = torch.randint(0, 256, (1, 32))
        for label, adapter, precision, optimizer in methods(rank):
            recipe = Recipe(model=ModelConfig(name_or_path=tmp, tokenizer="byte"), adapter=adapter,
                            precision=PrecisionConfig(dtype=precision), data=DataConfig(source="builtin:python_stdlib"))
            model = build_model(resolve_recipe(recipe, world_size=1), tok)
            opt = build_optimizer(model, OptimizerConfig(name=optimizer))
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            got = measured(model, opt)
            want = predicted(meta_model(config), adapter, precision, optimizer)
            show = lambda d: " / ".join(f"{d[k]:,}" for k in ("weights", "grads", "optimizer"))  # noqa: E731
            print(f"| {label} | {show(want)} | {show(got)} | {'yes' if got == want else 'NO'} |", flush=True)
            del model, opt


def table(rank: int) -> None:
    from trainer.adapters.footprint import predicted
    from trainer.adapters.quant import bits_per_param
    from trainer.adapters.targets import meta_model

    meta = meta_model(llama(**LLAMA3_8B))
    n = sum(p.numel() for p in meta.parameters())
    gib = 2**30
    print(f"\nLlama-3-8B shape ({n / 1e9:.2f}B parameters, computed from shapes on the meta device): model states "
          f"in GiB")
    print("| method | weights | gradients | optimizer | total | base linear weights |")
    print("|---|---|---|---|---|---|")
    for label, adapter, precision, optimizer in methods(rank):
        b = predicted(meta, adapter, precision, optimizer)
        if adapter.type == "qlora" and adapter.quant.type != "int8":
            note = f"{bits_per_param(adapter.quant.double_quant):.3f} bits/param"
        elif adapter.type == "qlora":
            note = "8 bits/param + fp32 row scales"
        else:
            note = "fp32" if adapter.type == "none" else "bf16"
        total = sum(b.values())
        print(f"| {label} | {b['weights'] / gib:.2f} | {b['grads'] / gib:.3f} | {b['optimizer'] / gib:.3f} | "
              f"{total / gib:.2f} | {note} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--skip-validation", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("trainer").setLevel(logging.ERROR)
    if not args.skip_validation:
        validate(args.rank)
    table(args.rank)


if __name__ == "__main__":
    main()
