"""The type the trainer gives a language model it builds, loads or exports.

A transformers `PreTrainedModel`, possibly wrapped by peft (a `PeftModel` forwards every attribute to the model it
wraps) and with bitsandbytes' or torchao's tensor types inside. No single class describes all of them, and torch
types `nn.Module.__getattr__` as returning a tensor or a module, which would make every `model.config` an error;
so code that uses such a model's transformers API (config, generation_config, get_input_embeddings,
save_pretrained, gradient_checkpointing_enable, ...) names it with this alias instead of nn.Module.
"""

from __future__ import annotations

from typing import Any

CausalLM = Any  # a transformers causal LM, or a peft model around one
