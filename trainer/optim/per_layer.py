"""Per-layer weight updates (`per_layer: true` under optimizer.galore or optimizer.apollo): each parameter is
updated inside backward, as soon as its gradient is complete, and the gradient is freed at once, so a full set of
gradients never exists. Any optimizer of the low-rank family (trainer/optim/lowrank.py) works here through its
per-parameter calls.

How the three usual blockers work here:
- **Gradient accumulation.** On a micro-step that is not the last of the optimizer step, a GaLore target's
  gradient is projected with its current projector, added to a rank-r buffer, and freed; the update happens
  on the last micro-step only (the engine says which through `micro_step(is_last)`). Projection is linear, so
  this equals projecting the summed gradient. Some gradients still accumulate at full size across micro-steps,
  because nothing smaller can represent their sum: plain-AdamW parameters (embeddings, norms, head), a GaLore
  target on the step its projector is refreshed (1 in `update_gap`), whose SVD needs the summed gradient, and
  every APOLLO target (its update scales the raw gradient). With one micro-step per optimizer step no full-size
  gradient outlives its own hook.
- **DDP.** The model is not wrapped in DDP (its buckets would hold a full gradient copy); on the last
  micro-step each gradient, in its low-rank form where it has one, is all-reduced asynchronously, averaged,
  and applied when the reduction completes. Collectives are issued in one fixed order on every rank (the
  reverse of the order in which the first forward used the parameters, about the order backward produces
  them; a gradient that comes early waits for its turn), and at most MAX_IN_FLIGHT are outstanding. A
  parameter that gets no gradient under DDP is an error.
- **Clipping.** The global norm of a step is known only after its backward, when every update has been
  applied. The rule: the gradient of step t is multiplied by min(1, c / N_{t-1}), N_{t-1} being the previous
  step's global norm (no factor on the first step), and, so that a spike is still caught on the step it
  happens, no parameter's gradient may exceed norm c on its own. Norms are taken of the gradient as the
  optimizer consumes it: the rank-r projection for GaLore targets, the full gradient otherwise (APOLLO's
  targets too). The reported grad_norm is N_t, this step's norm before clipping, in that sense.
The LR schedule advances once per optimizer step, in the engine's step(), after the last update.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.optim.lowrank import LowRankAdamW

MAX_IN_FLIGHT = 4  # outstanding all-reduces (each holds one gradient)


def record_first_use(model: nn.Module, used: dict[Tensor, None]) -> list[Any]:
    """Forward pre-hooks that add each trainable parameter to `used` (an ordered set) when the forward first
    runs its module; returns the hook handles. Backward completes gradients in about the reverse of this order,
    while registration order can differ (a Llama layer registers its input norm after the MLP and backward
    completes it last: in registration order the whole layer's gradients would wait for it). The order is the
    same on every rank, as the same code runs the modules; the memory plan takes it from a narrow copy."""

    def record(module: nn.Module, args: Any) -> None:
        for p in module.parameters(recurse=False):
            if p.requires_grad and p not in used:
                used[p] = None

    return [m.register_forward_pre_hook(record) for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


class PerLayerUpdates:
    """Post-accumulate-grad hooks that run a low-rank-family optimizer's per-parameter update inside backward."""

    def __init__(self, model: nn.Module, optimizer: LowRankAdamW, grad_clip: float | None, world_size: int) -> None:
        params: list[Tensor] = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.world_size = world_size
        self.order: list[Tensor] = params[::-1]  # until the first forward shows the order of use (record_first_use)
        self.position: dict[Tensor, int] = {p: i for i, p in enumerate(self.order)}
        self.used: dict[Tensor, None] = {}
        self.use_hooks = record_first_use(model, self.used) if world_size > 1 else []
        self.is_last = True
        self.low_rank: dict[Tensor, Tensor] = {}
        self.ready: dict[int, tuple[Tensor, Tensor, bool]] = {}
        self.pending: deque[tuple[Tensor, Tensor, bool, Any]] = deque()
        self.launched = 0
        self.sq_norm = torch.zeros((), dtype=torch.float64, device=params[0].device)
        self.prev_norm: float | None = None
        if world_size > 1:  # what DDP would do at construction: every rank starts from rank 0's weights
            for t in [*params, *model.buffers()]:
                dist.broadcast(t.data, src=0)
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _fix_order(self) -> None:
        """At the first gradient: collectives follow the reverse order of first use from then on."""
        for handle in self.use_hooks:
            handle.remove()
        self.use_hooks = []
        unused = [p for p in self.order if p not in self.used]
        self.order = list(self.used)[::-1] + unused
        self.position = {p: i for i, p in enumerate(self.order)}

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        """Wraps one micro-step's forward and backward; updates happen in the last one."""
        self.is_last = is_last
        try:
            yield
        finally:
            self.is_last = True

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        if self.use_hooks:
            self._fix_order()
        grad, opt = p.grad, self.optimizer
        assert grad is not None
        if not self.is_last:
            if not opt.needs_full_gradient(p):  # fold into the rank-r buffer; else p.grad keeps accumulating
                low = opt.project(p, grad)
                buf = self.low_rank.get(p)
                self.low_rank[p] = low if buf is None else buf.add_(low)
                p.grad = None
            return
        buf = self.low_rank.pop(p, None)
        full = opt.needs_full_gradient(p)
        x = grad if full else opt.project(p, grad)
        if buf is not None:
            x = buf.add_(x)
        p.grad = None
        if self.world_size == 1:
            self._update(p, x, full)
        else:
            self._enqueue(p, x, full)

    def _update(self, p: Tensor, x: Tensor, full: bool) -> None:
        """Refresh the projector if due, project, clip by the rule, and apply the update."""
        opt = self.optimizer
        if full and opt.is_target(p):
            opt.refresh(p, x)
        if full:
            x = opt.project(p, x)
        norm = torch.linalg.vector_norm(x, dtype=torch.float64)
        self.sq_norm += norm.square()
        if self.grad_clip is not None:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=self._factor())
            x = x * coef.to(x.dtype)
        opt.apply_update(p, x)

    def _factor(self) -> float:
        """min(1, c / previous step's norm): the global clip factor of this step."""
        if self.grad_clip is None or self.prev_norm is None or not math.isfinite(self.prev_norm):
            return 1.0
        return min(1.0, self.grad_clip / (self.prev_norm + 1e-6))

    def _enqueue(self, p: Tensor, x: Tensor, full: bool) -> None:
        """Launch all-reduces in the fixed order; complete the oldest beyond MAX_IN_FLIGHT."""
        self.ready[self.position[p]] = (p, x, full)
        while self.launched in self.ready:
            q, y, f = self.ready.pop(self.launched)
            self.launched += 1
            self.pending.append((q, y, f, dist.all_reduce(y, async_op=True)))
        while len(self.pending) > MAX_IN_FLIGHT:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        q, y, full, work = self.pending.popleft()
        work.wait()
        self._update(q, y.div_(self.world_size), full)

    @torch.no_grad()
    def finish(self) -> float:
        """After the last micro-step's backward: complete outstanding updates; returns this step's norm."""
        if self.world_size > 1:
            if self.launched != len(self.order):
                missing = self.order[self.launched] if self.launched < len(self.order) else None
                name = self.optimizer.param_names.get(missing, "a parameter") if missing is not None else "?"
                raise RuntimeError(f"per-layer updates under DDP: {name} got no gradient this step; every "
                                   "trainable parameter must take part in the loss (freeze unused ones)")
            while self.pending:
                self._complete_oldest()
            self.launched = 0
        assert not self.low_rank and not self.ready, "a micro-step sequence did not end with is_last=True"
        norm = float(self.sq_norm.sqrt())
        self.sq_norm.zero_()
        self.prev_norm = norm
        return norm

    def state_dict(self) -> dict[str, Any]:
        """The previous step's norm (the next step's clip factor): needed for an exact resume."""
        return {"prev_norm": torch.tensor(math.nan if self.prev_norm is None else self.prev_norm,
                                          dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint saved without per-layer updates has no previous norm: the next step is not clipped
        by a global factor (as the first step of a run)."""
        value = float(state.get("prev_norm", math.nan))
        self.prev_norm = None if math.isnan(value) else value
