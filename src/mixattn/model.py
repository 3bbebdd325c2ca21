"""The MixAttention language model: an MPT-style pre-norm decoder whose layers
follow a :class:`~mixattn.plan.LayerPlan`.

Read top to bottom: config, RoPE, attention, MLP, block, model. A layer that
reuses another's KV has no K/V projections at all; it attends with its own
queries to the (post-RoPE) K/V tensors its source layer produced in the same
forward pass, so gradients flow into the source. Training features (FSDP,
activation checkpointing, compile, Composer) wrap this model from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixattn.attention import Documents, attend, check_backend, check_backend_name, document_start_mask
from mixattn.config import ConfigError, from_dict, load_yaml
from mixattn.mpt import plan_from_spec
from mixattn.plan import Layer, LayerPlan, attended_pairs
from mixattn.registry import Registry


@dataclass
class ModelConfig:
    """Model dimensions and the layer plan.

    plan: a preset name (see ``mixattn plan --list``), a compact pattern
        string, or a list of per-layer entries; ``window`` is the default
        sliding window in tokens.
    n_kv_heads: grouped KV heads (None: as many as n_heads).
    mlp_hidden: MLP hidden width (None: 4*d_model for gelu, 8/3*d_model
        rounded up to a multiple of 64 for swiglu).
    mlp_type "moe": a mixture-of-experts MLP (the paper's models are MoE):
        ``moe_experts`` SwiGLU experts of width ``mlp_hidden``, each token routed to
        ``moe_top_k`` of them; ``moe_aux_weight`` scales the load-balancing loss
        added to the training loss.
    rope_scaling: None, or {"type": "linear", "factor": f} (positions divided
        by f, i.e. position interpolation) for long-context extension; raising
        ``rope_theta`` is the other documented option.
    fp32_residual: under autocast (amp_bf16), keep the residual stream in
        float32 (True, MPT / llm-foundry's behaviour: the embedding's fp32
        output is what every block adds to) or in the autocast dtype (False,
        the default, as Megatron-LM's ``fp32_residual_connection: false``):
        half the bytes for every residual add and norm input, forward and
        backward. Norms still compute in float32. No effect without autocast.
        The default is False because its loss curve matches the float32
        stream's within seed noise under three seeds (docs/benchmarks.md,
        benchmarks/results/training/loss_bf16_residual_seeds.json).
    """

    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    max_seq_len: int = 2048
    plan: Any = "standard"
    window: int = 1024
    mlp_type: str = "gelu"
    mlp_hidden: int | None = None
    moe_experts: int = 8
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    init_std: float = 0.02
    attn_backend: str = "auto"
    fp32_residual: bool = False
    layer_plan: LayerPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("qk_norm", "bias", "tie_embeddings", "fp32_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.mlp_type not in MLPS:
            raise ValueError(f"unknown model.mlp_type {self.mlp_type!r}; valid: {', '.join(MLPS.names())}")
        if self.mlp_type == "moe":
            e, k = self.moe_experts, self.moe_top_k
            if not isinstance(e, int) or isinstance(e, bool) or e < 1:
                raise ValueError(f"model.moe_experts must be a positive integer, got {e!r}")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
                raise ValueError(f"model.moe_top_k must be in 1..moe_experts={e}, got {k!r}")
            if not isinstance(self.moe_aux_weight, (int, float)) or self.moe_aux_weight < 0:
                raise ValueError(f"model.moe_aux_weight must be a number >= 0, got {self.moe_aux_weight!r}")
        if self.norm_type not in NORMS:
            raise ValueError(f"unknown model.norm_type {self.norm_type!r}; valid: {', '.join(NORMS.names())}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("type")
            factor = dict(self.rope_scaling).get("factor")
            if kind != "linear" or not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"model.rope_scaling must be {{type: linear, factor: >= 1}}, got {self.rope_scaling!r}")
        check_backend_name(self.attn_backend)  # installed or not: checked where the model is built
        plan = self.plan
        if hasattr(plan, "keys") and "block_overrides" in plan:  # llm-foundry's form, read by mixattn.mpt
            plan = plan_from_spec(plan, self.n_layers)
        self.layer_plan = LayerPlan.parse(plan, self.n_layers, self.window).check(self.n_layers, self.max_seq_len)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp_type in ("swiglu", "moe"):
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def to_dict(self) -> dict:
        """Plain data; the plan is written as its explicit per-layer list."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["plan"] = self.layer_plan.to_list()
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> ModelConfig:
        return from_dict(cls, d, "model", source)


def load_model_config(path, overrides=()) -> ModelConfig:
    """The ``model:`` section of a recipe (or of a file that is only a model section)."""
    data = load_yaml(path, overrides)
    section = data["model"] if "model" in data else data
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'model' must be a mapping")
    return from_dict(ModelConfig, section, "model", str(path))


# -- norms and MLPs: registries, so new kinds plug in from outside -------------

NORMS: Registry = Registry("norm type")
NORMS.register("layernorm", lambda cfg, dim: nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias))
NORMS.register("rmsnorm", lambda cfg, dim: nn.RMSNorm(dim, eps=cfg.norm_eps))


class GeluMLP(nn.Module):
    """MPT's MLP: up, exact GELU, down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _fused_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes these inputs: rows 16-byte aligned,
    on CPU any float dtype, on CUDA bf16 on Hopper or newer (what
    torch.nn.functional.grouped_mm / torch._grouped_mm implement)."""
    if getattr(F, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        return False
    if any(n * x.element_size() % 16 for n in w.shape[1:]):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows of ``x`` [N, d], sorted by group, times their group's matrix
    ``w`` [G, d, h]; ``counts`` [G] rows per group. ``impl``: "fused" (one
    grouped GEMM kernel), "padded" (the groups padded to the largest and one
    batched matmul; any device, dtype and shape) or "auto" (fused where
    PyTorch implements it). Neither loops over groups in Python."""
    if impl == "auto":
        impl = "fused" if _fused_grouped_mm_ok(x, w) else "padded"
    if impl == "fused":
        op = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return op(x, w.to(x.dtype), offs=counts.cumsum(0).to(torch.int32))
    if impl != "padded":
        raise ValueError(f"grouped_matmul impl must be auto, fused or padded, got {impl!r}")
    g = w.shape[0]
    group = torch.repeat_interleave(torch.arange(g, device=x.device), counts, output_size=x.shape[0])
    starts = counts.cumsum(0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[group]
    width = int(counts.max()) if x.shape[0] else 0
    padded = x.new_zeros(g, width, x.shape[1])
    padded[group, slot] = x
    return torch.bmm(padded, w.to(x.dtype))[group, slot]


class MoE(nn.Module):
    """Mixture-of-experts MLP: a linear router picks ``moe_top_k`` of
    ``moe_experts`` SwiGLU experts per token (softmax over all experts, the
    chosen weights renormalised to sum to 1); tokens are sorted by expert and
    every expert's GEMMs run as one grouped GEMM. No token is dropped.

    Each forward leaves its Switch/GShard load-balancing loss in
    ``self.aux_loss``: ``E * sum_e f_e * P_e`` (f_e: the share of the N*k
    token-to-expert assignments that went to expert e, P_e: the mean router
    probability of e), 1.0 when routing is perfectly uniform. (An attribute,
    not a return value or an argument, so that wrappers that rebuild a
    block's inputs and outputs, as FSDP2 does, cannot lose it.)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(cfg.moe_experts, cfg.d_model, cfg.hidden))
        self.w_up = nn.Parameter(torch.empty(cfg.moe_experts, cfg.d_model, cfg.hidden))
        self.w_down = nn.Parameter(torch.empty(cfg.moe_experts, cfg.hidden, cfg.d_model))
        self.impl = "auto"
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor):
        """(weights [N, k], experts [N, k], probs [N, E]) for tokens x [N, d]."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts, probs

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, probs = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.n_experts)
        xs = x[token]
        h = F.silu(grouped_matmul(xs, self.w_gate, counts, self.impl)) * grouped_matmul(xs, self.w_up, counts, self.impl)
        y = grouped_matmul(h, self.w_down, counts, self.impl) * weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        share = counts.float() / flat.numel()
        self.aux_loss = self.n_experts * (share * probs.mean(dim=0)).sum()
        return out.view(shape)


MLPS: Registry = Registry("mlp type")
MLPS.register("gelu", GeluMLP)
MLPS.register("swiglu", SwiGLU)
MLPS.register("moe", MoE)


# -- RoPE -----------------------------------------------------------------------


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor):
    """cos, sin [B, T, 1, head_dim] in float32 for integer positions [B, T]
    (broadcast over the heads of a [B, T, H, head_dim] tensor). Computed from
    theta each call (no buffer a dtype cast could round)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device, dtype=torch.float32) / hd))
    pos = position_ids.float()
    if cfg.rope_scaling is not None:
        pos = pos / float(cfg.rope_scaling["factor"])
    freqs = pos[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start. doc_ids: [B, T]."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    last_start = torch.where(document_start_mask(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


# -- attention, block, model ------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: Layer, index: int):
        super().__init__()
        self.layer, self.kind, self.index = layer, layer.spec, index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        self.q_dim, self.kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if layer.owns_kv:  # one fused Q/K/V projection (as MPT's Wqkv): one GEMM, one weight read when decoding
            self.wqkv = nn.Linear(cfg.d_model, self.q_dim + 2 * self.kv_dim, bias=cfg.bias)
        else:  # a sharing layer has no K/V projections at all
            self.wq = nn.Linear(cfg.d_model, self.q_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm and layer.owns_kv else None

    def forward(self, x, cos, sin, docs=None, shared_kv=None, cache=None):
        """x [B, T, d]; docs a :class:`~mixattn.attention.Documents` or None.
        Returns (out [B, T, d], kv), kv what this layer attended to and its
        sharers reuse: (k, v) [B, Hkv, T, hd] post-RoPE, or with ``cache`` (a
        :class:`~mixattn.kv_cache.CacheStep`) the step's
        :class:`~mixattn.kv_cache.CachedKV`, which the step attends over."""
        b, t, _ = x.shape
        if self.layer.owns_kv:
            q, k, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            q = self.wq(x)
        # Norm and RoPE act on [B, T, H, hd], the layout the projection wrote
        # and flash-attn's kernels take; attention gets [B, H, T, hd] views of
        # it (SDPA's cuDNN/flash kernels accept the strides), no copies.
        q = q.view(b, t, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin).transpose(1, 2)
        if self.layer.owns_kv:
            k = k.view(b, t, self.n_kv_heads, self.head_dim)
            v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = apply_rope(k, cos, sin).transpose(1, 2)
            if cache is not None:
                shared_kv = cache.update(self.index, k, v)
        elif shared_kv is None:
            raise RuntimeError(f"layer reuses layer {self.layer.kv_source}'s KV but got none")
        if cache is not None:
            y = cache.attend(q, shared_kv, self.kind, self.layer.window, self.backend)
            return self.wo(y.transpose(1, 2).reshape(b, t, -1)), shared_kv
        if not self.layer.owns_kv:
            k, v = shared_kv
        y = attend(q, k, v, self.kind, self.layer.window, docs, self.backend)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1)), (k, v)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: Layer, index: int):
        super().__init__()
        self.norm_attn = NORMS.get(cfg.norm_type)(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer, index)
        self.norm_mlp = NORMS.get(cfg.norm_type)(cfg, cfg.d_model)
        self.mlp = MLPS.get(cfg.mlp_type)(cfg)

    def forward(self, x, cos, sin, docs=None, shared_kv=None, cache=None):
        h, kv = self.attn(self.norm_attn(x), cos, sin, docs, shared_kv, cache)
        x = x + h
        return x + self.mlp(self.norm_mlp(x)), kv


@dataclass
class LMOutput:
    """logits; loss: next-token cross-entropy plus, for MoE models,
    ``moe_aux_weight`` x the mean load-balancing loss (``aux_loss``)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MixAttentionLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the backend's package is importable (its device requirements surface at the first call)
        check_backend(cfg.attn_backend)
        self.cfg = cfg
        self.plan = cfg.layer_plan
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer, i) for i, layer in enumerate(self.plan))
        # the MoE MLPs, whose load-balancing losses forward() adds (a plain list: not registered twice)
        self.moe_layers: list[MoE] = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        self.norm_f = NORMS.get(cfg.norm_type)(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE tables for positions 0..max_seq_len-1, float32, not saved: a
        # gather per forward instead of sin/cos per element in every layer
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope_tables()
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # a cast of the model (.to(torch.bfloat16), .half()) would round the RoPE tables too: they
        # stay float32, recomputed where it changed them, so every path reads them as computed
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.reset_rope_tables()
        return self

    @torch.no_grad()
    def reset_rope_tables(self) -> None:
        """(Re)compute the RoPE tables (float32, on the buffers' device). A
        loader that builds the model on the meta device and restores only the
        saved tensors (transformers 5) must call this: the tables are not saved."""
        cos, sin = rope_cos_sin(self.cfg, torch.arange(self.cfg.max_seq_len, device=self.rope_cos.device)[None])
        self.rope_cos, self.rope_sin = cos[0, :, 0], sin[0, :, 0]

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2/MPT scaled init: N(0, init_std) everywhere, residual output
        projections (attention wo, MLP down) scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_resid = name.endswith(".wo") or name.endswith(".down")
                nn.init.normal_(module.weight, std=resid_std if is_resid else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_gate, std=std)
                nn.init.normal_(module.w_up, std=std)
                nn.init.normal_(module.w_down, std=resid_std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids [B, T] (T <= max_seq_len). labels [B, T] aligned with the
        inputs (shifted inside; -100 is ignored). doc_ids [B, T]: packed
        documents; positions then restart per document unless given.
        doc_starts: their starts per row (attention.document_starts, as the
        collator computes them), else computed from doc_ids where needed."""
        logits = self.logits(self.hidden_states(input_ids, position_ids, doc_ids, doc_starts))
        aux = torch.stack([m.aux_loss for m in self.moe_layers]).mean() if self.moe_layers else None
        if labels is None:
            return LMOutput(logits, None, aux)
        loss = next_token_loss(logits, labels)
        if aux is not None:
            loss = loss + self.cfg.moe_aux_weight * aux
        return LMOutput(logits, loss, aux)

    def hidden_states(self, input_ids, position_ids=None, doc_ids=None, doc_starts=None, cache=None, valid=None,
                      upto=None, contiguous=False) -> torch.Tensor:
        """The final normed hidden states [B, T, d_model] (before the output
        projection): the one loop over the plan, for training and decoding.

        Without ``cache``: the whole sequence (T <= max_seq_len); positions
        are ``position_ids``, else restart per document of ``doc_ids``, else
        0..T-1. With ``cache`` (a :class:`~mixattn.kv_cache.KVCache`): one
        incremental step over ``input_ids`` [B, C] at absolute
        ``position_ids`` [B, C] (consecutive per row; ``valid`` marks real
        tokens, ``upto`` bounds the global slots read, ``contiguous`` says the
        chunk continues every row's cached prefix: see
        :meth:`~mixattn.kv_cache.KVCache.step`)."""
        b, t = input_ids.shape
        docs = step = None
        if cache is not None:
            step = cache.step(position_ids, valid, upto, contiguous)  # positions < max_seq_len: generate() checks before allocating
        else:
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
            if position_ids is None:
                if doc_ids is not None:
                    position_ids = positions_from_doc_ids(doc_ids)
                else:
                    position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
            # the documents' masks, built once here for every layer kind that needs one (not once per layer)
            if doc_ids is not None:
                docs = Documents(doc_ids, doc_starts).prepare(self.plan, self.cfg.attn_backend, input_ids.device)
        cos, sin = self.rope(position_ids)
        x = self.residual_stream(self.embed(input_ids))
        sources = self.plan.sources
        kv_by_layer: dict[int, tuple] = {}  # the KV each owner layer produced, for the layers that reuse it
        for i, (layer, block) in enumerate(zip(self.plan, self.blocks)):
            x, kv = block(x, cos, sin, docs, kv_by_layer.get(layer.kv_source), step)
            if i in sources:
                kv_by_layer[i] = kv
        return self.norm_f(x)

    def residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding output as the residual stream: cast to the autocast
        dtype when ``fp32_residual`` is off and autocast is on."""
        if not self.cfg.fp32_residual and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, valid: torch.Tensor | None = None,
                       upto: int | None = None) -> torch.Tensor:
        """Incremental forward over a :class:`~mixattn.kv_cache.KVCache`
        (see :meth:`hidden_states`). Returns logits [B, C, vocab]."""
        return self.logits(self.hidden_states(input_ids, positions, cache=cache, valid=valid, upto=upto))

    def rope(self, position_ids: torch.Tensor):
        """cos, sin [B, T, 1, head_dim] (float32) for positions [B, T]."""
        if self.rope_cos.dtype != torch.float32:  # cast past _apply (a wrapper's own buffer cast): recompute exactly
            return rope_cos_sin(self.cfg, position_ids)
        return self.rope_cos[position_ids][:, :, None], self.rope_sin[position_ids][:, :, None]

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)

    def flops_per_sequence(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) for one sequence of
        ``seq_len`` tokens, from the real plan: 2 FLOPs per weight-matrix
        element per token (sharing layers have no K/V matmuls; an MoE token
        uses top_k of the experts) plus attention 4 * head_dim * n_heads per
        unmasked query-key pair (a sliding layer sees at most W keys)."""
        cfg = self.cfg
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
        # MoE experts ([E, d, h] weights): a token passes through top_k of the E experts
        matmul_params += sum(p.numel() * cfg.moe_top_k // cfg.moe_experts for p in self.parameters() if p.dim() == 3)
        head = cfg.vocab_size * cfg.d_model  # the (tied or untied) output projection
        fwd = 2 * (matmul_params + (head if cfg.tie_embeddings else 0)) * seq_len
        for layer in self.plan:
            fwd += 4 * cfg.head_dim * cfg.n_heads * attended_pairs(seq_len, layer.window)
        return 3.0 * fwd

    def num_active_params(self) -> int:
        """Parameters a token passes through: all but the MoE experts a token
        is not routed to (top_k of moe_experts)."""
        experts = sum(p.numel() for p in self.parameters() if p.dim() == 3)
        return self.num_params() - experts + experts * self.cfg.moe_top_k // self.cfg.moe_experts

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] at position t against labels[t + 1]
    (labels aligned with the inputs; -100 ignored), in float32. With
    reduction "none" the result is [B, T - 1]."""
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction=reduction)
    return loss.view(target.shape) if reduction == "none" else loss


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden`` [B, T, d] projected by ``weight``
    [V, d] against ``labels`` [B, T] (shifted inside, -100 ignored), without
    materializing the [B*T, V] float32 logits: each chunk of ``chunk_tokens``
    rows is projected, scored and recomputed in the backward pass
    (activation checkpointing). Equals ``F.cross_entropy`` on full logits."""
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].flatten(0, 1)
    y = labels[:, 1:].flatten()

    def chunk_loss(h_chunk, y_chunk, w):
        return F.cross_entropy(F.linear(h_chunk, w).float(), y_chunk, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(chunk_loss, h[start:start + chunk_tokens], y[start:start + chunk_tokens], weight,
                                   use_reentrant=False)
    return total / (y != -100).sum().clamp(min=1)
