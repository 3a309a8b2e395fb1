"""One preference micro-batch's loss and statistics, from the sequence log-probs of its rows (the policy's, and the
reference's where the objective has one). The forwards that give them are the run's (trainer/run/preference.py);
the formulas are losses.py's.

Statistics are kept as (sum, count) so that they add over micro-batches and ranks before they are divided: the
logged `rewards_chosen` is the mean over every pair of the global batch, as the loss is. For KTO the chosen and
rejected rewards are those of the desirable and the undesirable completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trainer.preference import losses
from trainer.recipe.schema import REFERENCE_OBJECTIVES, ObjectiveConfig

STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")


def needs_reference(objective: ObjectiveConfig) -> bool:
    """DPO and KTO compare the policy with a reference; SimPO and ORPO need none."""
    return objective.name in REFERENCE_OBJECTIVES


@dataclass
class PreferenceLoss:
    """A micro-batch's summed loss (differentiable) and its statistics as {name: (sum, count)}."""

    loss_sum: Tensor
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


def _sum(values: Tensor) -> tuple[float, float]:
    return float(values.detach().double().sum()), float(values.numel())


def pair_loss(objective: ObjectiveConfig, logps: Tensor, tokens: Tensor, ref_logps: Tensor | None,
              desirable: Tensor | None) -> PreferenceLoss:
    """The loss of one micro-batch. `logps` and `tokens`: each row's summed log-prob and loss-token count; for pairs
    rows [0, n) are the chosen and [n, 2n) the rejected responses; `desirable` marks kto's rows (None for pairs)."""
    beta = objective.beta_value
    if objective.name == "kto":
        assert ref_logps is not None and desirable is not None
        per_row, rewards = losses.kto(logps, ref_logps, desirable, beta=beta,
                                      desirable_weight=objective.kto_desirable_weight,
                                      undesirable_weight=objective.kto_undesirable_weight)
        return PreferenceLoss(per_row.sum(), _kto_stats(rewards, logps, desirable))
    n = logps.size(0) // 2
    chosen, rejected, n_chosen, n_rejected = logps[:n], logps[n:], tokens[:n], tokens[n:]
    if objective.name == "dpo":
        assert ref_logps is not None
        out = losses.dpo(chosen, rejected, ref_logps[:n], ref_logps[n:], beta=beta, loss_type=objective.loss_type,
                         label_smoothing=objective.label_smoothing)
    elif objective.name == "simpo":
        out = losses.simpo(chosen, rejected, n_chosen, n_rejected, beta=beta, gamma=objective.simpo_gamma,
                           label_smoothing=objective.label_smoothing)
    elif objective.name == "orpo":
        out = losses.orpo(chosen, rejected, n_chosen, n_rejected, lam=objective.orpo_lambda)
    else:
        raise ValueError(f"objective.name {objective.name!r} is not a pair objective")
    margin = out.chosen_rewards - out.rejected_rewards
    stats = {"rewards_chosen": _sum(out.chosen_rewards), "rewards_rejected": _sum(out.rejected_rewards),
             "reward_margin": _sum(margin), "reward_accuracy": _sum((margin > 0).double()),
             "logps_chosen": _sum(chosen), "logps_rejected": _sum(rejected)}
    return PreferenceLoss(out.losses.sum(), stats)


def _kto_stats(rewards: Tensor, logps: Tensor, desirable: Tensor) -> dict[str, tuple[float, float]]:
    """KTO has no pairs: the margin is the desirable rewards' mean less the undesirable ones', counted once per
    micro-batch that has both kinds; accuracy is whether that margin is positive."""
    good, bad = rewards[desirable], rewards[~desirable]
    margin = float(good.mean() - bad.mean()) if len(good) and len(bad) else None
    return {"rewards_chosen": _sum(good), "rewards_rejected": _sum(bad),
            "reward_margin": (margin, 1.0) if margin is not None else (0.0, 0.0),
            "reward_accuracy": (float(margin > 0), 1.0) if margin is not None else (0.0, 0.0),
            "logps_chosen": _sum(logps[desirable]), "logps_rejected": _sum(logps[~desirable])}


def means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: sum / count} of the statistics that counted anything."""
    return {name: total / count for name, (total, count) in sums.items() if count}
