"""The low-rank-state family: AdamW whose moments for each target matrix live in a rank-r space.

Two members share this optimizer and differ only in their projection strategy (a `Projection`):
- GaLore (trainer/optim/galore.py): an orthonormal projector from the SVD of the gradient, refreshed every
  `update_gap` steps; Adam runs on the projected gradient and its direction is projected back.
- APOLLO (trainer/optim/apollo.py): a Gaussian random projection regenerated from a stored seed; Adam runs on
  the projected gradient only to estimate a channel-wise (or tensor-wise) scale for the raw gradient.

What the family shares, so each strategy is only its projection and its update:
- parameter groups: a group that sets `rank` holds targets (2-D, rank < both sides); every other tensor gets
  plain AdamW in the same optimizer, with decoupled weight decay where its group sets it;
- state: a float64 step counter per tensor and the two Adam moments (low-rank for a target), fp32 or 8-bit
  (`bits=8`: bitsandbytes' blockwise format, 1 byte per element plus an fp32 absmax per block of 256, for
  moments of at least `min_8bit_size` elements); tensors only, so checkpoints load with weights_only=True;
- the per-parameter calls that per-layer updates make inside backward (trainer/optim/per_layer.py):
  `needs_full_gradient(p)`, `refresh(p, grad)`, `project(p, grad)` (the gradient as the update consumes it:
  what is accumulated, all-reduced and clipped) and `apply_update(p, consumed)`;
- the weight write: W <- (1 - lr * weight_decay) W + alpha * update, in place, or for an INT8 weight
  (precision.weights: int8) dequantized, updated in fp32 and written back with stochastic rounding, seeded by
  the step and the parameter's position so every rank and a resumed run round alike;
- `load_state_dict` keeping the saved dtypes, with the recipe's settings winning over the checkpoint's and a
  clear error when the state's shapes say it was saved with another rank.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Protocol

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from trainer.model import int8_weights

BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer state
MIN_8BIT_SIZE = 4096  # smaller moments stay fp32 (bitsandbytes' rule: norms and biases gain nothing)
FAMILY_KEYS = ("rank", "bits", "min_8bit_size")  # settings every member reads from a group
Side = Literal["left", "right", "both"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class Update(Protocol):
    """A target's update in the weight's space, held in whatever factored form the strategy has."""

    def add_to(self, p: Tensor, alpha: float, beta: float) -> None:
        """p <- beta * p + alpha * update, in place, without a full-size temporary where possible."""

    def full(self) -> Tensor:
        """The update as one fp32 tensor of p's shape (for INT8 weights)."""


class Projection(Protocol):
    """A member's projection strategy: how a target's low-rank moments are fed and used."""

    @property
    def name(self) -> str: ...  # for messages: "GaLore", "APOLLO"

    @property
    def keys(self) -> tuple[str, ...]: ...  # its settings in a parameter group (the recipe's values win on resume)

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool: ...

    def refresh(self, opt: LowRankAdamW, p: Tensor, grad: Tensor) -> None: ...

    def consumed(self, state: dict[str, Any], grad: Tensor) -> Tensor: ...

    def low_rank(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor) -> Tensor: ...

    def update(self, state: dict[str, Any], group: dict[str, Any], consumed: Tensor, low: Tensor,
               direction: Tensor) -> tuple[Update, float]: ...

    def state_shapes(self, shape: torch.Size, group: dict[str, Any],
                     state: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], tuple[int, int]]:
        """(shapes of the strategy's own state tensors, shape of the moments) that `state`, a saved state of an
        m x n target, must have."""


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
    raise ValueError(f"unknown proj_type {proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")


def state_shapes(shape: tuple[int, int] | torch.Size, rank: int, side: Side) -> tuple[list[tuple[int, int]],
                                                                                      tuple[int, int]]:
    """(projector shapes, low-rank gradient shape) of an m x n target."""
    m, n = shape
    if side == "left":
        return [(m, rank)], (rank, n)
    if side == "right":
        return [(n, rank)], (m, rank)
    return [(m, rank), (n, rank)], (rank, rank)


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


def moment_bytes(numel: int, bits: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of one Adam moment of `numel` elements."""
    if bits == 8 and numel >= min_8bit_size:
        return numel + 4 * math.ceil(numel / BLOCKSIZE)
    return 4 * numel


def is_target_shape(shape: tuple[int, ...] | torch.Size, rank: int | None) -> bool:
    """A matrix whose both sides are larger than the rank (projecting anything else saves nothing)."""
    return rank is not None and len(shape) == 2 and rank < min(shape)


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


def write_seed(step: int, position: int) -> int:
    """The seed of an INT8 weight's stochastic rounding at a step: the same on every rank and after resume."""
    return (step * 1_000_003 + position * 7_919 + 12_345) % (2**62)


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW with low-rank moments for the groups that set `rank`, projected by `projection` (see the module
    docstring). Members construct it with their strategy (GaLoreAdamW, ApolloAdamW)."""

    _group_cache: dict[Tensor, dict[str, Any]] | None = None  # parameter -> its group (_group_of)

    def __init__(self, params: Iterable[Any], projection: Projection, defaults: dict[str, Any]) -> None:
        if defaults["bits"] not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {defaults['bits']}")
        super().__init__(params, defaults)
        self.projection = projection
        self.param_names: dict[Tensor, str] = {}  # for log messages and seeds; set by the builder
        self._codes: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._group_cache = None

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The group holding p (cached: per-layer hooks ask for every parameter on every step)."""
        cache: dict[Tensor, dict[str, Any]] | None = self._group_cache
        if cache is None or p not in cache:
            cache = {q: g for g in self.param_groups for q in g["params"]}
            self._group_cache = cache
            self._positions = {q: i for i, q in enumerate(cache)}
        return cache[p]

    def is_target(self, p: Tensor) -> bool:
        """A low-rank matrix (else plain AdamW)."""
        return is_target_shape(p.shape, self._group_of(p)["rank"])

    def needs_full_gradient(self, p: Tensor) -> bool:
        """True when this step's update needs the full gradient: plain AdamW, or the strategy says so (GaLore
        on a refresh step; APOLLO always, since it scales the raw gradient)."""
        if not self.is_target(p):
            return True
        return self.projection.needs_full_gradient(self.state[p], self._group_of(p))

    def step_count(self, p: Tensor) -> int:
        """Updates applied to p so far (creating its counter on first use)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = new_step()
        return int(state["step"])

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
    def refresh(self, p: Tensor, grad: Tensor) -> None:
        """Let the strategy renew p's projection from this step's full gradient (a target on a due step)."""
        self.step_count(p)
        self.projection.refresh(self, p, grad)

    @torch.no_grad()
    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """The gradient as the update consumes it (GaLore: projected, fp32; APOLLO and plain AdamW: as is)."""
        if not self.is_target(p):
            return grad
        return self.projection.consumed(self.state[p], grad)

    @torch.no_grad()
    def apply_update(self, p: Tensor, consumed: Tensor) -> None:
        """One update of p from the gradient as the update consumes it."""
        group, state = self._group_of(p), self.state[p]
        self.step_count(p)
        lr, decay = group["lr"], group["weight_decay"]
        if not self.is_target(p):
            exp_avg, exp_avg_sq = self._load_moments(state, group, consumed)
            adam_step(p, consumed, exp_avg, exp_avg_sq, state["step"], group, lr, decay)
            self._store_moments(state, exp_avg, exp_avg_sq)
            return
        low = self.projection.low_rank(state, group, consumed)
        exp_avg, exp_avg_sq = self._load_moments(state, group, low)
        direction = torch.zeros_like(exp_avg)  # Adam's step on a zero "parameter" at lr 1 leaves -N in it
        adam_step(direction, low, exp_avg, exp_avg_sq, state["step"], group, 1.0, 0.0)
        self._store_moments(state, exp_avg, exp_avg_sq)
        update, scale = self.projection.update(state, group, consumed, low, direction.neg_())
        self._write(p, update, alpha=-lr * scale, beta=1 - lr * decay)

    def _write(self, p: Tensor, update: Update, alpha: float, beta: float) -> None:
        """p <- beta * p + alpha * update; an INT8 weight is rewritten with stochastic rounding."""
        if not int8_weights.is_int8(p):
            update.add_to(p, alpha, beta)
            return
        value = int8_weights.dequantize(p).mul_(beta).add_(update.full(), alpha=alpha)
        int8_weights.write(p, value, write_seed(int(self.state[p]["step"]), self._positions[p]))

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

    def _store_moments(self, state: dict[str, Any], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
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

    def name_of(self, p: Tensor) -> str:
        return self.param_names.get(p, f"a {'x'.join(map(str, p.shape))} matrix")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state with its saved dtypes: torch's loader would cast the uint8 moments (and fp32
        projectors of low-precision weights) to the parameter's dtype. Shapes are checked against this
        optimizer's settings so a changed rank fails with a clear message."""
        saved_state = state_dict["state"]
        keys = FAMILY_KEYS + self.projection.keys
        settings = [{k: g[k] for k in keys if k in g} for g in self.param_groups]
        super().load_state_dict({**state_dict, "state": {}})
        for group, own in zip(self.param_groups, settings):
            group.update(own)  # the recipe's settings win over the checkpoint's (like the LR schedule)
        self._group_cache = None  # the loader made new group dicts
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                state = {k: (v.to(p.device) if isinstance(v, Tensor) else v) for k, v in saved_state[pid].items()}
                self._check_shapes(p, state)
                self.state[p] = state

    def _check_shapes(self, p: Tensor, state: dict[str, Any]) -> None:
        if not self.is_target(p) or "exp_avg" not in state:
            return
        group = self._group_of(p)
        extra, low = self.projection.state_shapes(p.shape, group, state)
        got = {k: tuple(state[k].shape) for k in extra if k in state}
        want = {k: v for k, v in extra.items() if k in state}
        moments = tuple(state["exp_avg"].shape)
        if got != want or moments != low:
            raise ValueError(f"the saved {self.projection.name} state of {self.name_of(p)} has shapes {got} and "
                             f"moments {moments}, not {want} and {low} (rank {group['rank']}): it was saved with "
                             "another rank or projection side")
