"""The preference losses, as the papers write them, on sequence log-probabilities (sums over each response's
tokens). Each returns per-example losses and the implicit rewards that the metrics report; the loop sums the losses
and divides by the examples of the global batch, as it divides the token loss by its tokens.

- DPO (Rafailov et al. 2023): h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l));
  sigmoid: -log sigmoid(beta h), with label smoothing eps (cDPO):
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
  ipo (Azar et al. 2023): (h - 1 / (2 beta))^2; hinge (SLiC): max(0, 1 - beta h). Rewards: beta (log pi - log ref).
- SimPO (Meng et al. 2024): -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma): length-
  normalised, no reference. Rewards: beta / |y| log pi(y).
- ORPO (Hong et al. 2024): NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), with odds(y) = P / (1 - P)
  and P = exp(mean token log-prob); NLL is the chosen response's mean token loss. No reference. Rewards: log odds.
- KTO (Ethayarajh et al. 2024): desirable: w_D (1 - sigmoid(beta (r - z0))), undesirable: w_U (1 - sigmoid(beta
  (z0 - r))), r = log pi(y) - log ref(y). z0 is the reference point: max(0, mean r over the micro-batch), detached
  (the paper estimates it on mismatched prompt/completion pairs; the batch mean saves that forward). Rewards: beta r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairLoss:
    """Per example: the loss, and the implicit rewards of the chosen and the rejected response."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PairLoss:
    """DPO and its variants on summed log-probs of each response (policy and reference)."""
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return PairLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, *, beta: float,
          gamma: float, label_smoothing: float = 0.0) -> PairLoss:
    """SimPO: length-normalised log-probs, a target margin gamma, no reference."""
    chosen_reward = beta * chosen / chosen_tokens
    rejected_reward = beta * rejected / rejected_tokens
    z = chosen_reward - rejected_reward - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLoss(losses, chosen_reward.detach(), rejected_reward.detach())


def log_odds(logps: Tensor, tokens: Tensor) -> Tensor:
    """log(P / (1 - P)) of P = exp(mean token log-prob), computed stably (P < 1 always)."""
    mean = logps / tokens
    return mean - torch.log(-torch.expm1(mean))


def orpo(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, *,
         lam: float) -> PairLoss:
    """ORPO: the chosen response's mean token NLL plus lambda times the odds-ratio loss; no reference."""
    chosen_odds, rejected_odds = log_odds(chosen, chosen_tokens), log_odds(rejected, rejected_tokens)
    nll = -chosen / chosen_tokens
    losses = nll - lam * F.logsigmoid(chosen_odds - rejected_odds)
    return PairLoss(losses, chosen_odds.detach(), rejected_odds.detach())


def kto(logps: Tensor, ref_logps: Tensor, desirable: Tensor, *, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, z0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KTO on unpaired completions: per example the loss and the reward beta * r. `desirable` is a bool tensor;
    `z0` the reference point (default: max(0, mean r), detached)."""
    ratio = logps - ref_logps
    point = ratio.detach().mean().clamp(min=0) if z0 is None else z0
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - point)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (point - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()
