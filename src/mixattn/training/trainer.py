"""``build_trainer``: a Composer Trainer from a recipe. Each part is built by
its own module (the model, the loaders, the optimizer and schedule, the
parallelism, the callbacks); this only puts them together."""

from __future__ import annotations

import atexit
import os
import weakref

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Evaluator
from composer.loggers import WandBLogger
from composer.utils import dist, reproducibility

from mixattn.checkpoint import install_atomic_checkpoint_writes, verify_checkpoint
from mixattn.config import ConfigError, redact
from mixattn.freeze import freeze_all_but
from mixattn.training.callbacks import ConsoleReport, LogRecipe, NonFiniteLossGuard, say
from mixattn.training.composer_model import ComposerMixAttention
from mixattn.training.loaders import resolve_eos_id, streaming_loader, tokenizer_record
from mixattn.training.optim import build_optimizer, build_scheduler
from mixattn.training.parallelize import parallelize
from mixattn.training.recipe import TrainConfig, recipe_to_dict
from mixattn.training.save import prepare_save_folder


def build_trainer(cfg: TrainConfig, extra_callbacks: list | None = None, loggers: list | None = None) -> Trainer:
    """A Composer Trainer for ``cfg``; ``trainer.mixattn_resolved`` says what
    the recipe's ``auto`` settings chose."""
    if not cfg.data.train:
        raise ConfigError("data.train: at least one stream is needed")
    device, precision = resolve_device_precision(cfg)
    # The process group first, as llm-foundry's train.py does: streaming's
    # datasets then coordinate through it, instead of each building and tearing
    # down a group of its own just before the Trainer builds the real one (a
    # second rendezvous on the same port that a slow rank can miss).
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(f"global_train_batch_size {cfg.global_train_batch_size} is not divisible by the world size {world}")
    per_device = cfg.global_train_batch_size // world
    if cfg.load_path and "://" not in cfg.load_path:
        verify_checkpoint(cfg.load_path)  # a torn or missing file is named now, not deep inside composer
    eos_id = resolve_eos_id(cfg)  # also checks the data's vocabulary against the model's
    if not cfg.data.doc_mask:
        eos_id = None  # the collate function then gives no document ids
    reproducibility.seed_all(cfg.seed)  # the model is built before the Trainer seeds: same init every run
    recipe = redact(recipe_to_dict(cfg))  # credentials in URIs or free-form options never reach a file or a log
    model = ComposerMixAttention(cfg.model, train_metrics=cfg.train_metrics, recipe=recipe)
    model.tokenizer_record = tokenizer_record(cfg)
    install_atomic_checkpoint_writes()
    prepare_save_folder(cfg, model.model)
    if cfg.trainable is not None:
        kept = freeze_all_but(model.model, cfg.trainable)
        total = sum(p.numel() for p in model.parameters())
        say(f"trainable {cfg.trainable}: {kept:,} of {total:,} parameters train, the rest are frozen")
    par = parallelize(model.model, cfg, world, device)
    if cfg.device_train_microbatch_size == "auto":
        say(f"device_train_microbatch_size: auto -> {par.microbatch_reason}")
    say(par.checkpointing.describe())
    if cfg.fsdp is not None and par.fsdp is None:
        say("fsdp: not applied (one process: nothing to shard; FSDP would only add its hooks)")
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, device)  # frozen: no state
    scheduler = build_scheduler(cfg.scheduler)
    train_dl = streaming_loader(cfg.data.train, per_device, cfg, eos_id, cfg.data.shuffle, device)
    say(f"data: {train_dl.num_workers} loader workers per process{' (auto)' if cfg.data.num_workers == 'auto' else ''}"
         f"{', pinned host memory' if train_dl.pin_memory else ''}")
    recipe["resolved"] = {"device_train_microbatch_size": par.microbatch, "activation_checkpointing": par.checkpointing.mode,
                          "checkpointed_blocks": list(par.checkpointing.blocks), "fsdp": par.fsdp is not None,
                          "num_workers": train_dl.num_workers}
    eval_dl = None
    if cfg.data.eval:
        eval_dl = Evaluator(label="eval", dataloader=streaming_loader(cfg.data.eval, cfg.device_eval_batch_size, cfg, eos_id,
                                                                      False, device),
                            subset_num_batches=cfg.eval_subset_num_batches)
    callbacks = [SpeedMonitor(window_size=10), LRMonitor(), LogRecipe(recipe), *(extra_callbacks or []), *par.callbacks,
                 NonFiniteLossGuard(cfg.nonfinite_loss), ConsoleReport(cfg, device)]
    all_loggers = list(loggers or [])
    if cfg.wandb is not None:
        os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
        all_loggers.append(WandBLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, init_kwargs={"mode": cfg.wandb.mode}))
    trainer = Trainer(
        model=model, train_dataloader=train_dl, eval_dataloader=eval_dl,
        eval_interval=cfg.eval_interval if eval_dl is not None else 1, max_duration=cfg.max_duration,
        optimizers=optimizer, schedulers=scheduler, device=device, precision=precision,
        device_train_microbatch_size=par.microbatch,
        save_folder=cfg.save_folder, save_interval=cfg.save_interval, save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=False, autoresume=cfg.autoresume, load_path=cfg.load_path, load_weights_only=cfg.load_weights_only,
        run_name=cfg.run_name, seed=cfg.seed, progress_bar=cfg.progress_bar, log_to_console=not cfg.progress_bar,
        console_log_interval=cfg.console_log_interval, callbacks=callbacks, loggers=all_loggers,
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=cfg.grad_clip_norm)] if cfg.grad_clip_norm else [],
        parallelism_config=par.parallelism_config, compile_config=par.compile_config, dist_timeout=cfg.dist_timeout,
    )
    trainer.mixattn_resolved = recipe["resolved"]  # what auto settings chose (benchmarks read it)
    close_at_exit_weakly(trainer)
    return trainer


def close_at_exit_weakly(trainer: Trainer) -> None:
    """Let a closed (or dropped) Trainer be freed while the process goes on.

    Composer 0.32's Engine registers ``atexit.register(Engine._close, state,
    logger)`` and removes it only in ``Engine.__del__``, which that very entry
    keeps from running: every Trainer built in a process (its model, optimizer,
    loaders, and the shared memory of its streaming datasets: a dozen file
    descriptors per dataset) stayed alive until the process ended, even
    after ``trainer.close()``, and at exit each closed Trainer's callbacks were
    closed a second time. A process that trains more than once (replicate.py's
    three stages, notebooks, the test suite) ran out of descriptors.
    (composer PR #3943 is the upstream fix, not released.)

    Here the engine's shared entry is replaced by one of its own that holds the
    engine weakly and closes it at exit only if nothing closed it before; the
    entry goes when the engine is freed. ``atexit.unregister`` removes every
    entry of ``Engine._close``, so an engine built outside mixattn in the same
    process loses its exit hook too, as composer's own ``Engine.__del__``
    already does to it; its ``__del__`` still closes it."""
    from composer.core.engine import Engine

    atexit.unregister(Engine._close)
    engine = weakref.ref(trainer.engine)

    def close_if_open() -> None:
        alive = engine()
        if alive is not None:
            alive.close()  # a no-op once closed

    atexit.register(close_if_open)
    weakref.finalize(trainer.engine, atexit.unregister, close_if_open)


def resolve_device_precision(cfg: TrainConfig) -> tuple[str, str]:
    """(device, precision) for composer, checked before anything is built:
    a GPU that is not there, or half precision on the CPU (composer trains
    there in fp32 only), is a config error naming the valid values."""
    devices, precisions = ("auto", "cpu", "gpu"), ("auto", "fp32", "amp_bf16", "amp_fp16", "amp_fp8")
    if cfg.device not in devices:
        raise ConfigError(f"device {cfg.device!r} is not one of {', '.join(devices)}")
    if cfg.precision not in precisions:
        raise ConfigError(f"precision {cfg.precision!r} is not one of {', '.join(precisions)}")
    cuda = torch.cuda.is_available()
    device = cfg.device if cfg.device != "auto" else ("gpu" if cuda else "cpu")
    if device == "gpu" and not cuda:
        raise ConfigError("device: gpu, but no CUDA device is visible; valid here: cpu, auto")
    precision = cfg.precision if cfg.precision != "auto" else ("amp_bf16" if device == "gpu" else "fp32")
    if device == "cpu" and precision != "fp32":
        raise ConfigError(f"precision {precision} needs device: gpu (composer trains on the CPU in fp32 only); "
                          "valid on cpu: fp32, auto")
    return device, precision
