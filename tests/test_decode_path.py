"""The default decode path (issue #18): the fastest correct combination
where it runs (mixattn's Triton attention and GEMV, a compiled step, a CUDA
graph), SDPA and the eager step elsewhere, said once on a GPU without
Triton; explicit requests that cannot run are refused, naming why; prefill
chunks never go to the decode-only kernel."""

import pytest
import torch

from mixattn import decode_kernel
from mixattn import generate as gen
from mixattn.cli import main
from mixattn.generate import DecodePath, GenerationError, GraphedStep, decode_step, generate, new_cache, prefill
from mixattn.model import MixAttentionLM, ModelConfig


def _model(plan="ma"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=80, plan=plan, window=8,
                      attn_backend="sdpa")
    return MixAttentionLM(cfg).eval()


def test_on_the_cpu_the_default_is_sdpa_and_the_eager_step(capsys):
    path = DecodePath.resolve("cpu")
    assert path == DecodePath(attention="sdpa", gemv=False, compile=False, cuda_graph=False)
    assert path.step_fn() is decode_step
    assert capsys.readouterr().err == ""  # nothing to fall back from on a CPU


def test_on_cuda_with_triton_the_default_is_the_fast_path():
    path = DecodePath.resolve("cuda")  # resolving needs no GPU: only Triton's presence
    assert path == DecodePath(attention="triton", gemv=True, compile=True, cuda_graph=True, fuse="gelu")
    step = path.step_fn()
    assert isinstance(step, GraphedStep) and step.step is gen.compiled_decode_step()
    assert gen.compiled_decode_step() is gen.compiled_decode_step()  # one compiled step per process
    assert path.describe() == "triton attention, Triton GEMV (GELU fused) projections, compiled step in a CUDA graph"


def test_a_gpu_without_triton_falls_back_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(decode_kernel, "available", lambda device: "triton is not installed")
    monkeypatch.setattr(gen, "_SAID", set())
    path = DecodePath.resolve("cuda")
    assert path == DecodePath(attention="sdpa", gemv=False, compile=False, cuda_graph=True)
    assert capsys.readouterr().err == ("mixattn: decoding without the fast path (triton is not installed): "
                                       "sdpa attention, cuBLAS/torch projections, eager step in a CUDA graph\n")
    DecodePath.resolve("cuda")
    assert capsys.readouterr().err == ""


def test_explicit_choices_win_and_impossible_ones_are_refused(monkeypatch):
    assert DecodePath.resolve("cuda", attention="sdpa", gemv=False, compile=False, cuda_graph=False) == DecodePath()
    assert DecodePath.resolve("cpu", compile=True).compile  # inductor compiles for the CPU too
    with pytest.raises(GenerationError, match="--cuda-graph cannot run on cpu: CUDA graphs need a CUDA GPU"):
        DecodePath.resolve("cpu", cuda_graph=True, flag="--")
    with pytest.raises(GenerationError, match="unknown attention 'fast'; valid: auto, flex, matmul, sdpa, triton"):
        DecodePath.resolve("cpu", attention="fast")
    monkeypatch.setattr(decode_kernel, "_interpreting", lambda: False)
    with pytest.raises(GenerationError, match="gemv cannot run on cpu: the Triton kernel runs on CUDA GPUs"):
        DecodePath.resolve("cpu", gemv=True)


def test_prefill_chunks_skip_the_decode_kernel_and_decode_steps_take_it(monkeypatch):
    model = _model()
    calls = []
    real = decode_kernel.decode_attention

    def spy(q, *args, **kw):
        calls.append(q.shape[2])
        return real(q, *args, **kw)

    monkeypatch.setattr(decode_kernel, "decode_attention", spy)
    cache = new_cache(model, 2, 60, attention="triton")
    prompts = [list(range(1, 41)), list(range(3, 20))]
    logits = prefill(model, cache, prompts, chunk_size=32)  # chunks of 32 and 8 queries
    layers = len(model.plan)
    assert calls == [8] * layers  # the 32-query chunk went to SDPA, the 8-query one to the kernel (max_queries 16)
    tokens = logits.argmax(-1)[:, None]
    decode_step(model, cache, tokens, torch.tensor([[40], [17]]))
    assert calls == [8] * layers + [1] * layers
    # and the tokens are SDPA's
    ref = generate(model, prompts, 6, attention="sdpa", chunk_size=32).tokens
    assert generate(model, prompts, 6, attention="triton", chunk_size=32).tokens == ref


def test_the_cli_refuses_a_cuda_graph_on_the_cpu_naming_the_flag(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "missing.pt"), "--prompt", "x", "--device", "cpu", "--cuda-graph"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--cuda-graph cannot run on cpu: CUDA graphs need a CUDA GPU" in err and "Traceback" not in err


def test_prefill_in_row_groups_gives_the_logits_of_one_forward():
    model = _model("ma")
    prompts = [list(range(1, 1 + n)) for n in (37, 5, 22, 30, 11)]
    one = prefill(model, new_cache(model, 5, 60), prompts, chunk_size=8)
    grouped_cache = new_cache(model, 5, 60)
    grouped = prefill(model, grouped_cache, prompts, chunk_size=8, tokens_per_forward=16)  # two rows per forward
    torch.testing.assert_close(grouped, one, rtol=1e-5, atol=1e-5)
    ref = new_cache(model, 5, 60)
    prefill(model, ref, prompts, chunk_size=8)
    for g, r in zip(grouped_cache.groups, ref.groups):
        assert torch.equal(g.pos, r.pos)  # every row's cache holds the same positions


def test_the_decode_memory_model_counts_the_cache_exactly_and_bounds_prefill():
    from mixattn.memory import decode_memory, max_decode_batch, model_bytes
    from mixattn.plan import kv_cache_bytes

    model = _model("ma")
    cfg = model.cfg
    weights = model_bytes(model)
    cache = new_cache(model, 6, 50)
    est = decode_memory(cfg, model.plan, batch=6, context=50, weight_bytes=weights, kv_bytes=cache.nbytes, chunk_size=8)
    assert est.kv == cache.nbytes == kv_cache_bytes(model.plan, n_kv_heads=2, head_dim=8, context_len=50, batch_size=6,
                                                    dtype=torch.float32)
    assert est.positions == cache.metadata_bytes
    assert est.peak == weights + est.kv + est.positions + max(est.prefill, est.step)
    # the prefill's working set stops growing once a forward holds tokens_per_forward tokens
    big = [decode_memory(cfg, model.plan, batch=b, context=50, weight_bytes=weights, kv_bytes=0, chunk_size=8,
                         tokens_per_forward=16) for b in (2, 20, 200)]
    per_row_logits = cfg.vocab_size * 4
    assert big[1].prefill - big[0].prefill == 18 * per_row_logits  # only the kept last-token logits grow
    assert big[2].step > big[1].step > big[0].step
    per_row = kv_cache_bytes(model.plan, n_kv_heads=2, head_dim=8, context_len=50, batch_size=1, dtype=torch.float32)
    budget = 3 * 2**20
    b = max_decode_batch(budget, cfg, model.plan, context=50, weight_bytes=weights, kv_bytes_per_row=per_row, chunk_size=8)
    assert b > 0

    def peak(n):
        return decode_memory(cfg, model.plan, batch=n, context=50, weight_bytes=weights, kv_bytes=n * per_row,
                             chunk_size=8).peak

    assert peak(b) <= budget * 0.95 < peak(b + 1)
    assert max_decode_batch(weights, cfg, model.plan, context=50, weight_bytes=weights, kv_bytes_per_row=per_row) == 0


def test_fuse_is_gelu_where_the_gemv_runs_and_needs_the_gemv(monkeypatch):
    assert DecodePath.resolve("cpu").fuse == "none"  # no GEMV on the CPU: nothing to fuse into
    assert DecodePath.resolve("cuda").fuse == "gelu"
    assert DecodePath.resolve("cuda", gemv=False).fuse == "none"
    assert DecodePath.resolve("cuda", fuse=False).fuse == "none"
    for asked in (True, "gelu", "all"):
        with pytest.raises(GenerationError, match="--fuse puts the norms and GELU inside the GEMV kernels: it needs --gemv"):
            DecodePath.resolve("cpu", fuse=asked, flag="--")
    with pytest.raises(GenerationError, match="unknown --fuse 'norms'; valid: none, gelu, all"):
        DecodePath.resolve("cpu", fuse="norms", flag="--")
    assert "Triton GEMV (norms and GELU fused) projections" in DecodePath(attention="sdpa", gemv=True, fuse="all").describe()
    assert "Triton GEMV (GELU fused) projections" in DecodePath(attention="sdpa", gemv=True, fuse="gelu").describe()


def test_fuse_gelu_moves_only_the_activation_into_the_up_projection():
    """fuse: gelu (fuse_gemv_inputs with norms=False): the GELU is the up
    GEMV's epilogue, the norms stay where they were; batch-1 decode steps give
    the unfused GEMV model's logits, a full forward is bit for bit its."""
    from mixattn.decode_kernel import use_gemv
    from mixattn.generate import decode_step, fuse_gemv_inputs, new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, plan="ma", window=4)
    torch.manual_seed(0)
    plain = use_gemv(MixAttentionLM(cfg).eval())
    fused = MixAttentionLM(cfg).eval()
    fused.load_state_dict(plain.state_dict())
    fuse_gemv_inputs(use_gemv(fused), norms=False)
    assert not [m for m in fused.modules() if type(m).__name__.startswith("_Deferred")]
    assert all(b.mlp.up.act == "gelu" and b.mlp.down.act is None and type(b.mlp).__name__ == "_FusedGeluMLP"
               for b in fused.blocks)
    ids = torch.randint(0, 64, (2, 20))

    def run(model):
        cache = new_cache(model, 1, 24)
        prefill(model, cache, [[1, 2, 3, 4, 5, 6, 7]])
        return torch.stack([decode_step(model, cache, torch.tensor([[t]]), torch.tensor([[7 + i]]))
                            for i, t in enumerate([5, 9, 2])])

    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
        torch.testing.assert_close(run(fused), run(plain), rtol=1e-5, atol=1e-5)
