"""Training features applied to the plain model from outside, in one ordered
function (torchtitan's ``parallelize_llama`` shape): activation checkpointing,
then compile, then FSDP2/HSDP or DDP. The model file knows none of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch
from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.device_mesh import init_device_mesh

from mixattn.config import ConfigError
from mixattn.memory import Checkpointing, choose_checkpointing, choose_microbatch
from mixattn.model import MixAttentionLM
from mixattn.training.callbacks import KeepFSDPRootUnsharded
from mixattn.training.recipe import TrainConfig


@dataclass
class Parallelized:
    """What :func:`parallelize` did to the model and what it hands Composer."""

    checkpointing: Checkpointing  # the blocks wrapped, and why
    microbatch: int  # device_train_microbatch_size as resolved (auto: from the memory estimate)
    microbatch_reason: str  # why (what auto chose, or what the recipe set)
    fsdp: dict | None  # the recipe's fsdp options where applied (None: one process, or DDP)
    parallelism_config: dict | None  # Composer's: FSDP2 (HSDP on a 2-D mesh) or FSDP1; None: DDP / one process
    compile_config: dict | None  # Composer's: compile the whole model (None: not, or per block done here)
    callbacks: list = field(default_factory=list)  # what the chosen parallelism needs at fit time


def parallelize(model: MixAttentionLM, cfg: TrainConfig, world: int = 1, device: str = "cpu",
                free_bytes: int | None = None) -> Parallelized:
    """Apply the recipe's training features to ``model``, in this order:

    0. the microbatch: ``device_train_microbatch_size: auto`` is resolved
       from the memory estimate (:func:`microbatch_choice`) before anything
       else, since checkpointing is chosen for that microbatch;
    1. activation checkpointing wraps the blocks :func:`checkpointing_choice`
       picks (none, every k-th, or every block);
    2. compile: under FSDP each block is compiled here, so FSDP2's
       unshard/reshard hooks stay outside the compiled regions (as torchtitan
       does); otherwise Composer compiles the whole model
       (``compile_config``);
    3. FSDP2 (HSDP where the recipe gives both degrees) shards each block,
       marked ``_fsdp_wrap``, then the root, through Composer's
       ``parallelism_config``; the root stays unsharded between forward and
       backward (:class:`KeepFSDPRootUnsharded`). Without ``fsdp``, several
       processes train with DDP (Composer's default) and one process with
       nothing.
    """
    fsdp = effective_fsdp(cfg, world)
    for block in model.blocks:
        block._fsdp_wrap = True  # composer's FSDP auto-wrap unit (the block inside any checkpoint wrapper)
    if free_bytes is None and (cfg.device_train_microbatch_size == "auto" or cfg.activation_checkpointing == "auto"):
        free_bytes = agreed_free_bytes(device, world)  # read once: both choices see the same memory, on every rank
    micro, micro_reason = microbatch_choice(model, cfg, world, free_bytes, device)
    choice = checkpointing_choice(model, cfg, world, micro, free_bytes, device)
    if choice.blocks:
        chosen = {id(model.blocks[i]) for i in choice.blocks}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in chosen)
    if cfg.compile and fsdp is not None:
        for block in model.blocks:  # a Block, or its checkpoint wrapper
            block.compile()
    callbacks = [KeepFSDPRootUnsharded()] if fsdp is not None and fsdp.get("version", 2) == 2 else []
    return Parallelized(choice, micro, micro_reason, fsdp, parallelism_config(fsdp, world, device),
                        {} if cfg.compile and fsdp is None else None, callbacks)


def effective_fsdp(cfg: TrainConfig, world: int) -> dict | None:
    """The recipe's fsdp options, or None where there is nothing to shard:
    one process (as torchtitan applies FSDP only when its shard degree is
    above 1; the same recipe then trains on one GPU without FSDP's hooks)."""
    return cfg.fsdp if cfg.fsdp is not None and world > 1 else None


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


def parallelism_config(fsdp: dict | None, world: int = 1, device: str = "cpu") -> dict | None:
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
    shape = hsdp_mesh_shape(options, world)
    options.pop("data_parallel_replicate_degree", None)
    options.pop("data_parallel_shard_degree", None)
    if shape is not None:
        dist.initialize_dist(DeviceGPU() if device == "gpu" else DeviceCPU())  # the mesh needs the process group
        options["device_mesh"] = init_device_mesh("cuda" if device == "gpu" else "cpu", shape,
                                                  mesh_dim_names=("dp_replicate", "dp_shard"))
    try:
        return {"fsdp": FSDP2Config.from_compatible_attrs(options)}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"fsdp: {e}") from None


def device_free_bytes(device: str) -> int:
    """Free memory of this process's GPU (the whole device minus what other
    processes hold), or the host's available memory on the CPU."""
    if device == "gpu":
        return torch.cuda.mem_get_info(torch.cuda.current_device())[0]
    return psutil.virtual_memory().available


def agreed_free_bytes(device: str, world: int) -> int:
    """The least free memory of any process's device: every rank then makes
    the same ``auto`` choices (FSDP's collectives run per microbatch, so
    ranks that split their batches differently would wait on each other)."""
    free = device_free_bytes(device)
    if world <= 1:
        return free
    least = torch.tensor([free], dtype=torch.int64, device="cuda" if device == "gpu" else "cpu")
    dist.all_reduce(least, reduce_operation="MIN")
    return int(least.item())


def microbatch_choice(model: MixAttentionLM, cfg: TrainConfig, world: int, free_bytes: int | None = None,
                      device: str = "cpu") -> tuple[int, str]:
    """(microbatch, why): what ``device_train_microbatch_size`` means for this
    model, world and device (auto: :func:`mixattn.memory.choose_microbatch`)."""
    per_device = cfg.global_train_batch_size // world
    if cfg.device_train_microbatch_size != "auto":
        micro = cfg.device_train_microbatch_size or per_device
        return micro, f"microbatch {micro} (device_train_microbatch_size: {cfg.device_train_microbatch_size})"
    shards = state_shards(cfg, world)
    if free_bytes is None:
        free_bytes = device_free_bytes(device)
    return choose_microbatch(cfg.model, model.plan, per_device, param_count(model), cfg.optimizer.name, shards,
                             free_bytes)


def state_shards(cfg: TrainConfig, world: int) -> int:
    """Over how many processes the weights, gradients and optimizer state
    are split: the FSDP world, the shard degree under HSDP (each replica
    holds a whole copy), 1 without FSDP (DDP replicates everything)."""
    fsdp = effective_fsdp(cfg, world)
    if fsdp is None:
        return 1
    mesh = hsdp_mesh_shape(fsdp, world)
    return world if mesh is None else mesh[1]


def param_count(model: MixAttentionLM) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpointing_choice(model: MixAttentionLM, cfg: TrainConfig, world: int, micro: int, free_bytes: int | None = None,
                         device: str = "cpu"):
    """What ``activation_checkpointing`` means for this model and device
    (:class:`mixattn.memory.Checkpointing`), for microbatches of ``micro``
    sequences (:func:`microbatch_choice`'s)."""
    n = len(model.blocks)
    if cfg.activation_checkpointing is True:
        return Checkpointing("full", tuple(range(n)), 0, 0, "activation_checkpointing: true")
    if cfg.activation_checkpointing is False:
        return Checkpointing("none", (), 0, 0, "activation_checkpointing: false")
    if free_bytes is None:
        free_bytes = device_free_bytes(device)
    return choose_checkpointing(cfg.model, model.plan, micro * cfg.model.max_seq_len, param_count(model),
                                cfg.optimizer.name, state_shards(cfg, world), free_bytes)
