"""Loading a trained model from a Composer checkpoint, without unpickling
code: ``torch.load(weights_only=True)`` with an allowlist of the plain data
types Composer stores besides tensors (its RNG states are numpy arrays, its
timestamps timedeltas). The model config comes from the checkpoint itself
(``mixattn_model_config``, written by every training run)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import torch

from mixattn.model import MixAttentionLM, ModelConfig


def _safe_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint8, np.bool_)}
    return [datetime.timedelta, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes,
            torch.torch_version.TorchVersion]


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded weights-only. Clear errors for a missing,
    truncated or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled code, not a torch file
        raise CheckpointError(f"cannot load checkpoint {str(p)!r} (weights only): {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **overrides) -> MixAttentionLM:
    """A MixAttentionLM with the checkpoint's config (``overrides`` may set
    fields such as attn_backend) and weights, in eval mode."""
    state = load_checkpoint(path)
    try:
        model_state = state["state"]["model"]
        cfg_dict = model_state["_extra_state"]["mixattn_model_config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a mixattn training checkpoint (no state.model._extra_state.mixattn_model_config)") from None
    cfg = ModelConfig.from_dict({**cfg_dict, **overrides})
    model = MixAttentionLM(cfg)
    weights = {k.removeprefix("model."): v for k, v in model_state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recorded config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device=device, dtype=dtype).eval()
