"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, arXiv 2412.05270): AdamW's element-wise learning-rate
adaptation coarsened to a channel-wise (APOLLO) or tensor-wise (APOLLO-Mini, rank 1) scale, estimated from Adam
moments kept in a random rank-r projection of the gradient. The random projection strategy of the low-rank
family (trainer/optim/lowrank.py).

For a target W (m x n) with gradient G, projected on its smaller side (left when m < n; a square matrix on the
right, as apollo-torch's `std` projection does for m >= n):
- P (m x r) has i.i.d. N(0, 1/r) entries, drawn from a seed renewed every `update_gap` steps; the seed is the
  state, P is regenerated from it at every step and never stored;
- R = P^T G (r x n), M and V are Adam's moments of R, R~ = M^ / (sqrt(V^) + eps) with bias correction;
- channel-wise: s_j = ||R~[:, j]|| / ||R[:, j]|| for each of the n columns; tensor-wise: s = ||R~|| / ||R||
  (a guard of 1e-8 is added to the denominators, for columns whose gradient is zero);
- the update is the raw gradient scaled, U = G diag(s) (or s G); the norm-growth limiter (Fira) caps its growth,
  measured as apollo-torch measures it, before Adam's bias correction c_t = sqrt(1 - beta2^t) / (1 - beta1^t):
  when ||U_t|| / c_t > gamma x the last one it let through, U_t is rescaled to that (`norm_growth_limit` gamma,
  1.01);
- W <- (1 - lr * weight_decay) W - lr * alpha * U, alpha being `scale`.
For m >= n the roles of rows and columns swap (P is n x r, R = G P, one scale per row).

Both conventions for square matrices and both measuring points of the limiter are here (`square_channels`,
`limiter_measures`; no recipe key): benchmarks/apollo_conventions.py compares them on real training, and a run
resumed from a checkpoint written under the earlier ones (per column, after the correction) keeps them for each
target whose state was made so (`side_of`, `limiter_point`).

Moments are kept when the projection is renewed (as the paper and the authors' package do). Every other tensor
gets plain AdamW. The whole gradient is the update's input, so per-layer updates accumulate and all-reduce it at
full size and clip it as it is. State per target: a float64 step, the int64 seed, the limiter's previous norm
(fp32) and two low-rank moments: for APOLLO-Mini two 1 x n vectors, about SGD's memory.
"""

from __future__ import annotations

import logging
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
    Side,
    project,
    state_shapes,
)

SCALE_TYPES = ("channel", "tensor")
SQUARE_CHANNELS = ("rows", "columns")  # the channels of a square matrix that get a scale each
LIMITER_POINTS = ("before_correction", "after_correction")  # where the norm-growth limiter measures
# the limiter's stored norm, keyed by where it was measured (a run keeps its target's point: see limiter_point)
LIMITER_NORM_KEYS = {"before_correction": "limiter_norm", "after_correction": "scaled_norm"}
APOLLO_KEYS = ("update_gap", "scale", "scale_type", "norm_growth_limit", "square_channels", "limiter_measures")
GUARD = 1e-8  # added to norms that divide (a zero gradient channel)

log = logging.getLogger(__name__)


def projection_seed(step: int, shape: tuple[int, int] | torch.Size, name: str) -> int:
    """The seed of a target's projection from `step` on: the same on every rank and after resume, and different
    for two matrices of one shape when they have names (the builder names every parameter)."""
    m, n = shape
    return (step * 1_000_003 + m * 7_919 + n + zlib.crc32(name.encode()) * 65_537) % (2**62)


def random_projection(rows: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """rows x rank, i.i.d. N(0, 1/rank): drawn from a generator on `device` seeded by `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rows, rank, generator=gen, device=device) / math.sqrt(rank)


def apollo_side(shape: tuple[int, ...] | torch.Size, square_channels: str) -> Side:
    """The side an m x n target projects: the smaller one (left when m < n: one scale per column); a square
    matrix's by `square_channels` (rows: the right side, as apollo-torch's `std` projects when m >= n)."""
    m, n = shape
    if m == n:
        return "right" if square_channels == "rows" else "left"
    return "left" if m < n else "right"


def side_of(state: dict[str, Any], group: dict[str, Any], shape: torch.Size) -> Side:
    """The side a target projects. A square target whose moments exist keeps the side they were made with (an
    r x n moment is a left projection's), so a run resumed from a checkpoint of an older convention goes on as
    it started; a new one takes the group's `square_channels`."""
    if "exp_avg" in state and shape[0] == shape[1]:
        rows, cols = state["exp_avg"].shape
        return "left" if rows < cols else "right"
    return apollo_side(shape, group["square_channels"])


def projection_of(shape: torch.Size, side: Side, rank: int, seed: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(left, right) projection of an m x n target: one of them, on `side`."""
    m, n = shape
    if side == "left":
        return random_projection(m, rank, seed, device), None
    return None, random_projection(n, rank, seed, device)


def bias_correction(betas: tuple[float, float], step: int) -> float:
    """Adam's bias correction of the direction at `step`: sqrt(1 - beta2^t) / (1 - beta1^t), the factor between
    M^ / sqrt(V^) and the uncorrected M / sqrt(V)."""
    beta1, beta2 = betas
    return math.sqrt(1 - beta2**step) / (1 - beta1**step)


def limiter_point(state: dict[str, Any], group: dict[str, Any]) -> str:
    """Where the limiter measures a target's update: where its stored norm was measured (a run resumed from a
    checkpoint of an older convention keeps it), else the group's `limiter_measures`."""
    for point, key in LIMITER_NORM_KEYS.items():
        if key in state:
            return point
    return group["limiter_measures"]


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
    assert rank is not None  # a target has a rank
    m, n = shape  # and is a matrix
    _, low = state_shapes((m, n), rank, apollo_side((m, n), "rows"))  # r x n or n x r: the same bytes
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
        side = side_of(state, group, consumed.shape)
        left, right = projection_of(consumed.shape, side, group["rank"], int(state["proj_seed"]), consumed.device)
        return project(consumed.float(), left, right)

    def update(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor, low: Tensor,
               direction: Tensor) -> tuple[ScaledGradient, float]:
        """G scaled by the channel-wise or tensor-wise ratio ||R~|| / ||R||, then norm-growth limited."""
        grad = consumed.float()
        if group["scale_type"] == "channel":
            side = side_of(state, group, grad.shape)
            factor = channel_norms(direction, side) / (channel_norms(low, side) + GUARD)
            norm = (channel_norms(grad, side) * factor).norm()
        else:
            factor = direction.norm() / (low.norm() + GUARD)
            norm = grad.norm() * factor
        factor = factor * self._limit(state, group, norm)
        return ScaledGradient(consumed, factor), group["scale"]

    @staticmethod
    def _limit(state: dict[str, Any], group: dict[str, Any], norm: Tensor) -> Tensor:
        """1, or the factor that brings the update's measured norm down to gamma x the last one let through
        (which it remembers). `norm` is ||U_t|| with Adam's bias correction in it; measured before the
        correction (apollo-torch's point) it is ||U_t|| / bias_correction(t)."""
        gamma = group["norm_growth_limit"]
        if gamma is None:
            return torch.ones((), device=norm.device)
        point = limiter_point(state, group)
        key = LIMITER_NORM_KEYS[point]
        measured = norm if point == "after_correction" else norm / bias_correction(group["betas"], int(state["step"]))
        if key not in state:
            state[key] = measured.detach().float().reshape(())
            return torch.ones((), device=norm.device)
        shrink = torch.clamp(measured / (state[key] + GUARD), min=gamma) / gamma
        state[key].copy_(measured / shrink)
        return 1 / shrink

    def state_shapes(self, shape: torch.Size, group: dict[str, Any],
                     state: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], tuple[int, int]]:
        _, low = state_shapes(shape, group["rank"], side_of(state, group, shape))
        limiter_key = LIMITER_NORM_KEYS[limiter_point(state, group)]
        return {"proj_seed": (), limiter_key: ()}, low


class ApolloAdamW(LowRankAdamW):
    """AdamW with APOLLO's structured scaling for the parameter groups that set `rank`: the low-rank family's
    optimizer with the random projection strategy. APOLLO-Mini is rank 1 with scale_type `tensor`.
    `square_channels` and `limiter_measures` default to apollo-torch's conventions, which measured better on
    real training (README, "Low-rank optimizer state"); the others stay for comparison and for old checkpoints."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", norm_growth_limit: float | None = 1.01,
                 bits: int = 32, min_8bit_size: int = MIN_8BIT_SIZE, square_channels: str = "rows",
                 limiter_measures: str = "before_correction") -> None:
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}, got {scale_type!r}")
        if square_channels not in SQUARE_CHANNELS:
            raise ValueError(f"square_channels must be one of {', '.join(SQUARE_CHANNELS)}, got {square_channels!r}")
        if limiter_measures not in LIMITER_POINTS:
            raise ValueError(f"limiter_measures must be one of {', '.join(LIMITER_POINTS)}, got {limiter_measures!r}")
        if norm_growth_limit is not None and norm_growth_limit < 1:
            raise ValueError(f"norm_growth_limit must be >= 1 (or None: off), got {norm_growth_limit}")
        super().__init__(params, RandomProjection(), dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap,
            scale=scale, scale_type=scale_type, norm_growth_limit=norm_growth_limit, bits=bits,
            min_8bit_size=min_8bit_size, square_channels=square_channels, limiter_measures=limiter_measures))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The family's loader; then says which targets keep conventions other than this optimizer's (a
        checkpoint written before they changed: each target goes on as it started, see side_of and
        limiter_point)."""
        super().load_state_dict(state_dict)
        kept_side, kept_point = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if not self.is_target(p) or "exp_avg" not in state:
                    continue
                if side_of(state, group, p.shape) != apollo_side(p.shape, group["square_channels"]):
                    kept_side.append(self.name_of(p))
                if limiter_point(state, group) != group["limiter_measures"]:
                    kept_point.append(self.name_of(p))
        if kept_side:
            kept = "column" if self.defaults["square_channels"] == "rows" else "row"
            log.info("APOLLO: %d square matrices (%s, ...) resume with one scale per %s, as their checkpoint was "
                     "written; new runs scale square matrices per %s", len(kept_side), kept_side[0], kept,
                     self.defaults["square_channels"][:-1])
        if kept_point:
            kept = next(point for point in LIMITER_POINTS if point != self.defaults["limiter_measures"])
            log.info("APOLLO: %d matrices (%s, ...) resume with the norm-growth limiter measuring %s Adam's bias "
                     "correction, as their checkpoint was written; new runs measure %s it", len(kept_point),
                     kept_point[0], kept.split("_")[0], self.defaults["limiter_measures"].split("_")[0])
