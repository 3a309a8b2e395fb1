"""Next-token cross-entropy in fp32 without fp32 copies of the logits.

The plain way (`F.cross_entropy(logits.float(), ...)`) keeps, per logit, an fp32 copy, the fp32 log-softmax
saved for backward and its fp32 gradient: with a 128k vocabulary that is 2.5 GiB at 2048 tokens, more than a
checkpointed 8B model's activations. Here the loss and its gradient with respect to the logits are computed
together in the forward pass, a chunk of rows at a time (fp32 work of LOSS_CHUNK_ELEMENTS logits), and the
gradient is kept in the logits' own dtype; nothing keeps the logits, so they are freed when the loss returns.
Per logit that leaves 2 x the compute dtype at the peak (logits and gradient), 4 B in bf16 instead of 10.
Backward multiplies the stored gradient by the incoming scalar (the 1/tokens normalization and fp16 loss
scale) in place. Equal to F.cross_entropy's values and gradients up to fp32 rounding; in bf16/fp16 the
gradient is rounded once before that scalar is applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LOSS_CHUNK_ELEMENTS = 2**22  # logits per chunk of fp32 work (16 MiB per fp32 temporary)
IGNORE = -100


def chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk of fp32 work (the memory plan counts one chunk)."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab)


def _chunk(logits: Tensor, targets: Tensor, grad: Tensor | None) -> Tensor:
    """Loss of each of these rows (0 where the target is IGNORE); writes d(loss)/d(logits) into grad when given."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != IGNORE
    safe = targets.clamp(min=0).unsqueeze(1)
    loss = (lse - x.gather(1, safe).squeeze(1)) * valid
    if grad is not None:
        g = (x - lse.unsqueeze(1)).exp_()  # softmax
        g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
        g.mul_(valid.unsqueeze(1))
        grad.copy_(g)
    return loss


def _chunked(logits: Tensor, targets: Tensor, grad: Tensor | None) -> Tensor:
    """The loss at every position (fp32, flat), chunk by chunk; fills grad (shaped like logits) when given."""
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)
    flat_grad = None if grad is None else grad.view(-1, vocab)
    rows = chunk_rows(vocab)
    out = torch.empty(flat.size(0), dtype=torch.float32, device=logits.device)
    for s in range(0, flat.size(0), rows):
        out[s:s + rows] = _chunk(flat[s:s + rows], targets[s:s + rows],
                                 None if flat_grad is None else flat_grad[s:s + rows])
    return out


def _chunked_sum(logits: Tensor, targets: Tensor, grad: Tensor | None) -> Tensor:
    """Summed loss over all positions, chunk by chunk; fills grad (shaped like logits) when given."""
    return _chunked(logits, targets, grad).sum()


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # viewed as rows below
        total = _chunked_sum(logits, targets, grad)
        ctx.save_for_backward(grad)
        ctx.done = False
        return total

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor, None]:
        if ctx.done:
            raise RuntimeError("token_loss_sum's backward ran twice (retain_graph): its gradient was consumed")
        ctx.done = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(float(upstream)), None  # the stored gradient becomes the result, scaled in place


class _RowCrossEntropy(torch.autograd.Function):
    """Like _TokenCrossEntropy, per row of the batch: the upstream gradient is a vector (one weight per sequence,
    as a preference loss gives), applied to each row's stored gradient in place."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        per_row = _chunked(logits, targets, grad).view(logits.size(0), -1).sum(dim=1)
        ctx.save_for_backward(grad)
        ctx.done = False
        return per_row

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor, None]:
        if ctx.done:
            raise RuntimeError("row_loss_sums's backward ran twice (retain_graph): its gradient was consumed")
        ctx.done = True
        (grad,) = ctx.saved_tensors
        weights = upstream.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad.mul_(weights), None


def shifted_targets(labels: Tensor) -> Tensor:
    """The label of position t is token t+1; the last position of each row predicts nothing."""
    pad = labels.new_full((labels.size(0), 1), IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of next-token cross-entropy (fp32) over positions whose label is not -100."""
    targets = shifted_targets(labels)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenCrossEntropy.apply(logits, targets)
    return _chunked_sum(logits, targets, None)


def row_loss_sums(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row, the sum of next-token cross-entropy (fp32) over positions whose label is not -100: minus the
    sequence's log-probability of its loss tokens (what preference losses compare). Memory as token_loss_sum."""
    targets = shifted_targets(labels)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _RowCrossEntropy.apply(logits, targets)
    return _chunked(logits, targets, None).view(logits.size(0), -1).sum(dim=1)
