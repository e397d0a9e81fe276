"""The Bradley-Terry loss and its metrics as pure functions of the scores (tested by hand)."""
from typing import Optional

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(s_c - s_r - margin) + coef * mean((s_c + s_r)^2).

    Computed in fp32 whatever the model dtype, so bf16 scores do not lose the small differences
    the loss is about. The centering term (Eisenstein et al. 2023) keeps rewards near zero.
    """
    chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


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
