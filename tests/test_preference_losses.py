"""trainer/preference/losses.py against the papers' formulas written out with `math` on fixed log-probs, and the
per-sequence log-probs of trainer/model/loss.py against torch's cross-entropy (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model.loss import row_loss_sums
from trainer.preference import losses

# fixed summed log-probs of 3 pairs: policy chosen / rejected, reference chosen / rejected, response lengths
PC, PR = [-12.0, -30.5, -7.25], [-15.0, -29.0, -20.0]
RC, RR = [-13.0, -30.0, -9.0], [-14.0, -31.0, -18.5]
NC, NR = [4.0, 10.0, 3.0], [5.0, 9.0, 8.0]


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_sigmoid_is_the_papers_formula(smoothing: float) -> None:
    beta = 0.1
    got = losses.dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=smoothing)
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        want = -(1 - smoothing) * logsig(beta * h) - smoothing * logsig(-beta * h)
        assert float(got.losses[i]) == pytest.approx(want, rel=1e-12)
        assert float(got.chosen_rewards[i]) == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
        assert float(got.rejected_rewards[i]) == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)


def test_ipo_and_hinge_are_the_papers_formulas() -> None:
    beta = 0.5
    ipo = losses.dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type="ipo")
    hinge = losses.dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type="hinge")
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert float(ipo.losses[i]) == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert float(hinge.losses[i]) == pytest.approx(max(0.0, 1 - beta * h), abs=1e-12)


def test_dpo_of_a_policy_equal_to_its_reference_is_ln2() -> None:
    got = losses.dpo(t(RC), t(RR), t(RC), t(RR), beta=0.1)
    assert torch.allclose(got.losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert not got.chosen_rewards.any() and not got.rejected_rewards.any()


def test_simpo_is_the_papers_formula() -> None:
    beta, gamma = 2.0, 0.5
    got = losses.simpo(t(PC), t(PR), t(NC), t(NR), beta=beta, gamma=gamma)
    for i in range(3):
        want = -logsig(beta / NC[i] * PC[i] - beta / NR[i] * PR[i] - gamma)
        assert float(got.losses[i]) == pytest.approx(want, rel=1e-12)


def test_orpo_is_the_papers_formula() -> None:
    lam = 0.1
    got = losses.orpo(t(PC), t(PR), t(NC), t(NR), lam=lam)
    for i in range(3):
        p_w, p_l = math.exp(PC[i] / NC[i]), math.exp(PR[i] / NR[i])
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        want = -PC[i] / NC[i] - lam * math.log(1 / (1 + 1 / odds_ratio))
        assert float(got.losses[i]) == pytest.approx(want, rel=1e-10)


def test_kto_is_the_papers_formula() -> None:
    beta, w_d, w_u = 0.1, 1.0, 1.33
    desirable = [True, False, True]
    got, rewards = losses.kto(t(PC), t(RC), torch.tensor(desirable), beta=beta, desirable_weight=w_d,
                              undesirable_weight=w_u)
    ratios = [PC[i] - RC[i] for i in range(3)]
    z0 = max(0.0, sum(ratios) / 3)
    for i in range(3):
        sig = 1 / (1 + math.exp(-beta * ((ratios[i] - z0) if desirable[i] else (z0 - ratios[i]))))
        want = (w_d if desirable[i] else w_u) * (1 - sig)
        assert float(got[i]) == pytest.approx(want, rel=1e-12)
        assert float(rewards[i]) == pytest.approx(beta * ratios[i], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_log_probs_and_their_gradients_match_torch(dtype: torch.dtype) -> None:
    """Per-sequence sums of the token loss, with a different weight per row in backward (as a preference loss
    gives), equal torch's cross-entropy summed per row."""
    torch.manual_seed(0)
    x = (torch.randn(4, 11, 53) * 2).to(dtype)
    labels = torch.randint(0, 53, (4, 11))
    labels[:, :4] = -100
    labels[3, -2:] = -100
    weights = torch.tensor([0.3, -1.2, 2.0, 0.7])
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = row_loss_sums(ours, labels)
    flat = theirs[:, :-1].float().reshape(-1, 53)
    want = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none").view(4, -1).sum(1)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.allclose(got, want.detach(), rtol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2 * 2**-7
    assert (ours.grad.float() - theirs.grad.float()).abs().max() <= tol * theirs.grad.float().abs().max() * 2
