"""The training-memory estimate and activation_checkpointing: auto's choices,
against numbers computed by hand."""

import pytest
import torch

from mixattn.memory import (
    GIB,
    block_activation_bytes_per_token,
    calibrated_peak,
    choose_checkpointing,
    choose_microbatch,
    logits_bytes_per_token,
    peak_bytes,
    spread,
    state_bytes,
)
from mixattn.model import MixAttentionLM, ModelConfig

CFG = ModelConfig(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, max_seq_len=4096, plan="ma")
N_PARAMS = 322_094_080  # the ~350m MA model (checked below)


def test_per_token_bytes_by_hand():
    owner, sharer = CFG.layer_plan[0], CFG.layer_plan[-1]
    assert owner.owns_kv and not sharer.owns_kv
    # bf16 residual (the default): 2 norm inputs x 2d; q + attention output 2 x 2d; K, V 2 x 2d (owners); GELU pre-activation 2 x 4d
    assert not CFG.fp32_residual
    assert block_activation_bytes_per_token(CFG, owner) == 4 * 1024 + 4 * 1024 + 4 * 1024 + 8 * 1024
    assert block_activation_bytes_per_token(CFG, sharer) == 4 * 1024 + 4 * 1024 + 8 * 1024
    fp32 = ModelConfig(**{**CFG.to_dict(), "fp32_residual": True})
    assert block_activation_bytes_per_token(fp32, owner) == 8 * 1024 + 4 * 1024 + 4 * 1024 + 8 * 1024
    swiglu = ModelConfig(**{**CFG.to_dict(), "mlp_type": "swiglu"})
    assert block_activation_bytes_per_token(swiglu, owner) == 4 * 1024 + 8 * 1024 + 2 * 2 * swiglu.hidden
    assert logits_bytes_per_token(CFG) == 50304 * 8
    assert state_bytes(1000, "adamw") == 16000 and state_bytes(1000, "decoupled_lionw") == 12000
    assert state_bytes(1000, "adamw", shards=4) == 4000


def test_parameter_count_the_tests_use():
    with torch.device("meta"):
        assert MixAttentionLM(CFG).num_params() == N_PARAMS


def test_peak_counts_checkpointed_blocks_as_their_input_plus_one_recompute():
    tokens, plan = 8 * 4096, CFG.layer_plan
    acts = [block_activation_bytes_per_token(CFG, layer) * tokens for layer in plan]
    static, logits = state_bytes(N_PARAMS, "adamw"), logits_bytes_per_token(CFG) * tokens
    assert peak_bytes(CFG, plan, tokens, set(), static) == static + sum(acts) + logits
    resid = 2 * 1024 * tokens  # a checkpointed block keeps its bf16 input
    full = peak_bytes(CFG, plan, tokens, set(range(24)), static)
    assert full == static + 24 * resid + max(acts) + logits
    some = peak_bytes(CFG, plan, tokens, {0, 12}, static)
    assert some == static + sum(acts) - acts[0] - acts[12] + 2 * resid + max(acts) + logits


def test_spread_is_every_kth_block():
    assert spread(0, 24) == ()
    assert spread(1, 24) == (0,)
    assert spread(4, 24) == (0, 6, 12, 18)
    assert spread(24, 24) == tuple(range(24))
    assert len(spread(7, 24)) == 7


def _choice(free_gib, tokens=8 * 4096, optimizer="adamw", shards=1):
    return choose_checkpointing(CFG, CFG.layer_plan, tokens, N_PARAMS, optimizer, shards, int(free_gib * GIB))


def test_auto_takes_no_checkpointing_when_it_fits():
    c = _choice(139)
    assert c.mode == "none" and c.blocks == ()
    assert c.estimate_bytes <= c.budget_bytes == int(0.85 * 139 * GIB)
    assert "none" in c.describe() and "fits" in c.describe()


def test_auto_takes_the_fewest_blocks_that_fit():
    tokens = 8 * 4096
    static = state_bytes(N_PARAMS, "adamw")
    none = peak_bytes(CFG, CFG.layer_plan, tokens, set(), static)
    free = int((none - 5 * GIB) / 0.85)  # 5 GiB short of no checkpointing
    c = choose_checkpointing(CFG, CFG.layer_plan, tokens, N_PARAMS, "adamw", 1, free)
    assert c.mode == "selective" and 0 < len(c.blocks) < 24
    assert c.estimate_bytes <= c.budget_bytes
    fewer = spread(len(c.blocks) - 1, 24)
    assert peak_bytes(CFG, CFG.layer_plan, tokens, set(fewer), static) > c.budget_bytes  # one block fewer does not fit
    assert c.blocks == spread(len(c.blocks), 24)


def test_auto_takes_full_checkpointing_when_nothing_less_fits_and_says_when_even_that_does_not():
    tokens, static = 8 * 4096, state_bytes(N_PARAMS, "adamw")
    full = peak_bytes(CFG, CFG.layer_plan, tokens, set(range(24)), static)
    tight = _choice((full + 0.1 * GIB) / 0.85 / GIB)  # 23 blocks need about 0.6 GiB more
    assert tight.mode == "full" and tight.blocks == tuple(range(24)) and "fits in" in tight.reason
    hopeless = _choice(8)
    assert hopeless.mode == "full" and "does not fit either" in hopeless.reason and "fsdp" in hopeless.reason


def test_fsdp_shards_reduce_the_static_state():
    one, eight = _choice(24, shards=1), _choice(24, shards=8)
    assert eight.estimate_bytes < one.estimate_bytes or len(eight.blocks) < len(one.blocks)


@pytest.mark.parametrize("value", ["sometimes", 2, "full"])
def test_bad_activation_checkpointing_value_is_named_with_its_file(tmp_path, value):
    from mixattn.config import ConfigError
    from mixattn.training.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {d_model: 32, n_layers: 2, n_heads: 2, vocab_size: 64}\ndata: {train: [{local: x}]}\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: activation_checkpointing must be auto, true or false, got"):
        load_recipe(recipe, [f"activation_checkpointing={value}"])


def test_parallelize_checkpoints_exactly_the_chosen_blocks():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from mixattn.training.parallelize import parallelize
    from mixattn.training.recipe import DataConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, max_seq_len=64, plan="ma", window=16),
                      data=DataConfig(), global_train_batch_size=4)
    for free, expect in ((10**12, "none"), (1, "full")):
        model = MixAttentionLM(cfg.model)
        choice = parallelize(model, cfg, free_bytes=free).checkpointing
        assert choice.mode == expect
        assert [i for i, b in enumerate(model.blocks) if isinstance(b, CheckpointWrapper)] == list(choice.blocks)
    tokens = 4 * 64
    static = state_bytes(sum(p.numel() for p in MixAttentionLM(cfg.model).parameters()), "decoupled_adamw")
    none = peak_bytes(cfg.model, cfg.model.layer_plan, tokens, set(), static)
    model = MixAttentionLM(cfg.model)
    choice = parallelize(model, cfg, free_bytes=int((none - 1) / 0.85)).checkpointing
    assert choice.mode == "selective"
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, CheckpointWrapper)] == list(choice.blocks)
    x = torch.randint(0, 64, (2, 64))
    model(x, labels=x).loss.backward()  # the wrapped model still trains


def test_auto_microbatch_is_the_largest_divisor_that_fits_without_checkpointing():
    n = 350_000_000
    static = state_bytes(n, "adamw")

    def peak(micro):
        return calibrated_peak(CFG, CFG.layer_plan, micro * 4096, static)

    estimate = peak_bytes(CFG, CFG.layer_plan, 4 * 4096, set(), static)
    assert peak(4) == static + int(1.35 * (estimate - static))  # the per-token part scaled to the measured peaks
    assert peak(2) < peak(4) < peak(8)
    for micro in (1, 2, 4, 8, 16):  # free memory where exactly `micro` sequences fit under the 90% headroom
        free = int(peak(micro) / 0.90) + 1
        got, why = choose_microbatch(CFG, CFG.layer_plan, 16, n, "adamw", 1, free)
        assert got == micro, (micro, why)
        assert f"microbatch {micro} of the per-device batch 16" in why
        assert choose_microbatch(CFG, CFG.layer_plan, 16, n, "adamw", 1, free - 2)[0] == max(1, micro // 2)
    # only divisors: 12 per device with room for 5 gives 4 (12 / 5 would leave a ragged microbatch)
    got, _ = choose_microbatch(CFG, CFG.layer_plan, 12, n, "adamw", 1, int(peak(5) / 0.90) + 1)
    assert got == 4
    got, why = choose_microbatch(CFG, CFG.layer_plan, 16, n, "adamw", 1, 10 * GIB)
    assert got == 1 and "activation checkpointing decides" in why
    # sharded state (FSDP over 8) leaves room for more
    free = int(peak(4) / 0.90) + 1
    assert choose_microbatch(CFG, CFG.layer_plan, 16, n, "adamw", 8, free)[0] >= 4


def test_parallelize_resolves_auto_microbatch_before_checkpointing():
    from mixattn.training.parallelize import parallelize
    from mixattn.training.recipe import DataConfig, TrainConfig

    model_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, max_seq_len=64, plan="ma", window=16)
    cfg = TrainConfig(model=model_cfg, data=DataConfig(), global_train_batch_size=8, device_train_microbatch_size="auto")
    n = sum(p.numel() for p in MixAttentionLM(model_cfg).parameters())
    static = state_bytes(n, "decoupled_adamw")
    two = calibrated_peak(model_cfg, model_cfg.layer_plan, 2 * 64, static)
    par = parallelize(MixAttentionLM(model_cfg), cfg, free_bytes=int(two / 0.90) + 1)
    assert par.microbatch == 2 and par.checkpointing.mode == "none"
    assert parallelize(MixAttentionLM(model_cfg), cfg, free_bytes=10**12).microbatch == 8
    par = parallelize(MixAttentionLM(model_cfg), cfg, free_bytes=1)  # nothing fits: one sequence, fully checkpointed
    assert par.microbatch == 1 and par.checkpointing.mode == "full"
    fixed = TrainConfig(model=model_cfg, data=DataConfig(), global_train_batch_size=8, device_train_microbatch_size=4)
    assert parallelize(MixAttentionLM(model_cfg), fixed, free_bytes=1).microbatch == 4  # a number is kept as written
    whole = TrainConfig(model=model_cfg, data=DataConfig(), global_train_batch_size=8)
    assert parallelize(MixAttentionLM(model_cfg), whole, free_bytes=1).microbatch == 8  # null: the per-device batch


@pytest.mark.parametrize("value", ["big", 0, -1, True, 2.5])
def test_bad_microbatch_value_is_named_with_its_file(tmp_path, value):
    from mixattn.config import ConfigError
    from mixattn.training.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {d_model: 32, n_layers: 2, n_heads: 2, vocab_size: 64}\ndata: {train: [{local: x}]}\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: device_train_microbatch_size must be a positive integer, auto "):
        load_recipe(recipe, [f"device_train_microbatch_size={value}"])
    assert load_recipe(recipe, ["device_train_microbatch_size=auto"]).device_train_microbatch_size == "auto"


def test_state_is_split_over_the_fsdp_shards_only():
    from mixattn.training.parallelize import state_shards
    from mixattn.training.recipe import DataConfig, TrainConfig

    def cfg(fsdp):
        return TrainConfig(model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2), data=DataConfig(),
                           global_train_batch_size=16, fsdp=fsdp)

    assert state_shards(cfg(None), 8) == 1  # DDP: every process holds everything
    assert state_shards(cfg({"version": 2}), 8) == 8
    assert state_shards(cfg({"version": 2}), 1) == 1  # one process: FSDP is not applied
    hsdp = {"version": 2, "data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 4}
    assert state_shards(cfg(hsdp), 8) == 4  # HSDP: each of the 2 replicas shards over 4


def test_every_rank_chooses_from_the_least_free_memory(monkeypatch):
    """With several processes the auto choices use the smallest free memory
    of any rank (an all-reduce MIN), so all ranks pick the same microbatch
    and checkpointing; one process reads its own."""
    import mixattn.training.parallelize as par
    from mixattn.training.recipe import DataConfig, TrainConfig

    model_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, max_seq_len=64, plan="ma", window=16)
    cfg = TrainConfig(model=model_cfg, data=DataConfig(), global_train_batch_size=16, device_train_microbatch_size="auto")
    static = state_bytes(sum(p.numel() for p in MixAttentionLM(model_cfg).parameters()), "decoupled_adamw")
    two = int(calibrated_peak(model_cfg, model_cfg.layer_plan, 2 * 64, static) / 0.90) + 1
    monkeypatch.setattr(par, "device_free_bytes", lambda device: 10**12)  # this rank: room for the whole batch
    reduced = []

    def all_reduce(tensor, reduce_operation):
        assert reduce_operation == "MIN" and tensor.dtype == torch.int64
        reduced.append(int(tensor.item()))
        tensor.fill_(min(int(tensor.item()), two))  # the other rank: room for 2 sequences

    monkeypatch.setattr(par.dist, "all_reduce", all_reduce)
    assert par.agreed_free_bytes("cpu", 1) == 10**12 and reduced == []
    got = par.parallelize(MixAttentionLM(model_cfg), cfg, world=2)
    assert reduced == [10**12] and got.microbatch == 2  # 8 per device would fit here, not on the other rank
