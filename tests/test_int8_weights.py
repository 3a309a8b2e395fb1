"""INT8 master weights (precision.weights: int8): stochastic rounding is unbiased, updates smaller than one INT8
step still move the weights, the autocast-aware INT8 linear computes what the dequantized layer computes, and
the optimizer's write is seeded (same on every call, no global RNG)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.model import int8_weights
from trainer.optim.apollo import ApolloAdamW
from trainer.optim.galore import GaLoreAdamW

pytestmark = pytest.mark.usefixtures("one_thread")


def int8_linear(rows: int = 32, cols: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=True)
    assert int8_weights.quantize_weights(layer, [layer.weight]) == 1
    return layer


def test_stochastic_rounding_is_unbiased() -> None:
    """4000 roundings of one fp32 matrix: the mean of the dequantized values is within 0.03 INT8 steps of the
    exact value everywhere (4.2 standard errors: a rounding's spread is at most 0.5 step, / sqrt(4000)), while
    rounding to nearest is off by up to half a step."""
    layer = int8_linear()
    p = layer.weight
    value = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    total = torch.zeros_like(value, dtype=torch.float64)
    n = 4000
    for seed in range(n):
        int8_weights.write(p, value, seed)
        total += int8_weights.dequantize(p).double()
    step = int8_weights.row_scales(value, p.scale.dtype).double().unsqueeze(1)
    bias = ((total / n - value.double()) / step).abs().max()
    assert bias < 0.03, float(bias)
    nearest = (value / step).round() * step
    assert ((nearest - value.double()) / step).abs().max() > 0.4  # what deterministic rounding would leave


def test_scales_are_rounded_up_so_nothing_clips() -> None:
    """bf16 scales: absmax / 127 rounded to bf16 may come out below it; the scale is rounded up instead, so
    every |value / scale| <= 127 and the largest element's rounding stays unbiased."""
    value = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 3
    scale = int8_weights.row_scales(value, torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    assert (value.abs() / scale.float().unsqueeze(1)).max() <= 127
    exact = value.abs().amax(1) / 127
    assert ((scale.float() - exact) / exact).max() < 2 ** -7  # at most one bf16 ulp above


@pytest.mark.parametrize("make", ["galore", "apollo"])
def test_updates_below_one_int8_step_still_move_the_weights(make: str) -> None:
    """A fixed gradient, 300 steps whose every update is below 0.1 INT8 step (rounding to nearest would leave
    every weight where it is): the INT8 weight moves like the fp32 one. Its change, projected on the fp32
    change, is 1 +- 0.02 of it (unbiased rounding gives 1; the rounding noise, up to the size of the signal per
    weight, averages out over 131072 weights to about 0.003), and the two changes point the same way (cosine >
    0.5: about 0.6 for GaLore's smaller updates, 0.9 for APOLLO's)."""
    init = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    cls = GaLoreAdamW if make == "galore" else ApolloAdamW
    changes = {}
    for kind in ("fp32", "int8"):
        layer = nn.Linear(512, 256, bias=False)
        layer.weight.data.copy_(init)
        if kind == "int8":
            int8_weights.quantize_weights(layer, [layer.weight])
        p = layer.weight
        value = (lambda: int8_weights.dequantize(p)) if kind == "int8" else (lambda: p.detach().clone())
        opt = cls([{"params": [p], "rank": 8}], lr=1e-3, update_gap=1000)
        start, largest = value(), 0.0
        for _ in range(300):
            before = value()
            p.grad = grad.clone()
            opt.step()
            if kind == "fp32":
                step = int8_weights.row_scales(before, torch.float32).unsqueeze(1)
                largest = max(largest, float(((value() - before) / step).abs().max()))
        changes[kind] = (value() - start).flatten()
        if kind == "fp32":
            assert largest < 0.1, largest
    fp32, int8 = changes["fp32"], changes["int8"]
    assert float(int8 @ fp32 / (fp32 @ fp32)) == pytest.approx(1.0, abs=0.02)
    assert float(torch.nn.functional.cosine_similarity(int8, fp32, dim=0)) > 0.5


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_int8_linear_matches_the_dequantized_layer(autocast: bool) -> None:
    """Forward and backward of the INT8 layer equal those of an ordinary linear layer holding its dequantized
    weight (fp32: to 1e-5; under bf16 autocast both run in bf16: to bf16 precision), and the weight's gradient
    is an ordinary tensor of the scale's dtype."""
    layer = int8_linear()
    plain = nn.Linear(48, 32)
    plain.weight.data.copy_(int8_weights.dequantize(layer.weight))
    plain.bias.data.copy_(layer.bias.data)
    x = torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for module in (layer, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        (y.float() ** 2).sum().backward()
        outs.append(y.float())
        grads.append((xi.grad, module.weight.grad, module.bias.grad))
    tol = 2e-2 if autocast else 1e-6  # relative to the tensor's norm: bf16 keeps 8 bits
    for a, b in [(outs[0], outs[1]), *zip(*grads)]:
        assert a.dtype == b.dtype
        assert float((a.float() - b.float()).norm() / b.float().norm()) < tol
    assert type(layer.weight.grad) is torch.Tensor and layer.weight.grad.dtype == torch.float32


def test_optimizer_write_is_seeded_and_leaves_the_global_rng_alone() -> None:
    """The same run twice gives the same INT8 values, and the updates draw nothing from torch's global RNG (the
    rounding uses generators seeded by step and parameter, the same on every rank and after a resume)."""
    def run() -> torch.Tensor:
        layer = int8_linear(seed=5)
        opt = ApolloAdamW([{"params": [layer.weight], "rank": 4}], lr=1e-2)
        before = torch.get_rng_state()
        for i in range(3):
            layer.weight.grad = torch.randn(32, 48, generator=torch.Generator().manual_seed(i))
            opt.step()
        assert torch.equal(torch.get_rng_state(), before)
        return layer.weight.int_data.clone()

    assert torch.equal(run(), run())
