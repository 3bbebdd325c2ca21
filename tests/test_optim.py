"""Optimizers: Lion against its formula; every optimizer.name through the Trainer assembly."""

import pytest
import torch

from mixattn.training.optim import DecoupledLionW


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


def test_every_optimizer_name_builds_the_optimizer_it_names_and_trains(tmp_path, corpus):
    """optimizer.name through the real Trainer assembly: decoupled_adamw
    (composer's), adamw (torch's, fused on the GPU), decoupled_lionw (ours);
    an unknown name lists the valid ones."""
    from composer.optim import DecoupledAdamW

    from mixattn.config import ConfigError
    from mixattn.training.trainer import build_trainer
    from test_train import _cfg

    expected = {"decoupled_adamw": DecoupledAdamW, "adamw": torch.optim.AdamW, "decoupled_lionw": DecoupledLionW}
    for name, cls in expected.items():
        cfg = _cfg(corpus, tmp_path / name, "max_duration=12ba", "save_folder=null", f"optimizer.name={name}",
                   "optimizer.lr=3e-3", "optimizer.weight_decay=0.1", "data.eval=[]")
        trainer = build_trainer(cfg)
        opt = trainer.state.optimizers[0]
        assert type(opt) is cls, (name, type(opt))
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["betas"] == (0.9, 0.95)
        losses = []
        from composer.core import Callback

        class Rec(Callback):
            def after_train_batch(self, state, logger):
                losses.append(state.loss.item())

        trainer.state.callbacks.append(Rec())
        trainer.fit()
        trainer.close()
        assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), (name, losses)
    with pytest.raises(ConfigError, match="unknown optimizer.name 'adam'; valid: decoupled_adamw, adamw, decoupled_lionw"):
        build_trainer(_cfg(corpus, tmp_path / "x", "optimizer.name=adam", "save_folder=null"))
