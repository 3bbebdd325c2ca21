"""Lion with decoupled weight decay (Chen et al., 2023), for recipes that ask
for ``optimizer.name: decoupled_lionw``. Composer ships AdamW but no Lion."""

from __future__ import annotations

import torch


class DecoupledLionW(torch.optim.Optimizer):
    """update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g;
    p <- p * (1 - lr * wd) - lr * update. Weight decay is decoupled: scaled by
    lr as in composer's DecoupledAdamW."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss
