"""Training end to end on MDS data written here: loss goes down, a stopped
and resumed run is bit-exact, checkpoints carry their config, long-context
extension loads weights, and bad recipes/data are rejected."""

import gc
import itertools
import json
from pathlib import Path

import pytest
import torch

from mixattn.config import ConfigError
from mixattn.data import DataError, convert_to_mds, doc_ids_from_eos, load_tokenizer
from mixattn.training.recipe import load_recipe, recipe_to_dict
from mixattn.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "yamls" / "pretrain" / "tiny-cpu.yaml"


def _cfg(corpus, tmp_path, *overrides, data="mds64"):
    base = [
        f"data.train=[{{local: {corpus / data / 'train'}}}]", f"data.eval=[{{local: {corpus / data / 'val'}}}]",
        "model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=64",
        "model.window=16", "model.plan=ma", "model.attn_backend=sdpa", "global_train_batch_size=8", "device_eval_batch_size=8",
        "progress_bar=false", "eval_subset_num_batches=2", "eval_interval=1000ba", "scheduler.t_warmup=2ba",
        f"save_folder={tmp_path / 'ckpt'}", "save_interval=4ba",
    ]
    return load_recipe(RECIPE, base + list(overrides))


class Recorder:
    """Records each batch's loss and input ids."""

    def __init__(self):
        self.losses, self.inputs = [], []

    def as_callback(self):
        from composer.core import Callback

        rec = self

        class _CB(Callback):
            def fit_start(self, state, logger):
                rec.start_weights = {k: v.detach().clone() for k, v in state.model.model.state_dict().items()}

            def after_train_batch(self, state, logger):
                rec.losses.append(float(state.loss.detach()))
                rec.inputs.append(state.batch["input_ids"].clone())

        return _CB()


class Killed(Exception):
    pass


def _killer(after_batches):
    """Raises at the start of batch after_batches + 1, after the previous
    batch's checkpoint was written: a crash, with the schedule untouched."""
    from composer.core import Callback

    class _Kill(Callback):
        def batch_start(self, state, logger):
            if int(state.timestamp.batch) == after_batches:
                raise Killed(after_batches)

    return _Kill()


def _fit(cfg, stop_after=None):
    rec = Recorder()
    callbacks = [rec.as_callback()] + ([_killer(stop_after)] if stop_after else [])
    trainer = build_trainer(cfg, extra_callbacks=callbacks)
    try:
        trainer.fit()
    except Killed:
        pass
    weights = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items() if not k.endswith("_extra_state")}
    eval_metrics = {k: float(v.compute()) for k, v in trainer.state.eval_metrics.get("eval", {}).items()}
    trainer.close()
    del trainer
    gc.collect()
    return rec, weights, eval_metrics


def test_tiny_pretraining_loss_decreases(corpus, tmp_path):
    rec, _, metrics = _fit(_cfg(corpus, tmp_path, "max_duration=40ba", "optimizer.lr=3e-3", "save_folder=null"))
    assert len(rec.losses) == 40
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert metrics["LanguagePerplexity"] < 512  # better than uniform over the vocabulary
    # packed documents: the loader derives doc ids from EOS
    assert rec.inputs[0].shape == (8, 64)


@pytest.mark.parametrize("doc_mask", [True, False])
def test_doc_mask_decides_whether_batches_carry_document_ids(corpus, tmp_path, doc_mask):
    eos = json.loads((corpus / "mds64" / "mixattn_data.json").read_text())["eos_id"]
    trainer = build_trainer(_cfg(corpus, tmp_path, f"data.doc_mask={str(doc_mask).lower()}", "save_folder=null"))
    batches = list(itertools.islice(trainer.state.train_dataloader, 3))
    trainer.close()
    assert all(("doc_ids" in b) == doc_mask for b in batches)
    if doc_mask:
        from mixattn.attention import document_starts

        assert all(torch.equal(b["doc_ids"], doc_ids_from_eos(b["input_ids"], eos)) for b in batches)
        # the varlen kernels' document starts come with the batch, made on the host by the collator
        assert all(torch.equal(b["doc_starts"], document_starts(b["doc_ids"])) for b in batches)
    else:
        assert not any("doc_starts" in b for b in batches)


def test_doc_ids_start_a_new_document_after_each_eos():
    eos = 2
    tokens = torch.tensor([[5, eos, 7, 8, eos, eos, 9], [eos, 4, 4, 4, 4, 4, eos]])
    assert doc_ids_from_eos(tokens, eos).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_stopped_and_resumed_run_is_bit_exact(corpus, tmp_path):
    full, full_w, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=12ba"))
    first, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=12ba"), stop_after=8)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir())
    assert "ep0-ba8-rank0.pt" in ckpts and "latest-rank0.pt" in ckpts
    resumed, resumed_w, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=12ba", "autoresume=true"))
    assert first.losses == full.losses[:8]
    assert len(resumed.losses) == 4
    assert resumed.losses == full.losses[8:]  # bit-exact
    for a, b in zip(resumed.inputs, full.inputs[8:]):
        assert torch.equal(a, b)  # the same next batches
    for k in full_w:
        assert torch.equal(full_w[k], resumed_w[k]), k


def test_checkpoint_records_config_and_rejects_another_plan(corpus, tmp_path):
    _fit(_cfg(corpus, tmp_path, "max_duration=4ba"))
    ckpt = tmp_path / "ckpt" / "ep0-ba4-rank0.pt"
    # a checkpoint this test just wrote; composer's full checkpoints also hold RNG
    # states (numpy objects), so a weights_only load path is issue #7's work
    state = torch.load(ckpt, weights_only=False)
    saved = state["state"]["model"]["_extra_state"]["mixattn_model_config"]
    assert saved["plan"][0] == {"kind": "global"} and saved["window"] == 16
    with pytest.raises(ConfigError, match="incompatible model config \\(plan: checkpoint .* vs config"):
        _fit(_cfg(corpus, tmp_path / "other", "max_duration=2ba", f"load_path={ckpt}", "model.plan=standard"))
    with pytest.raises(ConfigError, match="n_layers: checkpoint 4 vs config 6"):
        _fit(_cfg(corpus, tmp_path / "other2", "max_duration=2ba", f"load_path={ckpt}", "model.n_layers=6", "model.plan=all_sliding"))


@pytest.mark.parametrize("plan", ["ma", "all_sliding", "standard"])
def test_long_context_extension_from_checkpoint(corpus, tmp_path, plan):
    _, short_weights, _ = _fit(_cfg(corpus, tmp_path / "short", "max_duration=4ba", f"model.plan={plan}"))
    ckpt = tmp_path / "short" / "ckpt" / "latest-rank0.pt"
    rec, weights, _ = _fit(_cfg(
        corpus, tmp_path / "long", "max_duration=3ba", f"model.plan={plan}", "model.max_seq_len=128",
        "model.rope_theta=40000.0", f"load_path={ckpt}", "load_weights_only=true", "scheduler.t_warmup=2ba",
        data="mds128",
    ))
    assert rec.inputs[0].shape == (8, 128) and len(rec.losses) == 3 and all(torch.isfinite(torch.tensor(rec.losses)))
    # the long run starts from the checkpoint's weights (not optimizer state, not a fresh init)
    for k, v in short_weights.items():
        assert torch.equal(rec.start_weights[k], v), k


def test_every_recipe_parses_and_builds_its_model():
    from mixattn.model import MixAttentionLM

    recipes = sorted((ROOT / "yamls").rglob("*.yaml"))
    # sweeps: test_sweep.py; foundry (llm-foundry's recipe format): test_mpt.py / test_foundry.py
    recipes = [r for r in recipes if not {"models", "sweeps", "foundry"} & set(r.parts)]
    assert recipes
    for path in recipes:
        cfg = load_recipe(path, ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=null", "model.vocab_size=256"])
        model = MixAttentionLM(cfg.model)
        assert len(model.blocks) == cfg.model.n_layers
        json.dumps(recipe_to_dict(cfg))  # the resolved recipe is plain data


@pytest.mark.parametrize("overrides, message, where", [
    (["optimizer.learning_rate=1"], "unknown key 'optimizer.learning_rate' (in 'optimizer.learning_rate=1'); "
     "valid keys of optimizer: betas, eps, lr, name, weight_decay", "command line"),
    (["max_duraton=3ba"], "unknown key 'max_duraton'", "command line"),
    (["global_train_batch_size=eight"], "global_train_batch_size must be int, got 'eight'", "tiny-cpu.yaml"),
    (["data.train=[{local: x, proportion: 1, remote_path: y}]"], "unknown key(s) data.train[0].remote_path", "tiny-cpu.yaml"),
    (["model.plan=ma", "model.window=512"], "window 512 is larger than max_seq_len 256", "tiny-cpu.yaml"),
])
def test_bad_recipes_are_rejected_naming_the_key_and_file(overrides, message, where):
    with pytest.raises(ConfigError) as info:
        load_recipe(RECIPE, overrides)
    assert message in str(info.value) and where in str(info.value).split(": ")[0]  # the origin comes first


def test_bad_data_is_rejected(corpus, tmp_path):
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    with pytest.raises(DataError, match="does not exist"):
        convert_to_mds([tmp_path / "missing.txt"], tmp_path / "o", tok, 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="less than one sequence of 64"):
        convert_to_mds([empty], tmp_path / "o2", tok, 64, progress=False)
    assert not (tmp_path / "o2").exists()  # nothing half-written left behind
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        convert_to_mds([bad_json], tmp_path / "o3", tok, 64, progress=False)
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".tmp-*"))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="nofield.jsonl:1: no 'text' field \\(set --text-field\\)"):
        convert_to_mds([no_field], tmp_path / "o4", tok, 64, progress=False)
    with pytest.raises(DataError, match="dataset directory .* does not exist"):
        build_trainer(_cfg(corpus, tmp_path, "data.train=[{local: /nonexistent/mds}]"))
    with pytest.raises(DataError, match="512 tokens but model.vocab_size is 100; set model.vocab_size >= 512"):
        build_trainer(_cfg(corpus, tmp_path, "model.vocab_size=100"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_truncated_or_missing_shard_is_named(corpus, tmp_path, damage):
    import shutil

    bad = tmp_path / "mds"
    shutil.copytree(corpus / "mds64", bad)
    for shard in sorted((bad / "train").glob("shard.*.zstd")):
        data = bytearray(shard.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        elif damage == "truncate":
            shard.write_bytes(bytes(data[: len(data) // 2]))
        else:  # both forms: earlier runs may have decompressed it beside the zip
            shard.unlink()
            shard.with_suffix("").unlink(missing_ok=True)
        break
    message = {"flip": "is corrupt: its xxh64 hash does not match", "truncate": "is truncated or altered", "delete": "is missing"}[damage]
    cfg = _cfg(corpus, tmp_path, f"data.train=[{{local: {bad / 'train'}}}]", "data.eval=[]", "max_duration=2ba", "save_folder=null")
    with pytest.raises(DataError, match=f"shard .*{shard.name}.* {message}"):
        build_trainer(cfg)


def test_a_shard_present_only_raw_is_checked_in_that_form(corpus, tmp_path):
    """streaming deletes a zip after decompressing it when the stream has a remote:
    the raw form is then what is checked (size and hash from index.json)."""
    import shutil

    from streaming.base.compression import decompress

    from mixattn.data import verify_mds_dir

    d = tmp_path / "mds" / "train"
    shutil.copytree(corpus / "mds64" / "train", d)
    index = json.loads((d / "index.json").read_text())
    shard = index["shards"][0]
    zipped = d / shard["zip_data"]["basename"]
    raw = d / shard["raw_data"]["basename"]
    raw.write_bytes(decompress(shard["compression"], zipped.read_bytes()))
    zipped.unlink()
    assert verify_mds_dir(d) == len(index["shards"])
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 0xFF
    raw.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard .*{raw.name} is corrupt: its xxh64 hash"):
        verify_mds_dir(d)
    raw.unlink()
    with pytest.raises(DataError, match=f"shard .*{zipped.name} listed in index.json is missing"):
        verify_mds_dir(d)
