"""Loading the frozen base of an adapter run one module at a time, each module handed to the engine as soon as its
weights are in place, so that an engine that partitions parameters (DeepSpeed ZeRO-3) never holds the whole base on
one rank.

Why not `from_pretrained`: under ZeRO-3, transformers builds a non-quantized model inside `deepspeed.zero.Init`
(partitioned as it loads), but a quantized one it loads whole on every rank (and refuses a device map there). A 70B
model in 4 bits is about 37 GiB: more than a 24 GiB card, on every rank. Here the skeleton is built without storage
(parameters on the meta device, buffers real), transformers' own quantizer swaps in the 4-bit layers, then for each
module that owns parameters the tensors are read from the checkpoint's safetensors files, cast and quantized
exactly as `from_pretrained` does it (tests/test_adapters_deepspeed.py compares the 4-bit codes bit for bit), and
the module goes to `partition` (the engine's: ZeRO-3 splits each tensor over the ranks and frees the whole copy).
At any moment a rank holds its partitions plus one module's whole weights.

A mixture-of-experts base has its fused experts split into one linear layer per expert first (adapters/experts.py),
so that they are quantized like every other linear layer; each expert's weight is read from the checkpoint alone
(one row of the fused tensor, or the hub's per-expert tensors), never the whole layer's experts at once.

The dtypes are those of the adapter path after `prepare_frozen` (trainer/adapters/lora.py): quantized linear
weights as 4-bit codes in `quant.storage_dtype`, norm scales in fp32, every other frozen weight in the precision's
dtype. They are set before partitioning because a partitioned parameter cannot be cast any more.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trainer.adapters.experts import ExpertSource, mixtral_name, read_expert, sources, split_experts as split
from trainer.adapters.lora import is_norm
from trainer.model.causal_lm import CausalLM

log = logging.getLogger(__name__)

Partition = Callable[[nn.Module], None]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_folder(name_or_path: str, revision: str | None) -> Path:
    """The folder holding a model's config and safetensors: a local directory as given, or a hub model's snapshot
    (downloaded into the hub cache if it is not there yet)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a saved model (one file, or shards with an index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: loading the base one module at a time "
                         "reads safetensors checkpoints; re-save the model with save_pretrained")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def skeleton(config: Any, dtype: torch.dtype, quantization_config: Any, trust_remote_code: bool,
             split_experts: bool = False) -> CausalLM:
    """The causal LM with every parameter on the meta device (no storage) and its buffers computed as its own
    `__init__` computes them; `split_experts`: fused MoE experts replaced by one linear layer per expert; with a
    quantization config, its linear layers replaced by transformers' quantizer exactly as `from_pretrained` replaces
    them (same layers, same settings, the head kept)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied head is the embedding's tensor (no_init_weights skips the tying), loaded once
    if split_experts:
        split(model, copy_weights=False)
    if quantization_config is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None,
                                   use_kernels=False)
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    return model


class CheckpointReader:
    """Reads single tensors out of safetensors files, keeping each file open once."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def read(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def read_row(self, name: str, index: int) -> torch.Tensor:
        """`tensor[index]` read alone (one expert of a fused experts tensor)."""
        return self._file(name).get_slice(name)[index]

    def close(self) -> None:
        self._open.clear()


def _materialize(module: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> nn.Parameter:
    """The frozen parameter `module.<key>` holding `value`: 4-bit codes for a quantized layer's weight (quantized on
    `device`, as transformers' Bnb4bitQuantize does), fp32 for a norm scale, `dtype` for the rest."""
    old = module._parameters[key]
    if type(old).__name__ == "Params4bit":
        import bitsandbytes as bnb

        settings = {k: v for k, v in old.__dict__.items() if k not in ("data", "requires_grad")}
        value = value.to(device=device, dtype=dtype)
        quantized: Any = bnb.nn.Params4bit(value, requires_grad=False, **settings)
        return quantized.to(device)
    target = torch.float32 if is_norm(module) and value.is_floating_point() else dtype
    return nn.Parameter(value.to(device=device, dtype=target), requires_grad=False)


def _read(reader: CheckpointReader, name: str, split: dict[str, ExpertSource]) -> torch.Tensor | None:
    """The checkpoint's value of parameter `name`: one split expert's weight, the tensor of that name, or Mixtral's
    under its hub name; None when the checkpoint has none."""
    if name in split:
        try:
            return read_expert(split[name], reader)
        except KeyError:
            return None
    for candidate in (name, mixtral_name(name)):
        if candidate in reader:
            return reader.read(candidate)
    return None


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, in model order, each once."""
    return [(name, m) for name, m in model.named_modules() if m._parameters]


def load_streamed(model: nn.Module, files: dict[str, Path], dtype: torch.dtype, device: torch.device,
                  partition: Partition | None) -> None:
    """Fill every meta parameter of `model` from the checkpoint, module by module, calling `partition` on each
    module once its parameters are loaded (tied parameters are loaded once and shared). Buffers move to `device`."""
    reader = CheckpointReader(files)
    loaded: dict[int, nn.Parameter] = {}  # id of the meta placeholder -> its loaded parameter (ties share it)
    missing: list[str] = []
    split_sources = sources(model)
    try:
        for name, module in _owners(model):
            for key, old in list(module._parameters.items()):
                if old is None:
                    continue
                full = f"{name}.{key}" if name else key
                if id(old) in loaded:
                    module._parameters[key] = loaded[id(old)]
                    continue
                value = _read(reader, full, split_sources)
                if value is None:
                    missing.append(full)
                else:
                    module._parameters[key] = loaded[id(old)] = _materialize(module, key, value, dtype, device)
            if missing:
                break
            for key, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
            if partition is not None:
                partition(module)
    finally:
        reader.close()
    if missing:
        raise ValueError(f"the checkpoint has no tensor named {missing[0]} (tensor names must match the model's "
                         "parameters, as in a checkpoint written by save_pretrained); re-save the base with "
                         "save_pretrained")
    for module in model.modules():  # modules without parameters (rotary embeddings) hold buffers too
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def load_base(folder: Path, config: Any, quantization_config: Any, dtype: torch.dtype, device: torch.device,
              partition: Partition | None, *, split_experts: bool, trust_remote_code: bool) -> CausalLM:
    """An adapter run's base read module by module from `folder` onto `device` (each module handed to `partition`
    once loaded), with the generation defaults `from_pretrained` would give it."""
    from transformers import GenerationConfig

    model = skeleton(config, dtype, quantization_config, trust_remote_code, split_experts)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    load_streamed(model, checkpoint_files(folder), dtype, device, partition)
    return model
