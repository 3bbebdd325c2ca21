"""yamls/paper/: the paper's three stages, tiny, chained on the CPU: stage 1
pretrains everything at 4K-equivalent, stage 2 continues at a longer context
with RoPE theta 8M training attention only, stage 3 trains attention only on
synthetic long-context QA with the loss on the answers."""

from pathlib import Path

import torch

from mixattn.data import convert_longqa_to_mds, convert_to_mds, load_tokenizer
from mixattn.demo import stdlib_corpus
from mixattn.training.recipe import load_recipe
from mixattn.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "yamls" / "paper"
TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=6",
        "model.mlp_hidden=64", "model.moe_experts=4", "model.plan=MA-Offset", "model.window=16", "fsdp=null", "compile=false",
        "precision=auto", "global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=2",
        "progress_bar=false", "wandb=null", "data.eval=[]", "autoresume=false", "save_num_checkpoints_to_keep=-1",
        "scheduler.t_warmup=0ba"]


def _stage(recipe, tmp, name, *overrides):
    cfg = load_recipe(PAPER / recipe, [*TINY, f"save_folder={tmp / name}", "save_interval=2ba", "max_duration=2ba", *overrides])
    trainer = build_trainer(cfg)
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items() if k != "_extra_state"}
    trainer.close()
    return cfg, weights, tmp / name / "ep0-ba2-rank0.pt"


def test_the_three_stages_chain_on_the_cpu(corpus, tmp_path):
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    files = stdlib_corpus()[:30]
    convert_to_mds(files, tmp_path / "mds512", tok, 512, val_fraction=0.0, progress=False)
    convert_longqa_to_mds(files, tmp_path / "qa512", tok, 512, samples=8, val_fraction=0.0)

    cfg1, w1, ckpt1 = _stage("stage1-4k.yaml", tmp_path, "s1", f"data.train=[{{local: {corpus / 'mds64' / 'train'}}}]",
                             "model.max_seq_len=64")
    assert cfg1.model.rope_theta == 5e5 and cfg1.trainable is None and cfg1.model.mlp_type == "moe" and ckpt1.is_file()
    cfg2, w2, ckpt2 = _stage("stage2-32k.yaml", tmp_path, "s2", f"data.train=[{{local: {tmp_path / 'mds512' / 'train'}}}]",
                             "model.max_seq_len=512", f"load_path={ckpt1}")
    assert cfg2.model.rope_theta == 8e6 and cfg2.trainable == ["attention"] and cfg2.load_weights_only
    cfg3, w3, ckpt3 = _stage("stage3-qa-32k.yaml", tmp_path, "s3", f"data.train=[{{local: {tmp_path / 'qa512' / 'train'}}}]",
                             "model.max_seq_len=512", f"load_path={ckpt2}")
    assert cfg3.model.rope_theta == 8e6 and cfg3.trainable == ["attention"] and ckpt3.is_file()
    for k in w1:
        if ".attn." in k:
            assert not torch.equal(w1[k], w2[k]) and not torch.equal(w2[k], w3[k]), k  # attention trains in every stage
        else:
            assert torch.equal(w1[k], w2[k]) and torch.equal(w2[k], w3[k]), k  # MLP (experts), norms, embeddings: stage 1's
