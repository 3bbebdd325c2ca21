"""Faults during training (issue #7, in part): a NaN loss either stops the run
naming the batch and the last checkpoint, or is skipped without touching the
weights or the optimizer state."""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from mixattn.config import ConfigError
from mixattn.training.callbacks import NonFiniteLossError
from mixattn.training.trainer import build_trainer
from test_train import _cfg


def _injector(at_batch: int, value=float("nan")):
    """Makes the loss of batch ``at_batch`` (1-based) non-finite after it is computed."""
    from composer.core import Callback

    class Inject(Callback):
        def after_loss(self, state, logger):
            if int(state.timestamp.batch) + 1 == at_batch:
                state.loss = state.loss * value

    return Inject()


def _snapshots():
    """Weights and Adam moments at the start of every batch and at the end: snaps[k] is the
    state after k batches. (Composer fires after_train_batch inside the optimizer's closure,
    before the update, so batch_start is where the previous update is complete.)"""
    from composer.core import Callback

    snaps, losses = [], []

    def take(state):
        opt = state.optimizers[0]
        moments = [opt.state[p]["exp_avg"].clone() for p in state.model.parameters() if p in opt.state]
        snaps.append(({k: v.detach().clone() for k, v in state.model.model.state_dict().items()}, moments))

    class Snap(Callback):
        def batch_start(self, state, logger):
            take(state)

        def after_backward(self, state, logger):
            losses.append(float(state.loss.detach()))

        def fit_end(self, state, logger):
            take(state)

    return Snap(), snaps, losses


@pytest.mark.parametrize("interval", ["1ba", "2ba"])
def test_nan_loss_stops_naming_the_batch_and_the_last_checkpoint(corpus, tmp_path, interval):
    # the flag is read when the batch ends: the bad batch's own checkpoint (interval 1ba) is never written
    cfg = _cfg(corpus, tmp_path, "max_duration=6ba", f"save_interval={interval}")
    trainer = build_trainer(cfg, extra_callbacks=[_injector(3)])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at batch 3; last checkpoint written: .*ep0-ba2-rank0\.pt"):
        trainer.fit()
    trainer.close()
    assert not list(Path(cfg.save_folder).glob("ep0-ba3*"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_is_skipped_without_touching_weights_or_optimizer(corpus, tmp_path, value):
    cfg = _cfg(corpus, tmp_path, "max_duration=5ba", "save_folder=null", "nonfinite_loss=skip", "scheduler.t_warmup=0ba")
    snap, snaps, losses = _snapshots()
    trainer = build_trainer(cfg, extra_callbacks=[_injector(3, value), snap])
    trainer.fit()
    trainer.close()
    assert len(snaps) == 6 and len(losses) == 5
    assert not math.isfinite(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    (w2, m2), (w3, m3), (w4, _) = snaps[2], snaps[3], snaps[4]  # after batches 2, 3, 4
    assert any(not torch.equal(snaps[1][0][k], w2[k]) for k in w2)  # batch 2 trained
    for k in w2:
        assert torch.equal(w2[k], w3[k]), k  # batch 3 changed nothing
    assert len(m2) == len(m3) > 0 and all(torch.equal(a, b) for a, b in zip(m2, m3))  # nor the Adam moments
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # batch 4 trained again


def test_unknown_nonfinite_policy_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="tiny-cpu.yaml: nonfinite_loss must be 'stop' or 'skip', got 'ignore'"):
        _cfg(corpus, tmp_path, "nonfinite_loss=ignore")  # when the recipe loads


@pytest.mark.parametrize("value, got", [("0", "0.0"), ("-5", "-5.0")])
def test_a_dist_timeout_that_is_not_positive_is_refused(corpus, tmp_path, value, got):
    with pytest.raises(ConfigError, match=f"tiny-cpu.yaml: dist_timeout must be a positive number of seconds, got {got}"):
        _cfg(corpus, tmp_path, f"dist_timeout={value}")


def test_a_dist_timeout_that_is_not_a_number_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="tiny-cpu.yaml: dist_timeout must be float, got 'soon'"):
        _cfg(corpus, tmp_path, "dist_timeout=soon")


def test_unwritable_save_folder_fails_before_training(corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"save_folder '.*a-file/ckpt' is not writable"):
        build_trainer(_cfg(corpus, tmp_path, f"save_folder={blocker / 'ckpt'}"))


class Payload:
    """What an attacker's pickle would carry: any importable class."""


def test_a_checkpoint_that_would_unpickle_code_is_refused(tmp_path):
    from mixattn.checkpoint import CheckpointError, load_model

    path = tmp_path / "evil.pt"
    torch.save({"state": {"model": {"x": Payload()}}}, path)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*evil\.pt' \(weights only\)"):
        load_model(path)


def test_redact_replaces_credentials_and_keeps_the_rest():
    from mixattn.config import redact

    cfg = {"data": {"train": [{"local": "/data/a", "remote": "https://bob:hunter2@host/mds?X-Amz-Signature=abc&part=1&sig=zz"}]},
           "fsdp": {"api_key": "k1", "aws_secret_access_key": "s3cr3t", "sharding_strategy": "FULL_SHARD", "token": None},
           "max_tokens": 5, "save_folder": "s3://bucket/run", "betas": (0.9, 0.95), "wandb": {"project": "p"}}
    assert redact(cfg) == {
        "data": {"train": [{"local": "/data/a", "remote": "https://bob:***@host/mds?X-Amz-Signature=***&part=1&sig=***"}]},
        "fsdp": {"api_key": "***", "aws_secret_access_key": "***", "sharding_strategy": "FULL_SHARD", "token": None},
        "max_tokens": 5, "save_folder": "s3://bucket/run", "betas": (0.9, 0.95), "wandb": {"project": "p"}}


def test_the_saved_and_logged_recipe_carries_no_credentials(corpus, tmp_path, capfd, monkeypatch):
    from mixattn.checkpoint import load_checkpoint
    from test_train import _fit

    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # a stream whose remote carries a password and a signature; its local copy is complete, so nothing is fetched
    # (a copy: with a remote, streaming deletes each zip it decompresses)
    remote = "s3://bob:hunter2@127.0.0.1:9/mds?X-Amz-Signature=sig-secret-42"
    local = tmp_path / "mds" / "train"
    shutil.copytree(corpus / "mds64" / "train", local)
    stream = f"data.train=[{{local: {local}, remote: '{remote}'}}]"
    capfd.readouterr()
    _fit(_cfg(corpus, tmp_path, "max_duration=2ba", "save_interval=2ba", stream, "wandb={project: t, mode: offline}",
              "progress_bar=false"))
    out = capfd.readouterr()
    logs = out.out + out.err
    assert "s3://bob:***@127.0.0.1:9/mds?X-Amz-Signature=***" in logs  # the recipe is logged at the start, redacted
    ckpt = tmp_path / "ckpt" / "ep0-ba2-rank0.pt"
    recipe = load_checkpoint(ckpt)["state"]["model"]["_extra_state"]["mixattn_recipe"]
    assert recipe["data"]["train"][0]["remote"] == "s3://bob:***@127.0.0.1:9/mds?X-Amz-Signature=***"
    assert recipe["model"]["plan"] and recipe["max_duration"] == "2ba"  # the full resolved recipe
    written = [ckpt.read_bytes()] + [p.read_bytes() for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    for secret in ("hunter2", "sig-secret-42", "wandb-secret-0123456789"):
        assert secret not in logs and not any(secret.encode() in b for b in written), secret


def test_bad_device_and_precision_are_named(corpus, tmp_path):
    cases = [(["device=cpu", "precision=amp_bf16"], "precision amp_bf16 needs device: gpu .*valid on cpu: fp32, auto"),
             (["device=tpu"], "device 'tpu' is not one of auto, cpu, gpu"),
             (["precision=bf16"], "precision 'bf16' is not one of auto, fp32, amp_bf16, amp_fp16, amp_fp8")]
    if not torch.cuda.is_available():
        cases.append((["device=gpu"], "device: gpu, but no CUDA device is visible; valid here: cpu, auto"))
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_trainer(_cfg(corpus, tmp_path, *overrides))
    assert not (tmp_path / "ckpt").exists()  # refused before anything was made


def test_bad_inference_device_and_dtype_are_named():
    from mixattn.cli import _device, _dtype

    assert _device("cpu") == "cpu" and _dtype("auto", "cpu") == torch.float32 and _dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N"):
        _device("tpu")
    with pytest.raises(ValueError, match=f"--device cuda:{torch.cuda.device_count()}: {torch.cuda.device_count()} CUDA"):
        _device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="unknown --dtype 'int8'"):
        _dtype("int8", "cpu")
    if torch.cpu._is_avx512_bf16_supported():
        assert _dtype("bf16", "cpu") == torch.bfloat16  # native on this CPU
    else:
        with pytest.raises(ValueError, match=r"--dtype bf16 on this CPU \(.*no native bf16\) .*valid here: fp32"):
            _dtype("bf16", "cpu")


def test_ranks_checking_one_save_folder_at_once_do_not_trip_over_each_other(tmp_path):
    """Every rank checks that the save folder is writable; with one shared
    probe file name one rank's cleanup made another's fail ('not writable: No
    such file or directory', a flaky 2-rank crash-recovery run in CI)."""
    import multiprocessing as mp

    from _save_probe import probe_many

    with mp.get_context("spawn").Pool(4) as pool:
        # a bounded wait: a worker that never answers fails the test instead of hanging the suite
        errors = pool.starmap_async(probe_many, [(str(tmp_path / "ckpt"), 400)] * 4).get(timeout=300)
    assert errors == [None] * 4
    # the probe goes to the nearest existing folder (the save folder is made at the first save); none is left behind
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("global_train_batch_size=0", "global_train_batch_size must be a positive integer, got 0"),
    ("device_eval_batch_size=-2", "device_eval_batch_size must be a positive integer, got -2"),
    ("device_train_microbatch_size=0", "device_train_microbatch_size must be a positive integer, auto (the largest that fits "),
    ("optimizer.lr=-1", "optimizer.lr must be positive, got -1.0"),
    ("optimizer.lr=0", "optimizer.lr must be positive, got 0.0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be >= 0, got -0.1"),
    ("scheduler.alpha_f=-1", "scheduler.alpha_f must be in [0, 1] (the final learning rate over the peak), got -1.0"),
    ("grad_clip_norm=-1", "grad_clip_norm must be positive or null (no clipping), got -1.0"),
    ("save_num_checkpoints_to_keep=-5", "save_num_checkpoints_to_keep must be -1 (keep all) or an integer >= 0, got -5"),
    ("eval_subset_num_batches=0", "eval_subset_num_batches must be -1 (every batch) or a positive integer, got 0"),
])
def test_batch_sizes_and_learning_rates_that_cannot_train_are_refused_when_the_recipe_loads(corpus, tmp_path, override, message):
    # before: a batch of 0 was an AttributeError inside streaming, a microbatch of 0 silently meant the whole
    # batch, a negative alpha_f or clipping norm trained
    with pytest.raises(ConfigError, match=f"tiny-cpu.yaml: {re.escape(message)}"):
        _cfg(corpus, tmp_path, override)
