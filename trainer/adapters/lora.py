"""LoRA / DoRA through peft over a frozen (maybe 4-bit) base: prepare, attach, count, save and load.

Dtypes of an adapter run: the frozen weights that are not quantized (embeddings, output head) are held in the
precision's dtype (bf16 under bf16 autocast: a frozen weight needs no fp32 master copy, and autocast would cast
it to bf16 for every matmul anyway), but the embedding output is cast to fp32 so the residual stream stays
fp32 as in full fine-tuning; norm scales stay fp32 for stable statistics; the LoRA matrices are fp32 master
weights (peft upcasts them), so the optimizer and fp16 loss scaling see fp32 gradients. This is peft's
`prepare_model_for_kbit_training` minus its upcast of embeddings and head to fp32, which for Llama-3-8B would
cost 4.2 GB of frozen weights instead of 2.1 GB.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from trainer.adapters.base_identity import absolute_if_local
from trainer.adapters.quant import logical_numel
from trainer.adapters.targets import peft_targets
from trainer.model.causal_lm import CausalLM
from trainer.recipe.schema import AdapterConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"


def lora_config(adapter: AdapterConfig, model: CausalLM) -> Any:
    from peft import LoraConfig

    targets = peft_targets(model, adapter.target_modules, adapter.target_experts)
    # peft annotates lora_alpha as int but scales by alpha / r in floating point: a fractional alpha works
    return LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,  # type: ignore[arg-type]
                      target_modules=targets, use_dora=adapter.use_dora, bias="none", task_type="CAUSAL_LM")


def no_cpu_repacking(model: CausalLM) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight for an inference-only kernel at the first forward in eval
    mode without grad. After an evaluation every later training step would use that kernel, whose backward is wrong
    (gradients measured off by 100%, loss shifted), and for some shapes (hidden 128) it fails outright in
    generation. The plain dequantizing path is used instead, in training and inference alike."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_norm(module: nn.Module) -> bool:
    """A normalization layer (LayerNorm, RMSNorm, ...): its scales stay fp32 in an adapter run."""
    return "norm" in type(module).__name__.lower()


def prepare_frozen(model: CausalLM, gradient_checkpointing: bool) -> None:
    """Freeze every base weight, keep norm scales in fp32, and let checkpointed blocks see an input that needs
    grad (with the embeddings frozen nothing upstream of block 0 would otherwise require one)."""
    for p in model.parameters():
        p.requires_grad_(False)
    no_cpu_repacking(model)
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.float()
    embeddings = model.get_input_embeddings()
    if embeddings.weight.dtype != torch.float32:
        embeddings.register_forward_hook(_residual_stream_in_fp32)
    if gradient_checkpointing:
        model.enable_input_require_grads()


def _residual_stream_in_fp32(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """A bf16 embedding table would make the whole residual stream bf16: less precise than the fp32 stream
    of full fine-tuning, and slower on CPU (measured 1.4x the CPU time per step: bf16 elementwise ops); so the
    table stays in the compact dtype and its output, the start of the stream, is cast to fp32."""
    return output.float()


def attach(model: CausalLM, adapter: AdapterConfig, seed: int) -> CausalLM:
    """Wrap `model` in a peft model with fresh LoRA (or DoRA) weights; the same seed gives the same weights."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A is random (Kaiming); B starts at zero so the model is unchanged at step 0
        peft_model = get_peft_model(model, lora_config(adapter, model), autocast_adapter_dtype=True)
    return peft_model


def is_adapted(module: nn.Module) -> bool:
    """True for a model that trains adapters (its checkpoint holds only the adapter)."""
    if "peft" not in sys.modules:  # nothing imported peft, so nothing is a peft model: skip a 1 s import
        return False
    from peft import PeftModel

    return isinstance(module, PeftModel)


def adapters_disabled(module: nn.Module) -> ContextManager[Any]:
    """The base model as it was loaded, inside the same module: every LoRA layer skips its adapter for the forwards
    inside this context (peft's disable_adapter). A preference run's reference costs no copy of the base."""
    if not is_adapted(module):
        raise ValueError("adapters_disabled needs a model with LoRA adapters")
    return module.disable_adapter()  # type: ignore[operator]


def parameter_counts(model: CausalLM) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count the elements they stand for."""
    trainable = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return trainable, total


def adapter_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """The adapter's weights as peft saves them (adapter name stripped from the keys)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def save_adapter(model: CausalLM, directory: Path) -> None:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(base, directory)` loads. A local base is recorded (`base_model_name_or_path`) as an
    absolute path, so that the base is found from any working directory; a hub id as given."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    if config.base_model_name_or_path:
        config.base_model_name_or_path = absolute_if_local(config.base_model_name_or_path)
    config.save_pretrained(str(directory))


def load_adapter(model: CausalLM, directory: Path) -> None:
    """Put the weights of a saved adapter into `model` (same architecture and adapter settings); every
    trainable tensor must be restored, or resume would silently continue from fresh LoRA weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters() if p.requires_grad)
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter in {directory} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    unexpected = getattr(set_peft_model_state_dict(model, state), "unexpected_keys", [])
    assert not unexpected, unexpected
