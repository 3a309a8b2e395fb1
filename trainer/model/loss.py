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
from torch import Tensor, nn

LOSS_CHUNK_ELEMENTS = 2**22  # logits per chunk of fp32 work (16 MiB per fp32 temporary)
IGNORE = -100


def chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk of fp32 work (the memory plan counts one chunk)."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab)


HEAD_MIN_ROWS = 256  # model.head_in_loss: each chunk multiplies by the whole head, so chunks are kept this tall


def head_chunk_rows(vocab: int) -> int:
    """Rows per chunk when the loss applies the head itself: every chunk reads the head's whole weight (1 GiB for
    Llama-3's in bf16), so a chunk of 32 rows (a 128K vocabulary's share of LOSS_CHUNK_ELEMENTS) would read it
    thousands of times per 100K tokens; 256 rows cost 0.4 GiB of fp32 work at that vocabulary."""
    return max(chunk_rows(vocab), HEAD_MIN_ROWS)


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


def shifted_targets(labels: Tensor, columns: slice | None = None) -> Tensor:
    """The label of position t is token t+1; the last position of each row predicts nothing. `columns`: only the
    positions a sequence-parallel rank computed (shifted over the whole row first: a slice's last position
    predicts the first token of the next slice)."""
    width = max(labels.size(1), columns.stop if columns is not None else 0)
    pad = labels.new_full((labels.size(0), width - labels.size(1) + 1), IGNORE)  # (rows padded for the shards)
    shifted = torch.cat([labels[:, 1:], pad], dim=1)
    return (shifted if columns is None else shifted[:, columns]).reshape(-1)


class _HeadCrossEntropy(torch.autograd.Function):
    """The LM head and the loss together (model.head_in_loss), a chunk of rows at a time: each chunk's logits are
    made from the hidden states, give their loss and gradient, and are let go, so no tensor of the whole
    sequence's logits ever exists (at 128k tokens and a 128k vocabulary that is 32 GiB in bf16). What is kept for
    backward is the gradient of the hidden states (tokens x hidden) and, when the head trains, of its weight."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        w = weight.to(compute)
        flat = hidden.reshape(-1, hidden.size(-1))
        grad_hidden = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        rows = head_chunk_rows(weight.size(0))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, flat.size(0), rows):
                x = flat[s:s + rows].to(compute)
                logits = x @ w.t()
                grad = torch.empty_like(logits) if grad_hidden is not None or grad_weight is not None else None
                total += _chunk(logits, targets[s:s + rows], grad).sum()
                if grad is not None and grad_hidden is not None:
                    grad_hidden[s:s + rows] = grad @ w
                if grad is not None and grad_weight is not None:
                    grad_weight += (grad.t() @ x).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = float(upstream)
        hidden = None if grad_hidden is None else grad_hidden.mul_(scale).view(ctx.shape)
        weight = None if grad_weight is None else grad_weight.mul_(scale).to(ctx.weight_dtype)
        return hidden, weight, None


def token_loss_sum(logits: Tensor, labels: Tensor, columns: slice | None = None,
                   head: Tensor | None = None) -> Tensor:
    """Sum of next-token cross-entropy (fp32) over positions whose label is not -100. `columns`: the logits are
    those of these positions of the rows (sequence parallelism), the labels the whole rows'. `head`: `logits` are
    the hidden states and this is the LM head's weight, applied chunk by chunk inside the loss."""
    targets = shifted_targets(labels, columns)
    if head is not None:
        return _HeadCrossEntropy.apply(logits, head, targets)
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


def _identity(hidden_states: Tensor) -> Tensor:
    return hidden_states


def head_into_loss(model: nn.Module) -> Tensor:
    """model.head_in_loss: the LM head's forward passes the hidden states through (the model's "logits" are then
    the hidden states) and the loss applies the head chunk by chunk (trainer/model/loss.py). Returns the head's
    weight, which the loss needs. The head keeps its parameters and names."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    head.forward = _identity
    return head.weight
