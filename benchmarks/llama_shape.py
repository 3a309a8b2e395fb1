"""The Llama shape the optimizer benchmarks take from the command line, and a model of that shape (untied
embeddings, kv heads = heads): one definition for galore_memory, galore_speed, apollo_speed and optimizer_memory."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def add_shape_args(ap: argparse.ArgumentParser, *, hidden: int, intermediate: int, layers: int, heads: int,
                   vocab: int = 32000) -> None:
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--vocab", type=int, default=vocab)


def llama_of(args: argparse.Namespace, meta: bool = False) -> LlamaForCausalLM:
    """The model of the shape in `args`: on the meta device (shapes only), or with weights seeded from 0."""
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, tie_word_embeddings=False)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)
