"""trainable: [attention] and the like: frozen weights stay bit-identical,
the optimizer holds exactly the trainable parameters, and checkpoints chain
between stages that train different parts."""

import pytest
import torch

from mixattn.config import ConfigError
from mixattn.freeze import freeze_all_but
from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.training.trainer import build_trainer
from test_train import _cfg

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=32, plan="ma", window=8, tie_embeddings=False)


def test_groups_and_patterns_select_parameters():
    model = MixAttentionLM(CFG)
    kept = freeze_all_but(model, ["attention"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".attn." in n}
    assert kept == sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)
    assert "blocks.0.attn.wqkv.weight" in trainable and "blocks.2.attn.wq.weight" in trainable  # owners and sharers
    freeze_all_but(model, ["blocks.0.attn.wqkv.*", "norms"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "blocks.0.attn.wqkv.weight", "norm_f.weight", *(f"blocks.{i}.{k}.weight" for i in range(4) for k in ("norm_attn", "norm_mlp"))}
    freeze_all_but(model, ["embeddings", "mlp"])
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"embed", "lm_head", "blocks"}


@pytest.mark.parametrize("bad, message", [
    (["atention"], "trainable entry 'atention' matches no parameter; groups: attention, mlp, norms, embeddings"),
    ([], "trainable must be a non-empty list"),
    ("attention", "trainable must be a non-empty list"),
])
def test_bad_trainable_is_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        freeze_all_but(MixAttentionLM(CFG), bad)


def test_bad_trainable_in_a_recipe_names_the_file(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"tiny-cpu.yaml: trainable must be a non-empty list"):
        _cfg(corpus, tmp_path, "trainable=[]")


def _train(cfg):
    """Fit; return (initial weights, final weights, trainer state's optimizer, model)."""
    from composer.core import Callback

    start = {}

    class Snapshot(Callback):
        def fit_start(self, state, logger):
            start.update({k: v.detach().clone() for k, v in state.model.model.state_dict().items() if k != "_extra_state"})

    trainer = build_trainer(cfg, extra_callbacks=[Snapshot()])
    trainer.fit()
    model = trainer.state.model.model
    end = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "_extra_state"}
    opt = trainer.state.optimizers[0]
    info = {
        "state_params": {id(p) for p in opt.state},
        "trainable": {id(p) for p in model.parameters() if p.requires_grad},
        "frozen_grads": [p.grad for p in model.parameters() if not p.requires_grad],
        "state_bytes": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)),
        "names": {n for n, p in model.named_parameters() if p.requires_grad},
    }
    trainer.close()
    return start, end, info


def test_attention_only_training_freezes_the_rest_bit_exactly(corpus, tmp_path):
    start, end, info = _train(_cfg(corpus, tmp_path / "a", "max_duration=4ba", "save_folder=null", "trainable=[attention]"))
    assert info["names"] and all(".attn." in n for n in info["names"])
    for k in start:
        if ".attn." in k:
            assert not torch.equal(start[k], end[k]), k  # attention trained
        else:
            assert torch.equal(start[k], end[k]), k  # everything else bit-identical
    assert info["state_params"] == info["trainable"]  # optimizer state for exactly the trainable set
    assert all(g is None for g in info["frozen_grads"])  # no gradient memory for frozen weights
    _, _, full = _train(_cfg(corpus, tmp_path / "b", "max_duration=4ba", "save_folder=null"))
    assert 0 < info["state_bytes"] < full["state_bytes"] / 2


def test_stages_with_different_trainable_chain_and_resume(corpus, tmp_path):
    """Stage 1 trains everything; stage 2 loads its weights and trains
    attention only; stage 2 stopped and relaunched with autoresume ends
    where an uninterrupted stage 2 ends."""
    _, stage1, _ = _train(_cfg(corpus, tmp_path / "s1", "max_duration=4ba", f"save_folder={tmp_path / 's1'}", "save_interval=4ba"))
    ckpt = tmp_path / "s1" / "ep0-ba4-rank0.pt"
    assert ckpt.is_file()
    stage2 = ("trainable=[attention]", f"load_path={ckpt}", "load_weights_only=true", "save_interval=2ba", "autoresume=true")
    start, whole, _ = _train(_cfg(corpus, tmp_path / "w", "max_duration=4ba", f"save_folder={tmp_path / 'w'}", *stage2))
    assert all(torch.equal(start[k], stage1[k]) for k in stage1)  # stage 2 starts from stage 1's weights
    assert all(torch.equal(whole[k], stage1[k]) for k in stage1 if ".attn." not in k)
    _train(_cfg(corpus, tmp_path / "r", "max_duration=2ba", f"save_folder={tmp_path / 'r'}", *stage2))
    resumed_start, resumed, info = _train(_cfg(corpus, tmp_path / "r", "max_duration=4ba", f"save_folder={tmp_path / 'r'}", *stage2))
    assert info["state_params"] == info["trainable"]
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
