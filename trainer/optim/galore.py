"""GaLore (Zhao et al., ICML 2024): AdamW whose moments live in a rank-r projection of each weight's gradient.

For a target matrix W (m x n) with gradient G, a projector is refreshed every `update_gap` optimizer steps from
the SVD of the fp32 gradient of that step, G = U S V^T:
- side `left` keeps P = U[:, :r] (m x r); the optimizer sees R = P^T G (r x n) and the update is P N;
- side `right` keeps Q = V[:, :r] (n x r); R = G Q (m x r), update N Q^T;
- side `both` (proj_type `full`) keeps P and Q; R = P^T G Q (r x r), update P N Q^T.
proj_type `std` projects the smaller side (left when m <= n), `reverse_std` the larger, `left`/`right` always
that side. Adam runs on R: its moments have R's shape, so state per target is the projector plus two
low-rank moments (mr + 2nr elements for std with m <= n). The normalized Adam direction N is projected back,
multiplied by `scale`, and applied with the learning rate; decoupled weight decay acts on the full weight.

When the projector changes, the moments are kept as they are (as the paper does): they were accumulated in the
old basis, and the bias-corrected step counter keeps running. Since a singular vector's sign is arbitrary, each
new column takes the sign that agrees with the old column it replaces, so a kept moment does not meet a
flipped axis (this changes no subspace, only signs). Every other parameter (embeddings, norms, biases,
LM head, matrices whose smaller side is <= rank) gets plain AdamW in the same optimizer.

8-bit (`bits=8`): each moment of at least `min_8bit_size` elements is stored with bitsandbytes' blockwise
quantization (blocks of 256, dynamic signed map for the first moment, unsigned for the second, as its 8-bit
optimizers do): 1 byte per element plus one fp32 absmax per block. The maps are constants, not state.

`svd: subspace` refreshes from the previous projector instead of a fresh SVD: SUBSPACE_ITERS steps of subspace
(power) iteration on G G^T, re-orthonormalized by QR after each, then a Rayleigh-Ritz step (the eigenvectors of
the r x r matrix B B^T, B = Y^T G) that orders the basis like singular vectors. A full SVD is done on the first
refresh and whenever the subspace moved too much: when the previous projector held less than SUBSPACE_MIN_KEPT
of the gradient energy the new basis captures (from a start that far off a few power steps need not converge).
Energy, not the plain angle between the subspaces, because the directions that carry almost none of the
gradient move freely between refreshes and do not matter to the update. How often a full SVD was needed is
counted and logged after each round of refreshes.

The SVD runs on G / max|G| (singular vectors do not depend on scale, and a huge gradient would overflow
LAPACK). A refresh that fails (LAPACK does not converge, the gradient or the vectors are not finite) never
produces NaNs: a finite gradient is retried once with a tiny seeded jitter; otherwise the previous projector
is kept (a seeded random orthonormal one on the very first refresh); each failure is logged and counted.
The randomized SVD (`torch.svd_lowrank`) is seeded from the step and the shape, so every rank computes the
same projector and the global RNG stream is untouched.

This module is the SVD strategy of the low-rank family (trainer/optim/lowrank.py), which owns the moments,
8-bit storage, per-parameter calls, state dict and the weight write. State is tensors only (projectors, float64
step, moments, absmax), so checkpoints load with weights_only=True.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.lowrank import (
    BLOCKSIZE,
    MIN_8BIT_SIZE,
    PROJ_TYPES,
    LowRankAdamW,
    Side,
    adam_step,
    is_target_shape,
    moment_bytes,
    new_step,
    project,
    project_back,
    projection_side,
    state_bytes,
    state_shapes,
)

log = logging.getLogger(__name__)

SVD_METHODS = ("full", "randomized", "subspace")
OVERSAMPLE = 8  # extra columns for the randomized SVD's range finder
GALORE_KEYS = ("update_gap", "scale", "proj_type", "svd")
JITTER = 1e-6  # relative size of the retry perturbation (the gradient is normalized to max |G| = 1)
SUBSPACE_ITERS = 1  # power steps per subspace refresh: from the previous projector one already captures 99% of
# the energy an SVD captures, at a tenth of its time (benchmarks/galore_speed.py)
SUBSPACE_MIN_KEPT = 0.5  # a subspace refresh does a full SVD when the previous projector held less of the energy

__all__ = ["BLOCKSIZE", "MIN_8BIT_SIZE", "PROJ_TYPES", "GaLoreAdamW", "adam_step", "moment_bytes", "new_step",
           "project", "project_back", "projection_side", "state_bytes", "state_shapes"]


class RefreshFailed(RuntimeError):
    """A projector refresh that gave no usable singular vectors."""


def _normalized(matrix: Tensor) -> Tensor:
    """G / max|G|: singular vectors do not depend on scale, and a huge gradient would overflow LAPACK."""
    scale = matrix.abs().amax()
    return matrix / scale if bool(scale > 0) else matrix


def _checked(*vectors: Tensor | None) -> None:
    if not all(v is None or bool(torch.isfinite(v).all()) for v in vectors):
        raise RefreshFailed("the SVD returned non-finite singular vectors")


def top_singular_vectors(matrix: Tensor, rank: int, method: str, seed: int) -> tuple[Tensor, Tensor]:
    """U[:, :rank] and V[:, :rank] of an fp32 matrix, by exact or randomized SVD; raises RefreshFailed."""
    normalized = _normalized(matrix)
    try:
        if method == "randomized":
            q = min(rank + OVERSAMPLE, *matrix.shape)
            devices = [matrix.device] if matrix.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                u, _, v = torch.svd_lowrank(normalized, q=q, niter=2)
        else:
            u, _, vh = torch.linalg.svd(normalized, full_matrices=False)
            v = vh.mH
    except torch.linalg.LinAlgError as e:
        raise RefreshFailed(str(e).splitlines()[0]) from None
    u, v = u[:, :rank].contiguous(), v[:, :rank].contiguous()
    _checked(u, v)
    return u, v


def subspace_iteration(matrix: Tensor, start: Tensor, iters: int = SUBSPACE_ITERS) -> tuple[Tensor, float]:
    """The top left singular subspace of `matrix` (m x n), refined from `start` (m x r, orthonormal) by `iters`
    steps of Y <- orth(G G^T Y) (Householder QR), then rotated inside span(Y) onto the singular vectors of
    B = Y^T G (Rayleigh-Ritz, through the eigenvectors of the r x r matrix B B^T), so its columns come ordered by
    singular value like an SVD's. Costs about (2 iters + 1) m n r, not the O(m n min(m, n)) of an SVD.

    Also returns how much the subspace moved, as the share of the energy the new basis captures that `start`
    already captured, ||start^T G||^2 / ||basis^T G||^2 (both fall out of the products above): near 1 when the
    gradient's dominant directions stayed where they were, whatever the directions that carry no energy did."""
    normalized = _normalized(matrix)
    y = start
    held = None
    try:
        for _ in range(iters):
            z = normalized.T @ y
            held = float(z.square().sum()) if held is None else held
            y, _ = torch.linalg.qr(normalized @ z)
        small = y.T @ normalized
        gram = small @ small.T
        _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues: the largest last
    except torch.linalg.LinAlgError as e:
        raise RefreshFailed(str(e).splitlines()[0]) from None
    out = (y @ vectors.flip(1)).contiguous()
    _checked(out)
    captured = float(gram.diagonal().sum())
    if held is None:
        held = captured
    return out, held / captured if captured > 0 else 1.0


def align_signs(new: Tensor, old: Tensor) -> Tensor:
    """Flip columns of `new` that point away from the same column of `old`. A singular vector's sign is
    arbitrary (LAPACK may flip it under a tiny change of the gradient); the kept moments were accumulated
    along the old columns, so each new column takes the sign that agrees with its predecessor."""
    flip = (new * old).sum(dim=0) < 0
    return torch.where(flip, -new, new)


def add_projected_back(p: Tensor, low: Tensor, left: Tensor | None, right: Tensor | None, alpha: float,
                       beta: float) -> None:
    """p <- beta * p + alpha * project_back(low), as one matrix product writing into p (no full-size
    temporary; beta carries the decoupled weight decay)."""
    if p.dtype != low.dtype:
        p.mul_(beta).add_(project_back(low, left, right).to(p.dtype), alpha=alpha)
    elif left is not None and right is not None:
        p.addmm_(left @ low, right.T, beta=beta, alpha=alpha)
    elif left is not None:
        p.addmm_(left, low, beta=beta, alpha=alpha)
    else:
        p.addmm_(low, right.T, beta=beta, alpha=alpha)  # type: ignore[union-attr]


@dataclass
class ProjectedBack:
    """GaLore's update P N Q^T, kept factored until it is written."""

    low: Tensor
    left: Tensor | None
    right: Tensor | None

    def add_to(self, p: Tensor, alpha: float, beta: float) -> None:
        add_projected_back(p, self.low, self.left, self.right, alpha, beta)

    def full(self) -> Tensor:
        return project_back(self.low, self.left, self.right)


def random_orthonormal(rows: int, cols: int, seed: int, device: torch.device) -> Tensor:
    """A seeded rows x cols matrix with orthonormal columns (the fallback when no projector exists yet)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q.to(device)


def refresh_seed(step: int, shape: tuple[int, int] | torch.Size) -> int:
    """Same on every rank and after resume; independent of parameter order (which ZeRO partitions change)."""
    m, n = shape
    return (step * 1_000_003 + m * 7_919 + n) % (2**62)


def expected_state_bytes(shape: tuple[int, ...], rank: int | None, proj_type: str = "std", bits: int = 32,
                         min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """State bytes GaLoreAdamW holds for one parameter: 8 (float64 step) + projectors in fp32 + two moments
    (low-rank for a GaLore target, full otherwise). `rank=None` means plain AdamW."""
    numel = math.prod(shape)
    if not is_target_shape(shape, rank):
        return 8 + 2 * moment_bytes(numel, bits, min_8bit_size)
    projectors, low = state_shapes(shape, rank, projection_side(shape, proj_type))  # type: ignore[arg-type]
    proj = sum(a * b for a, b in projectors)
    return 8 + 4 * proj + 2 * moment_bytes(low[0] * low[1], bits, min_8bit_size)


class SVDProjection:
    """GaLore's strategy: an orthonormal projector from the gradient's SVD (or a subspace-iteration refresh of
    the previous one), Adam on the projected gradient, its direction projected back and scaled."""

    name = "GaLore"
    keys = GALORE_KEYS

    def __init__(self) -> None:
        self.refresh_failures = 0
        self.subspace_refreshes = 0  # refreshes done by subspace iteration from the previous projector
        self.full_refreshes = 0  # svd: subspace refreshes that did a full SVD (first refresh, or moved too much)
        self._round = 0

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return "step" not in state or int(state["step"]) % group["update_gap"] == 0

    def consumed(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        return project(grad.float(), state.get("proj_left"), state.get("proj_right"))

    def low_rank(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor) -> Tensor:
        return consumed  # already projected

    def update(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor, low: Tensor,
               direction: Tensor) -> tuple[ProjectedBack, float]:
        return ProjectedBack(direction, state.get("proj_left"), state.get("proj_right")), group["scale"]

    def state_shapes(self, shape: torch.Size, group: dict[str, Any],
                     state: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], tuple[int, int]]:
        side = projection_side(shape, group["proj_type"])
        projectors, low = state_shapes(shape, group["rank"], side)
        keys = [k for k, used in (("proj_left", side in ("left", "both")), ("proj_right", side in ("right", "both")))
                if used]
        return dict(zip(keys, projectors)), low

    def refresh(self, opt: LowRankAdamW, p: Tensor, grad: Tensor) -> None:
        """Recompute p's projector from the full gradient of this step (a target whose refresh is due)."""
        group, state = opt._group_of(p), opt.state[p]
        step = int(state["step"])
        side = projection_side(p.shape, group["proj_type"])
        seed = refresh_seed(step, p.shape)
        try:
            u, v = self._vectors(grad.float(), group, state, side, seed)
        except RefreshFailed as e:
            self.refresh_failures += 1
            if "proj_left" in state or "proj_right" in state:
                log.warning("GaLore: projector refresh of %s at step %d failed (%s); keeping the previous "
                            "projector", opt.name_of(p), step, e)
                return
            log.warning("GaLore: first projector of %s failed (%s); using a seeded random orthonormal basis "
                        "until the next refresh", opt.name_of(p), e)
            m, n = p.shape
            u, v = (random_orthonormal(m, group["rank"], seed, p.device),
                    random_orthonormal(n, group["rank"], seed + 1, p.device))
        for key, value, used in (("proj_left", u, side in ("left", "both")),
                                 ("proj_right", v, side in ("right", "both"))):
            if not used or value is None:
                continue
            if key in state:
                state[key].copy_(align_signs(value, state[key]))
            else:
                state[key] = value
        if group["svd"] == "subspace":
            self._count_round(opt)

    def _vectors(self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], side: Side,
                 seed: int) -> tuple[Tensor | None, Tensor | None]:
        """The new singular vectors of the used sides: by subspace iteration from the previous projector when
        svd is `subspace` and it stays close enough, else by SVD (retried once with a tiny jitter)."""
        if group["svd"] == "subspace" and ("proj_left" in state or "proj_right" in state):
            u, kept_left = subspace_iteration(grad, state["proj_left"]) if "proj_left" in state else (None, 1.0)
            v, kept_right = subspace_iteration(grad.T, state["proj_right"]) if "proj_right" in state else (None, 1.0)
            if min(kept_left, kept_right) >= SUBSPACE_MIN_KEPT:
                self.subspace_refreshes += 1
                return u, v
        if group["svd"] == "subspace":
            self.full_refreshes += 1
        method = "full" if group["svd"] == "subspace" else group["svd"]
        return self._singular_vectors(grad, group["rank"], method, seed)

    @staticmethod
    def _singular_vectors(grad: Tensor, rank: int, method: str, seed: int) -> tuple[Tensor, Tensor]:
        """SVD, and once more with a tiny seeded jitter when a finite gradient fails to converge."""
        try:
            return top_singular_vectors(grad, rank, method, seed)
        except RefreshFailed:
            scale = grad.abs().amax()
            if not torch.isfinite(scale) or scale == 0:
                raise
            gen = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(grad.shape, generator=gen).to(grad.device)
            return top_singular_vectors(grad / scale + JITTER * noise, rank, "full", seed)

    def _count_round(self, opt: LowRankAdamW) -> None:
        """Log, after every round of refreshes (one per target), how many kept the warm start."""
        self._round += 1
        targets = sum(opt.is_target(p) for g in opt.param_groups for p in g["params"])
        if self._round < targets:
            return
        self._round = 0
        total = self.subspace_refreshes + self.full_refreshes
        log.info("GaLore subspace refresh: %d of %d refreshes so far by subspace iteration, %d by a full SVD "
                 "(first refresh, or the previous projector held < %.0f%% of the energy the new one captures)",
                 self.subspace_refreshes, total, self.full_refreshes, 100 * SUBSPACE_MIN_KEPT)


class GaLoreAdamW(LowRankAdamW):
    """AdamW with GaLore projection for the parameter groups that set `rank` (see the module docstring): the
    low-rank family's optimizer with the SVD strategy. Besides `step()`, the per-parameter calls let an update
    run inside backward (per-layer updates): `needs_full_gradient(p)`, `refresh(p, grad)`, `project(p, grad)`,
    `apply_update(p, low_rank_grad)`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", svd: str = "full", bits: int = 32,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
        projection_side((1, 1), proj_type)  # validates the name
        self.svd = SVDProjection()
        super().__init__(params, self.svd, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                                rank=rank, update_gap=update_gap, scale=scale, proj_type=proj_type,
                                                svd=svd, bits=bits, min_8bit_size=min_8bit_size))

    @property
    def refresh_failures(self) -> int:
        return self.svd.refresh_failures
