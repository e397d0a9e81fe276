"""The loss and metrics on batches worked out by hand."""
import math

import pytest
import torch

from train.losses import bradley_terry_loss, pair_metrics


def nls(x):  # -log sigmoid(x), by hand
    return math.log(1 + math.exp(-x))


def test_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (nls(1.0) + nls(-1.0)) / 2  # = (0.31326 + 1.31326) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)


def test_margin_is_subtracted_from_the_difference():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    margin = torch.tensor([0.5, 0.0])
    expected = (nls(0.5) + nls(-1.0)) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)


def test_centering_term_adds_coefficient_times_mean_square_sum():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    base = (nls(1.0) + nls(-1.0)) / 2
    # (s_c + s_r)^2 = [9, 1] -> mean 5 -> 0.1 * 5 = 0.5
    got = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1).item()
    assert got == pytest.approx(base + 0.5, abs=1e-6)


def test_loss_is_fp32_for_bf16_scores():
    chosen = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    rejected = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    assert bradley_terry_loss(chosen, rejected).dtype == torch.float32


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_pair_metrics_count_a_tie_as_wrong():
    m = pair_metrics(torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 1.5]))
    assert m["n"] == 3 and m["correct"] == 1  # the tie (1.0 vs 1.0) is not correct
    assert m["margin"] == pytest.approx(1.0 + 0.0 - 1.0)
    assert m["chosen"] == pytest.approx(3.5) and m["rejected"] == pytest.approx(3.5)
