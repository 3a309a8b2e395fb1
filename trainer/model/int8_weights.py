"""INT8 master weights with stochastic rounding (`precision.weights: int8`, after Q-GaLore, arXiv 2407.08296).

The weight of each low-rank target (the linear layers GaLore or APOLLO project) is kept as INT8 with one scale
per output row (absmax / 127), in torchao's quantized-training tensor (`Int8QuantizedTrainingLinearWeight`,
torchao.prototype.quantized_training): it is a trainable parameter whose forward and backward dequantize the
layer on the fly (the dequantized copy lives only inside the matmul), and whose gradient is an ordinary
tensor of the scale's dtype. torchao runs on this stack on CPU and GPU. What it lacks here is written in this
module:
- its linear function ignores autocast (in backward a bf16 input meets an fp32 output gradient and the matmul
  fails), so `Int8Linear` replaces it through torchao's own registration hook: the matmuls run in the autocast
  dtype when autocast is on, and backward casts to the dtype forward used;
- its in-place update ops round with the global RNG (different on each rank, moved by every update) and it has
  no `mul_` (weight decay), so the low-rank family writes every update itself (`write`): the new value
W' = (1 - lr * decay) W + update is formed in fp32 and re-quantized with stochastic rounding,
q = floor(W' / s + u), u ~ U[0, 1) from a generator seeded per parameter and step, so E[q s] = W' exactly and
an update smaller than one INT8 step still moves the weight in expectation. The scale s of each row is rounded
up to its dtype, so |W' / s| <= 127 and no value is clipped (clipping would bias the rounding).

Checkpoints: `model.safetensors` keeps the dequantized weights (what export, generate and chat read), and
INT8_FILE the INT8 values and scales, which a resume restores exactly.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Protocol, cast

import torch
from torch import Tensor, nn

INT8_FILE = "int8-weights.safetensors"
LEVELS = 127  # symmetric: q in [-127, 127]
SUFFIXES = (".int_data", ".scale")


class Int8Weight(Protocol):
    """What this module reads of torchao's INT8 training weight: its INT8 values and one scale per row."""

    int_data: Tensor
    scale: Tensor


def int8(t: Tensor) -> Int8Weight:
    """An INT8 training weight seen as its parts (the caller checked `is_int8`)."""
    return cast(Int8Weight, t)


def is_int8(t: Any) -> bool:
    """A torchao INT8 training weight (checked by name: torchao is imported only by runs that use it)."""
    return type(t).__name__ == "Int8QuantizedTrainingLinearWeight"


class Int8Linear(torch.autograd.Function):
    """y = x W^T + b for an INT8 weight W = q s, in the autocast dtype when autocast is on: the INT8 values are
    cast to the compute dtype inside the matmul (one layer at a time) and the row scales applied to its output.
    Saves the input in the compute dtype, as autocast's own matmul would."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            xc = x.to(dtype)
            w = int8(weight)
            out = (xc @ w.int_data.T.to(dtype)) * w.scale.to(dtype)
            if bias is not None:
                out = out + bias.to(dtype)
        ctx.save_for_backward(xc, weight)
        ctx.input_dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        xc, weight = ctx.saved_tensors
        grad = grad.to(xc.dtype)
        rows, cols = weight.shape
        w = int8(weight)
        grad_input = ((grad * w.scale.to(grad.dtype)) @ w.int_data.to(grad.dtype)).to(ctx.input_dtype)
        grad_weight = grad.reshape(-1, rows).T @ xc.reshape(-1, cols)
        grad_bias = grad.reshape(-1, rows).sum(0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias


def _linear(func: Any, types: Any, args: Any, kwargs: Any) -> Tensor:
    return Int8Linear.apply(*args, **(kwargs or {}))


def _int8_weight_class() -> Any:
    """torchao's INT8 training weight, with our linear registered. Its import logs notices that concern kernels
    this module does not use (CUDA-only extensions, Triton, torch.compile registrations): silenced."""
    noisy = [logging.getLogger(n) for n in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.prototype.quantized_training.int8 import Int8QuantizedTrainingLinearWeight
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
    Int8QuantizedTrainingLinearWeight.implements_torch_function(nn.functional.linear)(_linear)
    return Int8QuantizedTrainingLinearWeight


def quantize_weights(model: nn.Module, weights: Iterable[nn.Parameter]) -> int:
    """Replace each given linear weight of `model` by an INT8 training weight (round to nearest, once);
    returns how many were replaced."""
    Int8QuantizedTrainingLinearWeight = _int8_weight_class()

    chosen = {id(w) for w in weights}
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in chosen and not is_int8(weight):
            int8 = Int8QuantizedTrainingLinearWeight.from_float(weight.detach())
            module.weight = nn.Parameter(int8, requires_grad=weight.requires_grad)
            count += 1
    return count


def dequantize(p: Tensor) -> Tensor:
    """The weight's value in fp32 (a new tensor)."""
    w = int8(p)
    return w.int_data.float() * w.scale.float().unsqueeze(1)


def row_scales(value: Tensor, dtype: torch.dtype) -> Tensor:
    """absmax / 127 of each row, rounded up to `dtype` so that no |value / scale| exceeds 127."""
    exact = value.abs().amax(dim=1).clamp_min(1e-12) / LEVELS
    scale = exact.to(dtype)
    low = scale.float() < exact
    return torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)


def stochastic_round(value: Tensor, scale: Tensor, generator: torch.Generator) -> Tensor:
    """int8 q with E[q] = value / scale (row-wise), drawing u ~ U[0, 1) from `generator`."""
    x = value / scale.float().unsqueeze(1)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (x + u).floor_().clamp_(-LEVELS, LEVELS).to(torch.int8)


def write(p: Tensor, value: Tensor, seed: int) -> None:
    """Store `value` (fp32, p's shape) into the INT8 weight p with stochastic rounding seeded by `seed`."""
    generator = torch.Generator(device=value.device).manual_seed(seed)
    w = int8(p)
    scale = row_scales(value, w.scale.dtype)
    w.int_data.copy_(stochastic_round(value, scale, generator))
    w.scale.copy_(scale)


def weight_bytes(t: Tensor) -> int:
    """Bytes a weight really holds: INT8 values plus scales for an INT8 weight, else its storage."""
    if is_int8(t):
        w = int8(t)
        return w.int_data.numel() + w.scale.numel() * w.scale.element_size()
    return t.numel() * t.element_size()


def expected_bytes(shape: tuple[int, ...], scale_bytes: int) -> int:
    """Bytes of an INT8 weight of this shape: one byte per element and one scale per row."""
    rows, cols = shape
    return rows * cols + rows * scale_bytes


def all_finite(p: Tensor) -> bool:
    """Whether a weight is finite (an INT8 weight is, when its scales are)."""
    return bool(torch.isfinite(int8(p).scale if is_int8(p) else p).all())


def int8_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if is_int8(p)]


def _stored_names(state: dict[str, Tensor]) -> list[str]:
    """Names of a state dict as safetensors stores them: a tensor shared by two names (tied embeddings) once."""
    out, seen = [], set()
    for name, t in state.items():
        key = id(t) if is_int8(t) else t.data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with each INT8 weight dequantized to its scale's dtype (what export reads)."""
    state = model.state_dict()
    return {name: dequantize(state[name]).to(int8(state[name]).scale.dtype) if is_int8(state[name])
            else state[name].contiguous() for name in _stored_names(state)}


def shared_names(model: nn.Module) -> set[str]:
    """Names plain_state_dict leaves out because another name holds the same tensor."""
    state = model.state_dict()
    return set(state) - set(_stored_names(state))


def int8_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The INT8 values and scales of every INT8 weight, for an exact resume."""
    out = {}
    for name, p in model.named_parameters():
        if is_int8(p):
            w = int8(p)
            out[name + ".int_data"] = w.int_data
            out[name + ".scale"] = w.scale
    return out


@torch.no_grad()
def load_int8_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Restore INT8 values and scales saved by `int8_tensors` (bit for bit)."""
    names = int8_names(model)
    missing = [n for n in names if n + ".int_data" not in tensors]
    if missing or len(tensors) != 2 * len(names):
        raise ValueError(f"the checkpoint's INT8 weights ({len(tensors) // 2}) do not match the model's "
                         f"({len(names)}; first missing: {missing[:1]}): it was saved with other "
                         "precision.weights or targets")
    params = dict(model.named_parameters())
    for name in names:
        w = int8(params[name])
        w.int_data.copy_(tensors[name + ".int_data"])
        w.scale.copy_(tensors[name + ".scale"])
