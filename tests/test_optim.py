"""Lion with decoupled weight decay: one step against the formula."""

import pytest
import torch

from mixattn.optim import DecoupledLionW


def test_lion_step_matches_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = DecoupledLionW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.state[p]["exp_avg"] = torch.tensor([0.2, 0.2, -1.0])
    p.grad = torch.tensor([-3.0, 1.0, 2.0])
    opt.step()
    m = torch.tensor([0.2, 0.2, -1.0])
    g = torch.tensor([-3.0, 1.0, 2.0])
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
    torch.testing.assert_close(p.data, expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.99 * m + 0.01 * g)


def test_lion_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr must be > 0"):
        DecoupledLionW([torch.nn.Parameter(torch.zeros(1))], lr=0)
    with pytest.raises(ValueError, match="betas must be in"):
        DecoupledLionW([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))
