"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, arXiv 2412.05270): AdamW's element-wise learning-rate
adaptation coarsened to a channel-wise (APOLLO) or tensor-wise (APOLLO-Mini, rank 1) scale, estimated from Adam
moments kept in a random rank-r projection of the gradient. The random projection strategy of the low-rank
family (trainer/optim/lowrank.py).

For a target W (m x n) with gradient G, projected on its smaller side like GaLore's `std` (left when m <= n):
- P (m x r) has i.i.d. N(0, 1/r) entries, drawn from a seed renewed every `update_gap` steps; the seed is the
  state, P is regenerated from it at every step and never stored;
- R = P^T G (r x n), M and V are Adam's moments of R, R~ = M^ / (sqrt(V^) + eps) with bias correction;
- channel-wise: s_j = ||R~[:, j]|| / ||R[:, j]|| for each of the n columns; tensor-wise: s = ||R~|| / ||R||
  (a guard of 1e-8 is added to the denominators, for columns whose gradient is zero);
- the update is the raw gradient scaled, U = G diag(s) (or s G); the norm-growth limiter (Fira) caps its growth:
  when ||U_t|| > gamma ||U_{t-1}||, U_t is rescaled to gamma ||U_{t-1}|| (`norm_growth_limit` gamma, 1.01);
- W <- (1 - lr * weight_decay) W - lr * alpha * U, alpha being `scale`.
For m > n the roles of rows and columns swap (P is n x r, R = G P, one scale per row).

Moments are kept when the projection is renewed (as the paper and the authors' package do). Every other tensor
gets plain AdamW. The whole gradient is the update's input, so per-layer updates accumulate and all-reduce it at
full size and clip it as it is. State per target: a float64 step, the int64 seed, the limiter's previous norm
(fp32) and two low-rank moments: for APOLLO-Mini two 1 x n vectors, about SGD's memory.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.lowrank import (
    MIN_8BIT_SIZE,
    LowRankAdamW,
    is_target_shape,
    moment_bytes,
    project,
    projection_side,
    state_shapes,
)

SCALE_TYPES = ("channel", "tensor")
APOLLO_KEYS = ("update_gap", "scale", "scale_type", "norm_growth_limit")
GUARD = 1e-8  # added to norms that divide (a zero gradient channel)


def projection_seed(step: int, shape: tuple[int, int] | torch.Size, name: str) -> int:
    """The seed of a target's projection from `step` on: the same on every rank and after resume, and different
    for two matrices of one shape when they have names (the builder names every parameter)."""
    m, n = shape
    return (step * 1_000_003 + m * 7_919 + n + zlib.crc32(name.encode()) * 65_537) % (2**62)


def random_projection(rows: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """rows x rank, i.i.d. N(0, 1/rank): drawn from a generator on `device` seeded by `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rows, rank, generator=gen, device=device) / math.sqrt(rank)


def projection_of(shape: tuple[int, int] | torch.Size, rank: int, seed: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(left, right) projection of an m x n target: one of them, on its smaller side."""
    m, n = shape
    if projection_side(shape, "std") == "left":
        return random_projection(m, rank, seed, device), None
    return None, random_projection(n, rank, seed, device)


def channel_norms(x: Tensor, side: str) -> Tensor:
    """Norms of the channels the projection keeps: columns (n of them) after a left projection, rows after a
    right one, shaped to broadcast over the weight."""
    return x.norm(dim=0, keepdim=True) if side == "left" else x.norm(dim=1, keepdim=True)


@dataclass
class ScaledGradient:
    """APOLLO's update G * factor (factor: per channel, or one number), kept unmultiplied until written."""

    grad: Tensor
    factor: Tensor

    def add_to(self, p: Tensor, alpha: float, beta: float) -> None:
        p.mul_(beta).addcmul_(self.grad, self.factor.to(p.dtype), value=alpha)

    def full(self) -> Tensor:
        return self.grad.float() * self.factor


def expected_state_bytes(shape: tuple[int, ...], rank: int | None, limiter: bool = True, bits: int = 32,
                         min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """State bytes ApolloAdamW holds for one parameter: 8 (float64 step) + for a target 8 (int64 projection
    seed) + 4 (the limiter's previous norm) + two low-rank moments; plain AdamW otherwise."""
    numel = math.prod(shape)
    if not is_target_shape(shape, rank):
        return 8 + 2 * moment_bytes(numel, bits, min_8bit_size)
    _, low = state_shapes(shape, rank, projection_side(shape, "std"))  # type: ignore[arg-type]
    return 8 + 8 + (4 if limiter else 0) + 2 * moment_bytes(low[0] * low[1], bits, min_8bit_size)


class RandomProjection:
    """APOLLO's strategy (see the module docstring)."""

    name = "APOLLO"
    keys = APOLLO_KEYS

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return True  # the update scales the raw gradient

    def refresh(self, opt: LowRankAdamW, p: Tensor, grad: Tensor) -> None:
        """A new projection seed every `update_gap` steps (and on the first)."""
        state, group = opt.state[p], opt._group_of(p)
        step = int(state["step"])
        if "proj_seed" not in state or step % group["update_gap"] == 0:
            seed = projection_seed(step, p.shape, opt.name_of(p))
            state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)

    def consumed(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        return grad

    def low_rank(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor) -> Tensor:
        """R = P^T G (or G P) with P regenerated from the stored seed."""
        left, right = projection_of(consumed.shape, group["rank"], int(state["proj_seed"]), consumed.device)
        return project(consumed.float(), left, right)

    def update(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor, low: Tensor,
               direction: Tensor) -> tuple[ScaledGradient, float]:
        """G scaled by the channel-wise or tensor-wise ratio ||R~|| / ||R||, then norm-growth limited."""
        grad = consumed.float()
        if group["scale_type"] == "channel":
            side = projection_side(grad.shape, "std")
            factor = channel_norms(direction, side) / (channel_norms(low, side) + GUARD)
            norm = (channel_norms(grad, side) * factor).norm()
        else:
            factor = direction.norm() / (low.norm() + GUARD)
            norm = grad.norm() * factor
        factor = factor * self._limit(state, group["norm_growth_limit"], norm)
        return ScaledGradient(consumed, factor), group["scale"]

    @staticmethod
    def _limit(state: dict[str, Any], gamma: float | None, norm: Tensor) -> Tensor:
        """1, or the factor that brings ||U_t|| down to gamma ||U_{t-1}||; remembers the norm it lets through."""
        if gamma is None:
            return torch.ones((), device=norm.device)
        if "scaled_norm" not in state:
            state["scaled_norm"] = norm.detach().float().reshape(())
            return torch.ones((), device=norm.device)
        shrink = torch.clamp(norm / (state["scaled_norm"] + GUARD), min=gamma) / gamma
        state["scaled_norm"].copy_(norm / shrink)
        return 1 / shrink

    def state_shapes(self, shape: torch.Size, group: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]],
                                                                              tuple[int, int]]:
        _, low = state_shapes(shape, group["rank"], projection_side(shape, "std"))
        return {"proj_seed": (), "scaled_norm": ()}, low


class ApolloAdamW(LowRankAdamW):
    """AdamW with APOLLO's structured scaling for the parameter groups that set `rank`: the low-rank family's
    optimizer with the random projection strategy. APOLLO-Mini is rank 1 with scale_type `tensor`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", norm_growth_limit: float | None = 1.01,
                 bits: int = 32, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}, got {scale_type!r}")
        if norm_growth_limit is not None and norm_growth_limit < 1:
            raise ValueError(f"norm_growth_limit must be >= 1 (or None: off), got {norm_growth_limit}")
        super().__init__(params, RandomProjection(), dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap,
            scale=scale, scale_type=scale_type, norm_growth_limit=norm_growth_limit, bits=bits,
            min_8bit_size=min_8bit_size))
