"""The losses and their metrics as pure functions of the scores (tested by hand in tests/test_losses.py).

Every loss is computed in fp32 whatever the model dtype, so bf16 scores do not lose the small
differences the loss is about. `margin` is a per-pair tensor in reward units (0 where a pair has
none): the chosen score must beat the rejected one by at least that much.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _difference(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor]) -> torch.Tensor:
    """d = s_c - s_r - margin, in fp32."""
    diff = chosen.float() - rejected.float()
    return diff if margin is None else diff - margin.float()


def _centering(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float):
    """coefficient * mean((s_c + s_r)^2) (Eisenstein et al. 2023): keeps rewards near zero."""
    return coefficient * ((chosen.float() + rejected.float()) ** 2).mean()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(d) + center_rewards_coefficient * mean((s_c + s_r)^2)."""
    loss = -F.logsigmoid(_difference(chosen, rejected, margin)).mean()
    if center_rewards_coefficient:
        loss = loss + _centering(chosen, rejected, center_rewards_coefficient)
    return loss


def smoothed_bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                                label_smoothing: float = 0.1, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean over pairs of -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), eps = label_smoothing.

    The Bradley-Terry loss when a share eps of the labels is assumed flipped: the best difference
    for a pair is finite (log((1 - eps) / eps)) instead of infinite, so the model does not grow
    overconfident on labels that may be wrong."""
    diff = _difference(chosen, rejected, margin)
    loss = -((1 - label_smoothing) * F.logsigmoid(diff) + label_smoothing * F.logsigmoid(-diff)).mean()
    if center_rewards_coefficient:
        loss = loss + _centering(chosen, rejected, center_rewards_coefficient)
    return loss


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
               hinge_margin: float = 1.0) -> torch.Tensor:
    """Mean over pairs of max(0, hinge_margin - d): margin ranking, zero once d >= hinge_margin."""
    return F.relu(hinge_margin - _difference(chosen, rejected, margin)).mean()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Sums over pairs (so they can be added across microbatches and processes, then divided).

    A tie counts as wrong: a reward model that cannot separate a pair has not ranked it.
    """
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "n": chosen.numel(),
        "correct": (chosen > rejected).sum().item(),
        "margin": (chosen - rejected).sum().item(),
        "chosen": chosen.sum().item(),
        "rejected": rejected.sum().item(),
    }
