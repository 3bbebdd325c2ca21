"""The Composer callbacks a mixattn run adds to the Trainer: the resolved
recipe as hyperparameters, the console report, the non-finite loss guard, and
the FSDP2 root fix."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from composer.core import Callback
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule

from mixattn.training.recipe import TrainConfig, save_folder_path


def say(text: str) -> None:
    """One line of a run's console output, from global rank 0 only."""
    if dist.get_global_rank() == 0:
        print(f"mixattn: {text}", flush=True)


def _resolved(path: Path | None) -> str | None:
    """Where a ``latest-rank0.pt`` link points, or None if there is none. The
    link may be replaced while it is read (Composer removes and re-creates it
    when it saves; on several nodes with one save folder another node's saver
    may do so at that moment): a link that vanishes between the check and
    the read counts as none, it does not end the run."""
    try:
        return str(path.resolve()) if path is not None and path.exists() else None
    except OSError:
        return None


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for the MFU the console prints


class LogRecipe(Callback):
    """The resolved (redacted) recipe as hyperparameters: printed by the
    console logger at the start, the run config in wandb."""

    def __init__(self, recipe: dict):
        self.recipe = recipe

    def init(self, state, logger):
        logger.log_hyperparameters({"mixattn_recipe": self.recipe})


class ConsoleReport(Callback):
    """What a run says on the console, one line each, on rank 0: that it
    resumed and from where; every evaluation (step, loss, perplexity,
    accuracy, tokens/s and MFU since the last report); at the end the final
    metrics, the checkpoint, the wall time and how to continue or generate.
    (Composer's progress bar cuts its postfix at the terminal's width.)"""

    def __init__(self, cfg: TrainConfig, device: str):
        self.cfg = cfg
        self.peak = None
        if device == "gpu":
            name = torch.cuda.get_device_name()
            self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        self.last = None  # (time, tokens, samples) at the previous report
        self.start = None
        self.final: dict = {}

    def fit_start(self, state, logger):
        self.start = time.time()
        ts = state.timestamp
        self.last = (self.start, int(ts.token), int(ts.sample))
        if int(ts.batch) > 0 and dist.get_global_rank() == 0:  # (only rank 0 says it: no other rank reads the link)
            folder = save_folder_path(self.cfg)
            latest = Path(folder) / "latest-rank0.pt" if folder and "://" not in folder else None
            say(f"resumed at batch {int(ts.batch)} ({int(ts.token):,} tokens) from "
                f"{_resolved(latest) or folder or self.cfg.load_path}")

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
        if self.peak is not None:
            model = state.model.module if hasattr(state.model, "module") else state.model
            inner = model.model
            flops = (int(ts.sample) - sam0) * inner.flops_per_sequence(self.cfg.model.max_seq_len)
            parts.append(f"MFU {flops / max(now - t0, 1e-9) / self.peak / dist.get_world_size():.1%}")
        say(", ".join(parts))
        self.final = values
        self.last = (now, int(ts.token), int(ts.sample))

    def fit_end(self, state, logger):
        wall = time.time() - (self.start or time.time())
        ts = state.timestamp
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.final.items()) or "no evaluation ran"
        say(f"done: {int(ts.batch)} batches, {int(ts.token):,} tokens in {wall / 60:.1f} min; final eval: {metrics}")
        folder = save_folder_path(self.cfg)
        if folder and "://" not in folder and dist.get_global_rank() == 0:
            ckpt = _resolved(Path(folder) / "latest-rank0.pt")
            if ckpt is not None:
                # the checkpoint records the data's tokenizer: generate needs none named
                model = state.model.module if hasattr(state.model, "module") else state.model
                tok = "" if model.tokenizer_record else " --tokenizer TOKENIZER"
                say(f"checkpoint: {ckpt}")
                say("continue: the same command with autoresume=true and a longer max_duration")
                say(f"generate: mixattn generate {folder}{tok} --prompt 'def ' --max-new-tokens 64")


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard(Callback):
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

    def __init__(self, policy: str):
        self.policy = policy
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
        if self.policy == "stop":
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


class KeepFSDPRootUnsharded(Callback):
    """Composer passes the recipe's ``reshard_after_forward`` to every
    ``fully_shard`` call, the root's included, and since torch 2.8 an explicit
    True frees the root's parameters (embedding, final norm, output head) after
    forward, just before backward needs them again. On GPUs (torch 2.11,
    composer 0.32.1) the backward then read the freed storage of the bf16
    embedding ("setStorage ... out of bounds for storage of size 0"). Torch's
    own default keeps the root unsharded between forward and backward; this
    restores it before the first forward."""

    def fit_start(self, state, logger):
        # composer shards the ComposerModel's children: the plain model is the root
        for child in state.model.children():
            if isinstance(child, FSDPModule):
                child.set_reshard_after_forward(False, recurse=False)
