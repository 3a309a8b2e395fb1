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

The SVD runs on G / max|G| (singular vectors do not depend on scale, and a huge gradient would overflow
LAPACK). A refresh that fails (LAPACK does not converge, the gradient or the vectors are not finite) never
produces NaNs: a finite gradient is retried once with a tiny seeded jitter; otherwise the previous projector
is kept (a seeded random orthonormal one on the very first refresh); each failure is logged and counted.
The randomized SVD (`torch.svd_lowrank`) is seeded from the step and the shape, so every rank computes the
same projector and the global RNG stream is untouched.

State is tensors only (projectors, float64 step, moments, absmax), so checkpoints load with weights_only=True.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Literal

import torch
from torch import Tensor
from torch.optim.adamw import adamw

log = logging.getLogger(__name__)

Side = Literal["left", "right", "both"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer state
MIN_8BIT_SIZE = 4096  # smaller moments stay fp32 (bitsandbytes' rule: norms and biases gain nothing)
OVERSAMPLE = 8  # extra columns for the randomized SVD's range finder
GALORE_KEYS = ("rank", "update_gap", "scale", "proj_type", "svd", "bits", "min_8bit_size")
JITTER = 1e-6  # relative size of the retry perturbation (the gradient is normalized to max |G| = 1)


class RefreshFailed(RuntimeError):
    """A projector refresh that gave no usable singular vectors."""


def projection_side(shape: tuple[int, int] | torch.Size, proj_type: str) -> Side:
    """Which side of an m x n matrix a proj_type projects."""
    m, n = shape
    if proj_type == "std":
        return "left" if m <= n else "right"
    if proj_type == "reverse_std":
        return "right" if m <= n else "left"
    if proj_type == "full":
        return "both"
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"unknown GaLore proj_type {proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")


def state_shapes(shape: tuple[int, int] | torch.Size, rank: int, side: Side) -> tuple[list[tuple[int, int]],
                                                                                      tuple[int, int]]:
    """(projector shapes, low-rank gradient shape) of an m x n target."""
    m, n = shape
    if side == "left":
        return [(m, rank)], (rank, n)
    if side == "right":
        return [(n, rank)], (m, rank)
    return [(m, rank), (n, rank)], (rank, rank)


def top_singular_vectors(matrix: Tensor, rank: int, method: str, seed: int) -> tuple[Tensor, Tensor]:
    """U[:, :rank] and V[:, :rank] of an fp32 matrix, by exact or randomized SVD; raises RefreshFailed."""
    scale = matrix.abs().amax()
    normalized = matrix / scale if bool(scale > 0) else matrix
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
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise RefreshFailed("the SVD returned non-finite singular vectors")
    return u, v


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """The low-rank gradient: P^T G, G Q, or P^T G Q."""
    if left is not None:
        grad = left.T @ grad
    if right is not None:
        grad = grad @ right
    return grad


def project_back(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """A low-rank tensor in the weight's space: P X, X Q^T, or P X Q^T."""
    if right is not None:
        low = low @ right.T
    if left is not None:
        low = left @ low
    return low


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


def random_orthonormal(rows: int, cols: int, seed: int, device: torch.device) -> Tensor:
    """A seeded rows x cols matrix with orthonormal columns (the fallback when no projector exists yet)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q.to(device)


def refresh_seed(step: int, shape: tuple[int, int] | torch.Size) -> int:
    """Same on every rank and after resume; independent of parameter order (which ZeRO partitions change)."""
    m, n = shape
    return (step * 1_000_003 + m * 7_919 + n) % (2**62)


def moment_bytes(numel: int, bits: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of one Adam moment of `numel` elements."""
    if bits == 8 and numel >= min_8bit_size:
        return numel + 4 * math.ceil(numel / BLOCKSIZE)
    return 4 * numel


def expected_state_bytes(shape: tuple[int, ...], rank: int | None, proj_type: str = "std", bits: int = 32,
                         min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """State bytes this optimizer holds for one parameter: 8 (float64 step) + projectors in fp32 + two moments
    (low-rank for a GaLore target, full otherwise). `rank=None` means plain AdamW."""
    numel = math.prod(shape)
    if rank is None or len(shape) != 2 or rank >= min(shape):
        return 8 + 2 * moment_bytes(numel, bits, min_8bit_size)
    projectors, low = state_shapes(shape, rank, projection_side(shape, proj_type))  # type: ignore[arg-type]
    proj = sum(a * b for a, b in projectors)
    return 8 + 4 * proj + 2 * moment_bytes(low[0] * low[1], bits, min_8bit_size)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (counted from the real tensors)."""
    inner = getattr(optimizer, "optim", optimizer)  # ShardedOptimizer: this rank's local optimizer
    return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
               if isinstance(t, Tensor))


def new_step() -> Tensor:
    """The step counter: a CPU float64 scalar (exact to 2**53 steps; torch's fused AdamW takes it as is)."""
    return torch.zeros((), dtype=torch.float64)


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
              group: dict[str, Any], lr: float, weight_decay: float) -> None:
    """One AdamW step of `param` in place (step counter included): torch's fused kernel (one pass over the
    tensors, ~7x faster on CPU than separate ops) when every tensor is fp32 on one device, else the same
    formula written out."""
    beta1, beta2 = group["betas"]
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if all(t.dtype == torch.float32 and t.device == param.device for t in tensors) \
            and param.device.type in ("cpu", "cuda"):
        adamw([param], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True, amsgrad=False, beta1=beta1,
              beta2=beta2, lr=lr, weight_decay=weight_decay, eps=group["eps"], maximize=False)
        return
    step.add_(1)
    n = int(step)
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**n)).add_(group["eps"])
    param.mul_(1 - lr * weight_decay)
    param.add_((exp_avg / denom).to(param.dtype), alpha=-lr / (1 - beta1**n))


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for the parameter groups that set `rank` (see the module docstring).

    Besides `step()`, the per-parameter calls let an update run inside backward (per-layer updates):
    `needs_full_gradient(p)`, `refresh(p, grad)`, `project(p, grad)`, `apply_update(p, low_rank_grad)`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None, update_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", svd: str = "full", bits: int = 32,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if svd not in ("full", "randomized"):
            raise ValueError(f"svd must be 'full' or 'randomized', got {svd!r}")
        projection_side((1, 1), proj_type)  # validates the name
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_gap=update_gap, scale=scale, proj_type=proj_type, svd=svd, bits=bits,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.param_names: dict[Tensor, str] = {}  # for log messages; set by the builder
        self.refresh_failures = 0
        self._codes: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._group_cache = None

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The group holding p (cached: per-layer hooks ask for every parameter on every step)."""
        cache: dict[Tensor, dict[str, Any]] | None = getattr(self, "_group_cache", None)
        if cache is None or p not in cache:
            cache = {q: g for g in self.param_groups for q in g["params"]}
            self._group_cache = cache
        return cache[p]

    def is_target(self, p: Tensor) -> bool:
        """A GaLore matrix (else plain AdamW)."""
        rank = self._group_of(p)["rank"]
        return rank is not None and p.dim() == 2 and rank < min(p.shape)

    def needs_full_gradient(self, p: Tensor) -> bool:
        """True when this step's update needs the full-rank gradient: plain AdamW, or a refresh is due."""
        if not self.is_target(p):
            return True
        state = self.state[p]
        return "step" not in state or int(state["step"]) % self._group_of(p)["update_gap"] == 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.is_target(p) and self.needs_full_gradient(p):
                    self.refresh(p, p.grad)
                self.apply_update(p, self.project(p, p.grad))
        return loss

    @torch.no_grad()
    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """The gradient as Adam consumes it: projected (fp32) for a target, unchanged otherwise."""
        if not self.is_target(p):
            return grad
        state = self.state[p]
        return project(grad.float(), state.get("proj_left"), state.get("proj_right"))

    @torch.no_grad()
    def refresh(self, p: Tensor, grad: Tensor) -> None:
        """Recompute p's projector from the full gradient of this step (a target whose refresh is due)."""
        group, state = self._group_of(p), self.state[p]
        if "step" not in state:
            state["step"] = new_step()
        step = int(state["step"])
        side = projection_side(p.shape, group["proj_type"])
        seed = refresh_seed(step, p.shape)
        try:
            u, v = self._singular_vectors(grad.float(), group, seed)
        except RefreshFailed as e:
            self.refresh_failures += 1
            if "proj_left" in state or "proj_right" in state:
                log.warning("GaLore: projector refresh of %s at step %d failed (%s); keeping the previous "
                            "projector", self._name(p), step, e)
                return
            log.warning("GaLore: first projector of %s failed (%s); using a seeded random orthonormal basis "
                        "until the next refresh", self._name(p), e)
            m, n = p.shape
            u, v = (random_orthonormal(m, group["rank"], seed, p.device),
                    random_orthonormal(n, group["rank"], seed + 1, p.device))
        for key, value, used in (("proj_left", u, side in ("left", "both")),
                                 ("proj_right", v, side in ("right", "both"))):
            if not used:
                continue
            if key in state:
                state[key].copy_(align_signs(value, state[key]))
            else:
                state[key] = value

    def _singular_vectors(self, grad: Tensor, group: dict[str, Any], seed: int) -> tuple[Tensor, Tensor]:
        """SVD, and once more with a tiny seeded jitter when a finite gradient fails to converge."""
        try:
            return top_singular_vectors(grad, group["rank"], group["svd"], seed)
        except RefreshFailed:
            scale = grad.abs().amax()
            if not torch.isfinite(scale) or scale == 0:
                raise
            gen = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(grad.shape, generator=gen).to(grad.device)
            return top_singular_vectors(grad / scale + JITTER * noise, group["rank"], "full", seed)

    @torch.no_grad()
    def apply_update(self, p: Tensor, grad: Tensor) -> None:
        """One AdamW update of p from the gradient as Adam consumes it (low-rank for a target)."""
        group, state = self._group_of(p), self.state[p]
        if "step" not in state:
            state["step"] = new_step()
        exp_avg, exp_avg_sq = self._load_moments(state, group, grad)
        lr, decay = group["lr"], group["weight_decay"]
        if not self.is_target(p):
            adam_step(p, grad, exp_avg, exp_avg_sq, state["step"], group, lr, decay)
            self._store_moments(state, group, exp_avg, exp_avg_sq)
            return
        direction = torch.zeros_like(exp_avg)  # Adam's step on a zero "parameter" at lr 1 leaves -N in it
        adam_step(direction, grad, exp_avg, exp_avg_sq, state["step"], group, 1.0, 0.0)
        self._store_moments(state, group, exp_avg, exp_avg_sq)
        add_projected_back(p, direction, state.get("proj_left"), state.get("proj_right"), alpha=lr * group["scale"],
                           beta=1 - lr * decay)

    def _quantized(self, group: dict[str, Any], numel: int) -> bool:
        return group["bits"] == 8 and numel >= group["min_8bit_size"]

    def _load_moments(self, state: dict[str, Any], group: dict[str, Any], grad: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 moments to update: the state itself (32-bit), or dequantized copies (8-bit)."""
        if "exp_avg" not in state:
            if not self._quantized(group, grad.numel()):
                state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
                return state["exp_avg"], state["exp_avg_sq"]
            blocks = math.ceil(grad.numel() / BLOCKSIZE)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(grad, dtype=torch.uint8)
                state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
            zeros = torch.zeros_like(grad, dtype=torch.float32)
            return zeros, zeros.clone()
        if state["exp_avg"].dtype != torch.uint8:
            return state["exp_avg"], state["exp_avg_sq"]
        from bitsandbytes.functional import dequantize_blockwise

        signed, unsigned = self._maps(grad.device)
        return (dequantize_blockwise(state["exp_avg"], absmax=state["exp_avg_absmax"], code=signed,
                                     blocksize=BLOCKSIZE),
                dequantize_blockwise(state["exp_avg_sq"], absmax=state["exp_avg_sq_absmax"], code=unsigned,
                                     blocksize=BLOCKSIZE))

    def _store_moments(self, state: dict[str, Any], group: dict[str, Any], exp_avg: Tensor,
                       exp_avg_sq: Tensor) -> None:
        if state["exp_avg"].dtype != torch.uint8:
            return  # updated in place
        from bitsandbytes.functional import quantize_blockwise

        signed, unsigned = self._maps(exp_avg.device)
        for key, value, code in (("exp_avg", exp_avg, signed), ("exp_avg_sq", exp_avg_sq, unsigned)):
            quantize_blockwise(value, code=code, absmax=state[f"{key}_absmax"], out=state[key], blocksize=BLOCKSIZE)

    def _maps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """bitsandbytes' dynamic quantization maps (signed for m, unsigned for v), one pair per device."""
        if device not in self._codes:
            from bitsandbytes.functional import create_dynamic_map

            self._codes[device] = (create_dynamic_map(signed=True).to(device),
                                   create_dynamic_map(signed=False).to(device))
        return self._codes[device]

    def _name(self, p: Tensor) -> str:
        return self.param_names.get(p, f"a {p.shape[0]}x{p.shape[1]} matrix")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state with its saved dtypes: torch's loader would cast the uint8 moments (and fp32
        projectors of low-precision weights) to the parameter's dtype. Shapes are checked against this
        optimizer's settings so a changed rank or proj_type fails with a clear message."""
        saved_state = state_dict["state"]
        settings = [{k: g[k] for k in GALORE_KEYS} for g in self.param_groups]
        super().load_state_dict({**state_dict, "state": {}})
        for group, own in zip(self.param_groups, settings):
            group.update(own)  # the recipe's GaLore settings win over the checkpoint's (like the LR schedule)
        self._group_cache = None  # the loader made new group dicts
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                state = {k: (v.to(p.device) if isinstance(v, Tensor) else v) for k, v in saved_state[pid].items()}
                self._check_shapes(p, state)
                self.state[p] = state

    def _check_shapes(self, p: Tensor, state: dict[str, Any]) -> None:
        group = self._group_of(p)
        if not self.is_target(p) or "proj_left" not in state and "proj_right" not in state:
            return
        side = projection_side(p.shape, group["proj_type"])
        projectors, low = state_shapes(p.shape, group["rank"], side)
        got = [tuple(state[k].shape) for k in ("proj_left", "proj_right") if k in state]
        moments = tuple(state["exp_avg"].shape) if "exp_avg" in state else low
        if got != projectors or moments != low:
            raise ValueError(f"the saved GaLore state of {self._name(p)} has projector shapes {got} and moments "
                             f"{moments}, not {projectors} and {low} (rank {group['rank']}, proj_type "
                             f"{group['proj_type']}): it was saved with another rank or proj_type")
