"""The optimizers and learning-rate schedules a recipe names
(``optimizer.name``, ``scheduler.name``), as registries: adding one is one
``register`` call. Lion is here because Composer ships AdamW but no Lion."""

from __future__ import annotations

import torch
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)

from mixattn.config import ConfigError
from mixattn.registry import Registry
from mixattn.training.recipe import OptimizerConfig, SchedulerConfig

OPTIMIZERS: Registry = Registry("optimizer.name")  # (params, OptimizerConfig, device) -> torch.optim.Optimizer
SCHEDULERS: Registry = Registry("scheduler.name")  # SchedulerConfig -> a Composer scheduler


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


@OPTIMIZERS.register("decoupled_adamw")
def _decoupled_adamw(params, o: OptimizerConfig, device: str):
    return DecoupledAdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, o: OptimizerConfig, device: str):
    # torch's AdamW: one fused kernel for all parameters on the GPU (composer's
    # DecoupledAdamW launches several kernels per parameter from Python); weight
    # decay p *= 1 - lr * wd, i.e. scaled by the current lr, not lr / peak lr
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=True if device == "gpu" else None)


@OPTIMIZERS.register("decoupled_lionw")
def _decoupled_lionw(params, o: OptimizerConfig, device: str):
    return DecoupledLionW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


SCHEDULERS.register("cosine_with_warmup", lambda s: CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f))
SCHEDULERS.register("linear_with_warmup", lambda s: LinearWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f))
SCHEDULERS.register("constant_with_warmup", lambda s: ConstantWithWarmupScheduler(t_warmup=s.t_warmup))


def _get(registry: Registry, name: str):
    if name not in registry:
        raise ConfigError(f"unknown {registry.what} {name!r}; valid: {', '.join(registry.names())}")
    return registry.get(name)


def build_optimizer(params, o: OptimizerConfig, device: str) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` (the trainable parameters only)."""
    return _get(OPTIMIZERS, o.name)(params, o, device)


def build_scheduler(s: SchedulerConfig):
    return _get(SCHEDULERS, s.name)(s)
