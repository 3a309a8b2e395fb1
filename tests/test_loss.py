"""trainer/model/loss.py: the chunked cross-entropy equals torch's, values and gradients, and keeps no fp32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import trainer.model.loss as loss_module
from tests.helpers import QUICKSTART
from tests.memory_probe import loss_bytes_per_logit
from trainer.model.loss import token_loss_sum
from trainer.plan.activations import logits_bytes
from trainer.plan.items import Shapes
from trainer.recipe.resolve import resolve

# gradient tolerance relative to its largest entry: fp32 differs in rounding only (exp and logsumexp computed
# apart); bf16/fp16 round the gradient once before the scalar is applied (an ulp of the largest entry, twice)
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [2**22, 1000, 301], ids=["one-chunk", "chunks", "row-by-row"])
def test_values_and_gradients_match_torch(dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    x = (torch.randn(3, 17, 301) * 3).to(dtype)
    labels = torch.randint(0, 301, (3, 17))
    labels[0, :5] = -100
    labels[2, -3:] = -100
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = token_loss_sum(ours, labels), reference(theirs, labels)
    (got / 7).backward()  # a scalar after the loss, as the loop's 1/tokens
    (want / 7).backward()
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    with torch.no_grad():
        assert float(token_loss_sum(x, labels)) == pytest.approx(float(want), rel=1e-6)
    diff = (ours.grad.float() - theirs.grad.float()).abs().max()
    assert diff <= TOL[dtype] * theirs.grad.float().abs().max()
    assert torch.equal(ours.grad[0, :4], torch.zeros_like(ours.grad[0, :4]))  # masked labels: no gradient
    assert torch.equal(ours.grad[:, -1], torch.zeros_like(ours.grad[:, -1]))  # the last position predicts nothing


def test_non_contiguous_logits() -> None:
    """Logits that are a transposed view (not contiguous) get the same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(9, 2, 31)
    labels = torch.randint(0, 31, (2, 9))
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = token_loss_sum(ours.transpose(0, 1), labels), reference(theirs.transpose(0, 1), labels)
    got.backward()
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


def test_backward_twice_is_refused() -> None:
    x = torch.randn(1, 4, 11, requires_grad=True)
    loss = token_loss_sum(x, torch.randint(0, 11, (1, 4)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_per_logit_matches_the_plan(dtype: str) -> None:
    """Peak RSS of logits -> loss -> backward (tests/memory_probe.py) against the plan's logits term, and against
    plain F.cross_entropy on fp32 logits, which keeps 12 bytes per logit."""
    batch, seq, vocab = 2, 1024, 32768
    cfg = resolve(QUICKSTART, [f"precision.dtype={dtype}", f"train.micro_batch_size={batch}",
                                   f"data.seq_len={seq}", "model.config.max_position_embeddings=1024"])
    sh = Shapes("llama", [], 64, 128, 2, 4, 64, vocab, set())
    planned = logits_bytes(cfg, sh) / (batch * seq * vocab)
    ours, plain = loss_bytes_per_logit(batch, seq, vocab, dtype)
    print(f"{dtype}: bytes per logit planned {planned:.2f}, measured {ours:.2f}; plain F.cross_entropy {plain:.2f}")
    assert ours == pytest.approx(planned, rel=0.15)
    assert plain > ours + 3.5
