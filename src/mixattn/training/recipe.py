"""The recipe: its schema (typed dataclasses), loading YAML plus command-line
overrides into it, and what a recipe can say about itself (its keys, its
resolved values). Every check that needs only the recipe runs here, when it
loads; nothing here imports Composer."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mixattn.config import ConfigError, check_override_keys, from_dict, load_yaml
from mixattn.freeze import check_trainable
from mixattn.model import ModelConfig


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

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")


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
        if not 0 <= self.alpha_f <= 1:  # the final learning rate as a fraction of the peak
            raise ConfigError(f"scheduler.alpha_f must be in [0, 1] (the final learning rate over the peak), got {self.alpha_f!r}")


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
    # auto: the largest divisor of the per-device batch that fits without checkpointing (mixattn.memory.choose_microbatch);
    # None: the whole per-device batch
    device_train_microbatch_size: int | str | None = None
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
    # seconds a process waits for the others to join the process group (and
    # for any collective): a rank that never comes fails the launch this soon
    dist_timeout: float = 600.0
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
            check_trainable(self.trainable)
        if self.nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"nonfinite_loss must be 'stop' or 'skip', got {self.nonfinite_loss!r}")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) or self.dist_timeout <= 0:
            raise ConfigError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}")
        for key in ("global_train_batch_size", "device_eval_batch_size"):
            if getattr(self, key) < 1:  # 0 reached the loader as an AttributeError deep in streaming
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ConfigError(f"grad_clip_norm must be positive or null (no clipping), got {self.grad_clip_norm!r}")
        if self.save_num_checkpoints_to_keep < -1:
            raise ConfigError(f"save_num_checkpoints_to_keep must be -1 (keep all) or an integer >= 0, "
                              f"got {self.save_num_checkpoints_to_keep!r}")
        if self.eval_subset_num_batches == 0 or self.eval_subset_num_batches < -1:
            raise ConfigError(f"eval_subset_num_batches must be -1 (every batch) or a positive integer, "
                              f"got {self.eval_subset_num_batches!r}")
        micro = self.device_train_microbatch_size
        if micro is not None and micro != "auto" and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
            # 0 was read as "unset": the whole per-device batch, silently
            raise ConfigError(f"device_train_microbatch_size must be a positive integer, auto (the largest that fits "
                              f"without activation checkpointing) or null (the whole per-device batch), got {micro!r}")
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ConfigError(f"activation_checkpointing must be auto, true or false, got {self.activation_checkpointing!r}")


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """YAML + dot-list overrides -> TrainConfig."""
    check_override_keys(overrides, TrainConfig)
    data = load_yaml(path, overrides)
    if "model" not in data or "data" not in data:
        raise ConfigError(f"{path}: a recipe needs 'model' and 'data' sections")
    return from_dict(TrainConfig, data, "", str(path))


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


def save_folder_path(cfg: TrainConfig) -> str | None:
    return cfg.save_folder.replace("{run_name}", cfg.run_name) if cfg.save_folder else None
