"""Training with Composer: the recipe dataclasses, the ComposerModel wrapper
around the plain model, and the Trainer assembly. The model stays plain
PyTorch; everything here wraps it from outside."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mixattn.config import ConfigError, load_yaml
from mixattn.model import MixAttentionLM, ModelConfig, next_token_loss

# -- the recipe ----------------------------------------------------------------------


@dataclass
class StreamConfig:
    """One MDS stream: a local directory (cache) and optionally a remote URL
    streaming can read (s3://, gs://, oci://, https://, ...)."""

    local: str
    remote: str | None = None
    proportion: float | None = None


@dataclass
class DataConfig:
    train: list[StreamConfig] = field(default_factory=list)
    eval: list[StreamConfig] = field(default_factory=list)
    eos_id: int | None = None  # None: read from mixattn_data.json beside the shards
    # attention stays within each document of a packed sequence (documents end at EOS);
    # false: plain causal attention over the whole sequence (llm-foundry's default,
    # attn_uses_sequence_id: false), which runs the cuDNN/flash causal kernels
    doc_mask: bool = True
    shuffle: bool = True
    shuffle_seed: int = 17
    # loader worker processes per training process. auto: on a GPU, one per CPU
    # core this process may use (its share of the node's cores), at most 8, as
    # llm-foundry's recipes do, so reading and collating the next batch overlaps
    # the step instead of sitting between steps; on the CPU, 0 (the step needs
    # every core). An integer sets it.
    num_workers: int | str = "auto"
    # batches each worker reads ahead (PyTorch's prefetch_factor; only with workers)
    prefetch_factor: int = 2
    # check local shards' sizes and hashes at start-up (streaming checks remote
    # downloads); null skips the hash (sizes are still checked)
    validate_hash: str | None = "xxh64"

    def __post_init__(self):
        w = self.num_workers
        if w != "auto" and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            raise ConfigError(f"data.num_workers must be auto or an integer >= 0, got {w!r}")
        f = self.prefetch_factor
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise ConfigError(f"data.prefetch_factor must be an integer >= 1, got {f!r}")


@dataclass
class OptimizerConfig:
    name: str = "decoupled_adamw"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


_DURATION = re.compile(r"(\d+(\.\d+)?)(ep|ba|sp|tok|dur)")


def check_duration(key: str, value) -> None:
    """Composer's time strings, checked when the recipe loads (Composer's own
    error names neither the key nor the valid forms)."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise ConfigError(f"{key} {value!r} is not a duration; valid forms: 100ba (batches), 2ep (epochs), "
                          "1000000tok (tokens), 5000sp (samples), 0.5dur (a fraction of max_duration)")


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"  # or linear_with_warmup, constant_with_warmup
    t_warmup: str = "10ba"
    alpha_f: float = 0.1

    def __post_init__(self):
        check_duration("scheduler.t_warmup", self.t_warmup)


@dataclass
class WandbConfig:
    project: str | None = None
    entity: str | None = None
    mode: str = "offline"  # offline unless the user says online


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    run_name: str = "mixattn"
    seed: int = 17
    max_duration: str = "100ba"
    global_train_batch_size: int = 8
    device_train_microbatch_size: int | None = None  # None: the whole per-device batch
    device_eval_batch_size: int = 8
    precision: str = "auto"  # auto: amp_bf16 on GPU, fp32 on CPU
    device: str = "auto"
    grad_clip_norm: float | None = 1.0
    eval_interval: str = "100ba"
    eval_subset_num_batches: int = -1
    save_folder: str | None = None
    save_interval: str = "100ba"
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    # auto: none, some blocks or every block, whichever is least and fits the
    # device's free memory (mixattn.memory); true/false force every block / none
    activation_checkpointing: bool | str = "auto"
    compile: bool = False
    # train-time CE/accuracy metrics need the logits out of the forward: slower
    # (see composer_model); the loss is logged either way
    train_metrics: bool = False
    # FSDP options (composer's FSDP2Config fields; version: 1 for composer's CUDA-only
    # FSDP1); null trains with DDP when several processes are launched
    fsdp: dict | None = None
    progress_bar: bool = True
    console_log_interval: str = "10ba"
    wandb: WandbConfig | None = None
    # a NaN/Inf loss: "stop" raises, naming the batch and the last checkpoint;
    # "skip" drops that batch's update (weights and optimizer state untouched)
    nonfinite_loss: str = "stop"
    # what trains: null = every parameter; else a list of groups (attention, mlp,
    # norms, embeddings) and/or parameter-name patterns (fnmatch, e.g.
    # "blocks.*.attn.wqkv.*"); everything else is frozen (no gradient, no
    # optimizer state). The paper's long-context stages train [attention].
    trainable: list[str] | None = None

    def __post_init__(self):
        for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
            check_duration(key, getattr(self, key))
        if self.trainable is not None:
            from mixattn.freeze import check_trainable

            check_trainable(self.trainable)
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ConfigError(f"activation_checkpointing must be auto, true or false, got {self.activation_checkpointing!r}")


def build_config(cls, data: Any, where: str, source: str):
    """Recursively turn plain data into dataclass ``cls``; unknown keys raise
    ConfigError naming the key path and the file."""
    if cls is ModelConfig:
        from mixattn.config import model_config

        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        return model_config(data, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
                          f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        path = f"{where}.{name}".lstrip(".")
        kwargs[name] = _coerce(hint, value, path, source)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {where or 'recipe'}: {e}") from None
    except ConfigError as e:  # a dataclass's own check: say which file
        raise ConfigError(f"{source}: {e}") from None


def _coerce(hint, value, path, source):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, source) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) or hint is ModelConfig:
        return build_config(hint, value, path, source)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path} must be a list, got {value!r}")
        return [build_config(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint in (int, float, str, bool) and value is not None:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"{source}: {path} must be {hint.__name__}, got {value!r}")
    return value


def check_override_keys(overrides: typing.Sequence[str], cls=None) -> None:
    """A key=value override whose key the recipe schema does not have is
    refused as coming from the command line, with the closest valid key."""
    import difflib

    cls = cls or TrainConfig
    for override in overrides:
        key = override.partition("=")[0].strip()
        section, where = cls, ""
        for part in key.split("."):
            if section is None:
                break  # inside free-form data (lists, fsdp options): not checked here
            names = [f.name for f in dataclasses.fields(section) if f.init]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; did you mean {(where + close[0])!r}?" if close else ";"
                raise ConfigError(f"command line: unknown key {key!r} (in {override!r}){hint} "
                                  f"valid keys{' of ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
            hint_type = typing.get_type_hints(section).get(part) if section is not ModelConfig else None
            where += part + "."
            section = hint_type if dataclasses.is_dataclass(hint_type) or hint_type is ModelConfig else None
            if part == "model" and section is None and cls is TrainConfig:
                section = ModelConfig


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """YAML + dot-list overrides -> TrainConfig."""
    check_override_keys(overrides)
    data = load_yaml(path, overrides)
    if "model" not in data or "data" not in data:
        raise ConfigError(f"{path}: a recipe needs 'model' and 'data' sections")
    return build_config(TrainConfig, data, "", str(path))


def recipe_keys(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, default) for every recipe key, from the dataclasses
    themselves (``mixattn train --keys``): what a recipe may set."""
    cls = cls or TrainConfig
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint, key = hints[f.name], prefix + f.name
        inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not list else []
        sub = hint if dataclasses.is_dataclass(hint) else (inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None)
        if sub is not None:
            rows += recipe_keys(sub, key + ".")
            continue
        if typing.get_origin(hint) is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item = typing.get_args(hint)[0]
            rows.append((key, f"list of {{{', '.join(g.name for g in dataclasses.fields(item))}}}", "[]"))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__, default))
    return rows


def recipe_to_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(dataclasses.replace(cfg, model=None))
    d["model"] = cfg.model.to_dict()
    return d


# -- the Composer wrapper --------------------------------------------------------------

# Fields that may legitimately differ when loading a checkpoint into a new run
# (long-context extension, another backend).
MAY_DIFFER_ON_LOAD = {"max_seq_len", "rope_theta", "rope_scaling", "attn_backend", "init_std", "fp32_residual"}


def _token_accuracy_metric():
    from torchmetrics import Metric

    class TokenAccuracy(Metric):
        """Fraction of next-token predictions (argmax) that are right, ignoring -100."""

        full_state_update = False

        def __init__(self):
            super().__init__()
            self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
            self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

        def update(self, logits, target):
            keep = target != -100
            self.correct += (logits.argmax(-1)[keep] == target[keep]).sum()
            self.total += keep.sum()

        def compute(self):
            return self.correct.float() / self.total.clamp(min=1)

    return TokenAccuracy()


def composer_model(cfg: ModelConfig, train_metrics: bool = False, recipe: dict | None = None):
    """A ComposerModel around MixAttentionLM (see :func:`composer_model_class`)."""
    return composer_model_class()(cfg, train_metrics, recipe)


def _model_config_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.init and f.default is not dataclasses.MISSING}


@functools.cache
def composer_model_class():
    """The ComposerModel class around MixAttentionLM (made on first use so
    importing this module does not import composer; the llm-foundry plugin
    subclasses it).

    With ``train_metrics`` off (the default), the training forward returns only
    the loss, computed inside the (compiled) forward: the [B, T, vocab] logits
    never leave the graph, which measured 216 vs 328 ms per step for the 350m
    model at 4K on an H100 (docs/benchmarks.md). Evaluation always returns
    logits for the metrics."""
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import ComposerModel

    class ComposerMixAttention(ComposerModel):
        def __init__(self, cfg: ModelConfig, train_metrics: bool = False, recipe: dict | None = None):
            super().__init__()
            self.cfg = cfg
            self.model = MixAttentionLM(cfg)
            self.use_train_metrics = train_metrics
            self.recipe = recipe
            self.tokenizer_record = None  # {"path", "sha256"} of the data's tokenizer, kept in checkpoints
            self.train_metrics = (
                {"LanguageCrossEntropy": LanguageCrossEntropy(), "TokenAccuracy": _token_accuracy_metric()} if train_metrics else {}
            )
            self.val_metrics = {
                "LanguageCrossEntropy": LanguageCrossEntropy(),
                "LanguagePerplexity": LanguagePerplexity(),
                "TokenAccuracy": _token_accuracy_metric(),
            }

        def forward(self, batch):
            ids, docs = batch["input_ids"], {"doc_ids": batch.get("doc_ids"), "doc_starts": batch.get("doc_starts")}
            if self.training and not self.use_train_metrics:
                return {"loss": self.model(ids, labels=batch["labels"], **docs).loss}
            return {"logits": self.model(ids, **docs).logits}

        def loss(self, outputs, batch, *args, **kwargs):
            if "loss" in outputs:
                return outputs["loss"]
            logits = outputs["logits"]
            return next_token_loss(logits, batch["labels"])

        def eval_forward(self, batch, outputs=None):
            return outputs if outputs is not None else self.forward(batch)

        def flops_per_batch(self, batch):
            # composer's SpeedMonitor turns this into MFU
            b, t = batch["input_ids"].shape
            return b * self.model.flops_per_sequence(t)

        def get_metrics(self, is_train=False):
            return self.train_metrics if is_train else self.val_metrics

        def update_metric(self, batch, outputs, metric):
            metric.update(outputs["logits"][:, :-1].float().contiguous(), batch["labels"][:, 1:].contiguous())

        # the resolved model config travels inside every checkpoint (weights_only-safe data)
        def get_extra_state(self):
            extra = {"mixattn_model_config": self.cfg.to_dict()}
            if self.recipe is not None:
                extra["mixattn_recipe"] = self.recipe
            if self.tokenizer_record is not None:
                extra["mixattn_tokenizer"] = self.tokenizer_record
            return extra

        def set_extra_state(self, state):
            saved = (state or {}).get("mixattn_model_config")
            if saved is None:
                return
            ours = self.cfg.to_dict()
            # a key the checkpoint lacks was added to ModelConfig later: it had the default then
            saved = {**_model_config_defaults(), **saved}
            diff = sorted(k for k in set(saved) | set(ours) if k not in MAY_DIFFER_ON_LOAD and saved.get(k) != ours.get(k))
            if diff:
                details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
                raise ConfigError(f"checkpoint is from an incompatible model config ({details})")

    return ComposerMixAttention


# -- Trainer assembly ----------------------------------------------------------------------


def loader_workers(setting, device: str, cpus: int, local_world: int) -> int:
    """What ``data.num_workers`` means here: an integer as given; ``auto`` is 0
    on the CPU and, on a GPU, this process's share of the node's ``cpus``
    less one for the training loop itself, between 1 and 8."""
    if setting != "auto":
        return setting
    if device != "gpu":
        return 0
    return max(1, min(8, cpus // max(1, local_world) - 1))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _streaming_loader(streams: list[StreamConfig], batch_size: int, cfg: TrainConfig, eos_id, shuffle: bool,
                      device: str = "cpu"):
    from streaming import Stream, StreamingDataLoader

    from mixattn.data import collate, verify_mds_dir
    from mixattn.streams import CheckedStreamingDataset

    objs = []
    for s in streams:
        if s.remote is None:
            verify_mds_dir(s.local, cfg.data.validate_hash, decompress=True)
        objs.append(Stream(local=s.local, remote=s.remote, proportion=s.proportion))
    dataset = CheckedStreamingDataset(
        streams=objs, shuffle=shuffle, shuffle_seed=cfg.data.shuffle_seed, batch_size=batch_size,
        validate_hash=cfg.data.validate_hash, replication=None,
    )
    workers = loader_workers(cfg.data.num_workers, device, _usable_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    extra = {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": True} if workers else {}
    return StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate, eos_id=eos_id),
                               num_workers=workers, pin_memory=device == "gpu", drop_last=True, **extra)


def resolve_eos_id(cfg: TrainConfig) -> int | None:
    from mixattn.data import DataError, read_data_meta

    if cfg.data.eos_id is not None:
        return cfg.data.eos_id
    meta = read_data_meta(cfg.data.train[0].local) if cfg.data.train else None
    if meta is None:
        return None
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise DataError(
            f"the dataset's tokenizer has {meta['vocab_size']} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size >= {meta['vocab_size']}"
        )
    return meta["eos_id"]


def _tokenizer_record(cfg: TrainConfig) -> dict | None:
    """The tokenizer the training data was written with (from the first train
    stream's mixattn_data.json), so generate and eval can default to it."""
    from mixattn.data import read_data_meta

    meta = read_data_meta(cfg.data.train[0].local) if cfg.data.train and cfg.data.train[0].local else None
    return (meta or {}).get("tokenizer_record")


def build_trainer(cfg: TrainConfig, extra_callbacks: list | None = None, loggers: list | None = None):
    """A composer Trainer for ``cfg``."""
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.callbacks import LRMonitor, SpeedMonitor
    from composer.core import Evaluator
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        DecoupledAdamW,
        LinearWithWarmupScheduler,
    )
    from composer.utils import dist

    if not cfg.data.train:
        raise ConfigError("data.train: at least one stream is needed")
    device, precision = resolve_device_precision(cfg)
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(f"global_train_batch_size {cfg.global_train_batch_size} is not divisible by the world size {world}")
    per_device = cfg.global_train_batch_size // world
    fsdp = effective_fsdp(cfg, world)
    if cfg.load_path and "://" not in cfg.load_path:
        from mixattn.checkpoint import verify_checkpoint

        verify_checkpoint(cfg.load_path)  # a torn or missing file is named now, not deep inside composer
    eos_id = resolve_eos_id(cfg)
    from composer.utils import reproducibility

    reproducibility.seed_all(cfg.seed)  # the model is built before the Trainer seeds: same init every run
    from mixattn.config import redact

    recipe = redact(recipe_to_dict(cfg))  # credentials in URIs or free-form options never reach a file or a log
    model = composer_model(cfg.model, train_metrics=cfg.train_metrics, recipe=recipe)
    model.tokenizer_record = _tokenizer_record(cfg)
    from mixattn.checkpoint import install_atomic_checkpoint_writes

    install_atomic_checkpoint_writes()
    if cfg.save_folder:
        _check_save_folder(cfg, checkpoint_bytes_estimate(model.model, cfg.optimizer.name))
        _drop_stale_autoresume_download(cfg)
        _recover_autoresume_checkpoint(cfg)
    if cfg.trainable is not None:
        from mixattn.freeze import freeze_all_but

        kept = freeze_all_but(model.model, cfg.trainable)
        if dist.get_global_rank() == 0:
            total = sum(p.numel() for p in model.parameters())
            print(f"mixattn: trainable {cfg.trainable}: {kept:,} of {total:,} parameters train, the rest are frozen", flush=True)
    choice = apply_training_wrappers(model.model, cfg, world)
    if dist.get_global_rank() == 0:
        print(f"mixattn: {choice.describe()}", flush=True)
        if cfg.fsdp is not None and fsdp is None:
            print("mixattn: fsdp: not applied (one process: nothing to shard; FSDP would only add its hooks)", flush=True)
    recipe["resolved"] = {"activation_checkpointing": choice.mode, "checkpointed_blocks": list(choice.blocks),
                          "fsdp": fsdp is not None}
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parameters get no optimizer state
    if cfg.optimizer.name == "decoupled_adamw":
        opt = DecoupledAdamW(params, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                             weight_decay=cfg.optimizer.weight_decay)
    elif cfg.optimizer.name == "adamw":
        # torch's AdamW: one fused kernel for all parameters on the GPU (composer's
        # DecoupledAdamW launches several kernels per parameter from Python); weight
        # decay p *= 1 - lr * wd, i.e. scaled by the current lr, not lr / peak lr
        opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                                weight_decay=cfg.optimizer.weight_decay, fused=True if device == "gpu" else None)
    elif cfg.optimizer.name == "decoupled_lionw":
        from mixattn.optim import DecoupledLionW

        opt = DecoupledLionW(params, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), weight_decay=cfg.optimizer.weight_decay)
    else:
        raise ConfigError(f"unknown optimizer.name {cfg.optimizer.name!r}; valid: decoupled_adamw, adamw, decoupled_lionw")
    schedulers = {
        "cosine_with_warmup": lambda s: CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f),
        "linear_with_warmup": lambda s: LinearWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f),
        "constant_with_warmup": lambda s: ConstantWithWarmupScheduler(t_warmup=s.t_warmup),
    }
    if cfg.scheduler.name not in schedulers:
        raise ConfigError(f"unknown scheduler.name {cfg.scheduler.name!r}; valid: {', '.join(schedulers)}")
    if not cfg.data.doc_mask:
        eos_id = None  # the collate function then gives no document ids
    train_dl = _streaming_loader(cfg.data.train, per_device, cfg, eos_id, cfg.data.shuffle, device)
    recipe["resolved"]["num_workers"] = train_dl.num_workers
    if dist.get_global_rank() == 0:
        auto = " (auto)" if cfg.data.num_workers == "auto" else ""
        print(f"mixattn: data: {train_dl.num_workers} loader workers per process{auto}"
              f"{', pinned host memory' if train_dl.pin_memory else ''}", flush=True)
    eval_dl = None
    if cfg.data.eval:
        eval_dl = Evaluator(label="eval", dataloader=_streaming_loader(cfg.data.eval, cfg.device_eval_batch_size, cfg, eos_id,
                                                                       False, device),
                            subset_num_batches=cfg.eval_subset_num_batches)
    callbacks = [SpeedMonitor(window_size=10), LRMonitor(), _log_recipe(recipe), *(extra_callbacks or [])]
    if fsdp is not None and fsdp.get("version", 2) == 2:
        callbacks.append(_keep_fsdp_root_unsharded())
    if cfg.nonfinite_loss not in ("stop", "skip"):
        raise ConfigError(f"nonfinite_loss must be 'stop' or 'skip', got {cfg.nonfinite_loss!r}")
    callbacks.append(_nonfinite_loss_guard(cfg.nonfinite_loss))
    callbacks.append(_console_report(cfg, device))
    all_loggers = list(loggers or [])
    if cfg.wandb is not None:
        from composer.loggers import WandBLogger

        os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
        all_loggers.append(WandBLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, init_kwargs={"mode": cfg.wandb.mode}))
    algorithms = []
    if cfg.grad_clip_norm:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.grad_clip_norm))
    trainer = Trainer(
        model=model,
        train_dataloader=train_dl,
        eval_dataloader=eval_dl,
        eval_interval=cfg.eval_interval if eval_dl is not None else 1,
        max_duration=cfg.max_duration,
        optimizers=opt,
        schedulers=schedulers[cfg.scheduler.name](cfg.scheduler),
        device=device,
        precision=precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size or per_device,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        run_name=cfg.run_name,
        seed=cfg.seed,
        progress_bar=cfg.progress_bar,
        log_to_console=not cfg.progress_bar,
        console_log_interval=cfg.console_log_interval,
        callbacks=callbacks,
        loggers=all_loggers,
        algorithms=algorithms,
        parallelism_config=_parallelism(fsdp, world, device),
        # under FSDP each block is compiled on its own (apply_training_wrappers):
        # FSDP2's unshard/reshard hooks stay outside the compiled regions
        compile_config={} if cfg.compile and fsdp is None else None,
    )
    trainer.mixattn_resolved = recipe["resolved"]  # what auto settings chose (benchmarks read it)
    return trainer


def effective_fsdp(cfg: TrainConfig, world: int) -> dict | None:
    """The recipe's fsdp options, or None where there is nothing to shard:
    one process (as torchtitan applies FSDP only when its shard degree is
    above 1; the same recipe then trains on one GPU without FSDP's hooks)."""
    return cfg.fsdp if cfg.fsdp is not None and world > 1 else None


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


def hsdp_mesh_shape(fsdp: dict, world: int) -> tuple[int, int] | None:
    """(replicate, shard) for HSDP, from ``fsdp.data_parallel_replicate_degree``
    and ``fsdp.data_parallel_shard_degree`` (llm-foundry's and composer's
    names; -1 or a missing one: what the world size leaves), or None for plain
    FSDP (replicate degree 1). Shard within a node, replicate across nodes:
    shard degree = GPUs per node."""
    rep = fsdp.get("data_parallel_replicate_degree")
    shard = fsdp.get("data_parallel_shard_degree")
    if rep in (None, 1) and shard in (None, -1, world):
        return None
    for key, v in (("data_parallel_replicate_degree", rep), ("data_parallel_shard_degree", shard)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1)):
            raise ConfigError(f"fsdp.{key} must be a positive integer (or -1: what the world size leaves), got {v!r}")
    if rep in (None, -1) and shard in (None, -1):
        raise ConfigError("fsdp: give data_parallel_shard_degree (the GPUs of one node) for HSDP")
    if rep in (None, -1):
        rep = world // shard if world % shard == 0 else 0
    if shard in (None, -1):
        shard = world // rep if world % rep == 0 else 0
    if rep * shard != world:
        raise ConfigError(f"fsdp: data_parallel_replicate_degree x data_parallel_shard_degree must equal the world size "
                          f"{world}, got {fsdp.get('data_parallel_replicate_degree')} x {fsdp.get('data_parallel_shard_degree')}")
    return rep, shard


def _parallelism(fsdp: dict | None, world: int = 1, device: str = "cpu") -> dict | None:
    """FSDP2 (torch's fully_shard; runs on CPU/gloo and GPU/NCCL) by default,
    HSDP on a 2-D (replicate, shard) device mesh where the recipe asks for it
    (:func:`hsdp_mesh_shape`); ``fsdp.version: 1`` selects composer's FSDP1
    path (CUDA only)."""
    if fsdp is None:
        return None
    options = dict(fsdp)
    version = options.pop("version", 2)
    if version == 1:
        return {"fsdp": options}
    if version != 2:
        raise ConfigError(f"fsdp.version must be 1 or 2, got {version!r}")
    from composer.utils.parallelism import FSDP2Config

    shape = hsdp_mesh_shape(options, world)
    options.pop("data_parallel_replicate_degree", None)
    options.pop("data_parallel_shard_degree", None)
    if shape is not None:
        from composer.devices import DeviceCPU, DeviceGPU
        from composer.utils import dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.initialize_dist(DeviceGPU() if device == "gpu" else DeviceCPU())  # the mesh needs the process group
        options["device_mesh"] = init_device_mesh("cuda" if device == "gpu" else "cpu", shape,
                                                  mesh_dim_names=("dp_replicate", "dp_shard"))
    try:
        return {"fsdp": FSDP2Config.from_compatible_attrs(options)}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"fsdp: {e}") from None


def _log_recipe(recipe: dict):
    """The resolved (redacted) recipe as hyperparameters: printed by the
    console logger at the start, the run config in wandb."""
    from composer.core import Callback

    class LogRecipe(Callback):
        def init(self, state, logger):
            logger.log_hyperparameters({"mixattn_recipe": recipe})

    return LogRecipe()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for the MFU the console prints


def _console_report(cfg: TrainConfig, device: str):
    """What a run says on the console, one line each, on rank 0: that it
    resumed and from where; every evaluation (step, loss, perplexity,
    accuracy, tokens/s and MFU since the last report); at the end the final
    metrics, the checkpoint, the wall time and how to continue or generate.
    (Composer's progress bar cuts its postfix at the terminal's width.)"""
    import math
    import time

    from composer.core import Callback
    from composer.utils import dist

    peak = None
    if device == "gpu":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

    class ConsoleReport(Callback):
        def __init__(self):
            self.last = None  # (time, tokens, samples) at the previous report
            self.start = None
            self.final: dict = {}

        def _say(self, text):
            if dist.get_global_rank() == 0:
                print(f"mixattn: {text}", flush=True)

        def fit_start(self, state, logger):
            self.start = time.time()
            ts = state.timestamp
            self.last = (self.start, int(ts.token), int(ts.sample))
            if int(ts.batch) > 0:
                folder = save_folder_path(cfg)
                latest = Path(folder) / "latest-rank0.pt" if folder and "://" not in folder else None
                where = f"{latest.resolve()}" if latest is not None and latest.exists() else (folder or cfg.load_path)
                self._say(f"resumed at batch {int(ts.batch)} ({int(ts.token):,} tokens) from {where}")

        def eval_end(self, state, logger):
            values = {k: float(m.compute()) for k, m in state.eval_metrics.get("eval", {}).items()}
            now, ts = time.time(), state.timestamp
            t0, tok0, sam0 = self.last
            rate = (int(ts.token) - tok0) / max(now - t0, 1e-9)
            parts = [f"eval at batch {int(ts.batch)}"]
            if "LanguageCrossEntropy" in values:
                loss = values["LanguageCrossEntropy"]
                parts += [f"loss {loss:.4f}", f"perplexity {math.exp(min(loss, 50)):.2f}"]
            if "TokenAccuracy" in values:
                parts.append(f"accuracy {values['TokenAccuracy']:.3f}")
            parts.append(f"{rate:,.0f} tokens/s")
            if peak is not None:
                model = state.model.module if hasattr(state.model, "module") else state.model
                inner = model.model
                flops = (int(ts.sample) - sam0) * inner.flops_per_sequence(cfg.model.max_seq_len)
                parts.append(f"MFU {flops / max(now - t0, 1e-9) / peak / dist.get_world_size():.1%}")
            self._say(", ".join(parts))
            self.final = values
            self.last = (now, int(ts.token), int(ts.sample))

        def fit_end(self, state, logger):
            wall = time.time() - (self.start or time.time())
            ts = state.timestamp
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.final.items()) or "no evaluation ran"
            self._say(f"done: {int(ts.batch)} batches, {int(ts.token):,} tokens in {wall / 60:.1f} min; final eval: {metrics}")
            folder = save_folder_path(cfg)
            if folder and "://" not in folder:
                ckpt = Path(folder) / "latest-rank0.pt"
                if ckpt.exists():
                    # the checkpoint records the data's tokenizer: generate needs none named
                    model = state.model.module if hasattr(state.model, "module") else state.model
                    tok = "" if model.tokenizer_record else " --tokenizer TOKENIZER"
                    self._say(f"checkpoint: {ckpt.resolve()}")
                    self._say("continue: the same command with autoresume=true and a longer max_duration")
                    self._say(f"generate: mixattn generate {folder}{tok} --prompt 'def ' --max-new-tokens 64")

    return ConsoleReport()


class NonFiniteLossError(RuntimeError):
    pass


def _nonfinite_loss_guard(policy: str):
    """If any rank's loss is NaN/Inf: ``stop`` raises, naming the batch and the
    last checkpoint written; ``skip`` drops the batch: every gradient is set
    to None, so the optimizer leaves those parameters and their state alone
    (the learning-rate schedule still advances one batch; later microbatches
    of a flagged batch are dropped too).

    ``skip`` must decide before the optimizer step, so it reads the flag after
    every backward (the host waits for the GPU there). ``stop`` keeps the flag
    on the GPU and reads it when the batch ends, after Composer has waited for
    the step anyway: no extra wait per batch (measured: the wait after backward
    left the GPU idle ~5 ms per batch, docs/benchmarks.md). The bad step has
    then been applied in memory, but the raise comes before that batch's
    checkpoint, so the last checkpoint written is the last good state."""
    from composer.core import Callback
    from composer.utils import dist

    class NonFiniteLossGuard(Callback):
        def __init__(self):
            self.bad = False
            self.pending: torch.Tensor | None = None  # stop: any non-finite loss this batch, on the device
            self.skipped: list[int] = []

        def before_train_batch(self, state, logger):
            self.bad, self.pending = False, None

        def _stop(self, state, batch: int):
            saver = next((c for c in state.callbacks if type(c).__name__ == "CheckpointSaver"), None)
            last = saver.saved_checkpoints[-1] if saver is not None and saver.saved_checkpoints else None
            raise NonFiniteLossError(f"non-finite loss at batch {batch}; last checkpoint written: {last or 'none'} "
                                     "(set nonfinite_loss: skip to drop such batches instead)")

        def after_backward(self, state, logger):
            losses = state.loss.values() if isinstance(state.loss, dict) else [state.loss]
            flag = torch.stack([~torch.isfinite(x.detach()).all() for x in losses]).any().float().reshape(1)
            if policy == "stop":
                self.pending = flag if self.pending is None else torch.maximum(self.pending, flag)
                return
            dist.all_reduce(flag, reduce_operation="MAX")  # every rank takes the same decision
            self.bad = self.bad or bool(flag.item())
            if not self.bad:
                return
            batch = int(state.timestamp.batch) + 1
            for p in state.model.parameters():
                p.grad = None
            if not self.skipped or self.skipped[-1] != batch:
                self.skipped.append(batch)
                logger.log_metrics({"nonfinite_loss/skipped_batches": len(self.skipped)})

        def batch_end(self, state, logger):
            if self.pending is None:
                return
            dist.all_reduce(self.pending, reduce_operation="MAX")
            if bool(self.pending.item()):
                self._stop(state, int(state.timestamp.batch))  # the timestamp already counts this batch

    return NonFiniteLossGuard()


def _keep_fsdp_root_unsharded():
    """Composer passes the recipe's ``reshard_after_forward`` to every
    ``fully_shard`` call, the root's included, and since torch 2.8 an explicit
    True frees the root's parameters (embedding, final norm, output head) after
    forward, just before backward needs them again. On GPUs (torch 2.11,
    composer 0.32.1) the backward then read the freed storage of the bf16
    embedding ("setStorage ... out of bounds for storage of size 0"). Torch's
    own default keeps the root unsharded between forward and backward; this
    restores it before the first forward."""
    from composer.core import Callback

    class KeepFSDPRootUnsharded(Callback):
        def fit_start(self, state, logger):
            from torch.distributed.fsdp import FSDPModule

            # composer shards the ComposerModel's children: the plain model is the root
            for child in state.model.children():
                if isinstance(child, FSDPModule):
                    child.set_reshard_after_forward(False, recurse=False)

    return KeepFSDPRootUnsharded()


def device_free_bytes(device: str) -> int:
    """Free memory of this process's GPU (the whole device minus what other
    processes hold), or the host's available memory on the CPU."""
    if device == "gpu":
        return torch.cuda.mem_get_info(torch.cuda.current_device())[0]
    import psutil

    return psutil.virtual_memory().available


def checkpointing_choice(model: MixAttentionLM, cfg: TrainConfig, world: int, free_bytes: int | None = None):
    """What ``activation_checkpointing`` means for this model and device
    (:class:`mixattn.memory.Checkpointing`)."""
    from mixattn.memory import Checkpointing, choose_checkpointing

    n = len(model.blocks)
    if cfg.activation_checkpointing is True:
        return Checkpointing("full", tuple(range(n)), 0, 0, "activation_checkpointing: true")
    if cfg.activation_checkpointing is False:
        return Checkpointing("none", (), 0, 0, "activation_checkpointing: false")
    per_device = cfg.global_train_batch_size // world
    tokens = (cfg.device_train_microbatch_size or per_device) * cfg.model.max_seq_len
    shards = world if effective_fsdp(cfg, world) is not None else 1
    if free_bytes is None:
        free_bytes = device_free_bytes(resolve_device_precision(cfg)[0])
    return choose_checkpointing(cfg.model, model.plan, tokens, sum(p.numel() for p in model.parameters()),
                                cfg.optimizer.name, shards, free_bytes)


def apply_training_wrappers(model: MixAttentionLM, cfg: TrainConfig, world: int = 1, free_bytes: int | None = None):
    """Training features applied from outside the plain model (torchtitan
    style), in this order: activation checkpointing wraps the blocks that
    :func:`checkpointing_choice` picks; with FSDP, ``compile`` compiles each
    block (FSDP2's hooks stay outside the compiled regions, as torchtitan
    does); FSDP then wraps each block (composer, from ``_fsdp_wrap``);
    without FSDP composer compiles the whole model. Returns the
    checkpointing choice."""
    for block in model.blocks:
        block._fsdp_wrap = True  # composer's FSDP auto-wrap unit
    choice = checkpointing_choice(model, cfg, world, free_bytes)
    if choice.blocks:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        chosen = {id(model.blocks[i]) for i in choice.blocks}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in chosen)
    if cfg.compile and effective_fsdp(cfg, world) is not None:
        for block in model.blocks:  # a Block, or its checkpoint wrapper
            block.compile()
    return choice


def _drop_stale_autoresume_download(cfg: TrainConfig) -> None:
    """With a remote ``save_folder`` (s3://bucket/run), composer's autoresume
    downloads the bucket's latest checkpoint to the same string read as a local
    path (./s3:/bucket/run/latest-rank0.pt) and, on the next launch, prefers
    that local file if it exists: a relaunch from the same directory would
    resume from the checkpoint downloaded last time, not the bucket's newest.
    The bucket is the record; the download is a cache, removed here (on each
    node's local rank 0, before the Trainer looks)."""
    if not cfg.autoresume or "://" not in (cfg.save_folder or "") or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    local = Path(os.path.abspath(save_folder_path(cfg)))
    for stale in local.glob("latest-rank*.pt"):
        stale.unlink()


def save_folder_path(cfg: TrainConfig) -> str | None:
    return cfg.save_folder.replace("{run_name}", cfg.run_name) if cfg.save_folder else None


def checkpoint_bytes_estimate(model: torch.nn.Module, optimizer: str) -> int:
    """About the size of one full checkpoint: fp32 weights plus the
    optimizer's fp32 state (AdamW: two moments, Lion: one) and ~1% for the rest."""
    n = sum(p.numel() for p in model.parameters())
    return int(n * 4 * (3 if optimizer in ("decoupled_adamw", "adamw") else 2) * 1.01)


def _check_save_folder(cfg: TrainConfig, needed: int) -> None:
    """A save folder that cannot take the first checkpoint fails now, before
    any training: not writable, or less free space than one checkpoint."""
    import shutil

    folder = save_folder_path(cfg)
    if "://" in folder:
        return  # remote URIs are checked by composer's object store at the first upload
    p = Path(folder)
    used = sorted(x.name for x in p.glob("ep*-ba*")) if p.is_dir() else []
    if used and not cfg.autoresume:
        raise ConfigError(f"save_folder {folder!r} already holds checkpoints of a run ({', '.join(used[:3])}"
                          f"{', ...' if len(used) > 3 else ''}); set autoresume=true to continue that run, or choose "
                          "another save_folder (or remove the old checkpoints)")
    # the folder itself is made when the first checkpoint is written: a run that fails before leaves nothing behind
    existing = next(a for a in (p, *p.absolute().parents) if a.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        probe = existing / f".mixattn-write-probe-{os.getpid()}"  # per process: every rank checks the same folder
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"save_folder {folder!r} is not writable: {e}") from None
    from mixattn.plan import format_bytes

    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"save_folder {folder!r} has {format_bytes(free)} free but one checkpoint of this model "
                          f"takes about {format_bytes(needed)} (weights + optimizer state); free space or choose "
                          "another save_folder")


def _recover_autoresume_checkpoint(cfg: TrainConfig) -> None:
    """Before autoresume reads ``latest-rank0.pt``: point it at the newest
    complete checkpoint and set torn or corrupt ones aside
    (``checkpoint.recover_latest``). Done by global rank 0 only; the other
    ranks reach composer's autoresume after the process-group rendezvous,
    which rank 0 joins only after this."""
    folder = save_folder_path(cfg)
    if not cfg.autoresume or "://" in folder or os.environ.get("RANK", "0") != "0":
        return
    from mixattn.checkpoint import recover_latest

    recover_latest(folder)
