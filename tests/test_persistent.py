"""The persistent batch-1 decode kernel (mixattn.persistent) in Triton's
interpreter, one launch per phase: its logits and the keys and values it
writes against the eager decode step, float32, for every kind of plan
(sharing, sliding rings that wrap, GQA and MHA, both norms); the steps it
does not cover go to its fallback. The one-launch form, with its grid
barriers, runs only on a GPU (tests/gpu/test_gpu_persistent.py)."""

import pytest
import torch

from mixattn.generate import DecodePath, GenerationError, decode_step, new_cache, prefill
from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.persistent import PersistentStep, unsupported


def _model(plan, n_kv_heads=2, norm_type="layernorm", mlp_type="gelu", n_layers=8):
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32,
                      plan=plan, window=3, norm_type=norm_type, mlp_type=mlp_type)
    torch.manual_seed(0)
    return MixAttentionLM(cfg).eval()


@pytest.mark.parametrize("plan,n_kv_heads,norm_type,prefetch,head_flags", [
    ("standard", 4, "layernorm", True, False),  # MHA, every layer global and owning its KV
    ("ma", 2, "layernorm", True, False),  # global owner shared across the stack, sliding owners and sharers
    ("ma_offset", 1, "rmsnorm", True, False),  # all query heads on one KV head
    ("ma_pairs_slideshare", 2, "rmsnorm", True, False),  # sliding layers reading another's ring
    ("ma", 2, "layernorm", False, True),  # weights loaded when summed; attention waits on per-head counts
    ("ma_offset", 1, "rmsnorm", False, True),
])
@torch.no_grad()
def test_the_persistent_step_gives_the_eager_steps_logits_and_cache(plan, n_kv_heads, norm_type, prefetch, head_flags,
                                                                     monkeypatch):
    from mixattn import persistent

    monkeypatch.setattr(persistent, "PREFETCH", prefetch)  # each unit's weights loaded one unit ahead, or not
    monkeypatch.setattr(persistent, "HEAD_FLAGS", head_flags)
    model = _model(plan, n_kv_heads, norm_type)
    assert unsupported(model, new_cache(model, 1, 12)) is None
    want_cache, got_cache = new_cache(model, 1, 12), new_cache(model, 1, 12)
    prompt = [[5, 1, 9, 2, 7]]
    prefill(model, want_cache, prompt)
    prefill(model, got_cache, prompt)
    step = PersistentStep(fallback=lambda *a: pytest.fail("a covered step ran the fallback"))
    token = torch.tensor([[3]])
    for pos in range(5, 9):  # the 3-slot rings wrap
        want = decode_step(model, want_cache, token, torch.tensor([[pos]]))
        got = step(model, got_cache, token, torch.tensor([[pos]]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        token = want.argmax(-1, keepdim=True)
    for i, store in want_cache.stores.items():
        torch.testing.assert_close(got_cache.stores[i].kv, store.kv, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_cache.groups[got_cache.stores[i].group].pos, want_cache.groups[store.group].pos)
    (buf,) = step._buffers.values()
    assert step.in_kernel
    assert not buf.acnt.any()  # the attention's combine counters are left at zero
    if head_flags:  # every KV head of every layer counted all of its units: (G + 2 or G) x head_dim / R
        g, units = 4 // n_kv_heads, 16 // buf.const["R"]
        want = torch.tensor([[(g + 2 if layer.owns_kv else g) * units] * n_kv_heads for layer in model.plan], dtype=torch.int32)
        assert torch.equal(buf.ready, want)


@torch.no_grad()
def test_steps_it_does_not_cover_run_the_fallback(capsys, monkeypatch):
    from mixattn import persistent

    monkeypatch.setattr(persistent, "_SAID", set())  # what earlier tests said does not count here
    calls = []

    def fallback(model, cache, tokens, positions, valid=None):
        calls.append(tokens.shape[0])
        return decode_step(model, cache, tokens, positions, valid)

    step = PersistentStep(fallback)
    model = _model("ma")
    two = new_cache(model, 2, 12)
    prefill(model, two, [[1, 2], [3, 4]])
    out = step(model, two, torch.tensor([[1], [2]]), torch.tensor([[2], [2]]))
    assert out.shape == (2, 64) and calls == [2]
    assert unsupported(model, two) == "it decodes one row, and the cache has 2"
    swiglu = _model("ma", mlp_type="swiglu")
    one = new_cache(swiglu, 1, 12)
    assert unsupported(swiglu, one) == "it runs GELU MLPs"
    prefill(swiglu, one, [[1, 2]])
    step(swiglu, one, torch.tensor([[1]]), torch.tensor([[2]]))
    step(swiglu, one, torch.tensor([[1]]), torch.tensor([[3]]))
    assert calls == [2, 1, 1]
    assert not step.in_kernel  # what the decode benchmark records: no step ran in the kernel
    # a one-row step it does not cover says why, once; many-row steps go to the fallback silently
    err = capsys.readouterr().err
    assert err.count("not the persistent kernel: it runs GELU MLPs") == 1 and "has 2" not in err


@torch.no_grad()
def test_a_half_precision_model_runs_in_the_kernel_and_agrees_with_the_eager_step():
    """A model cast to 16 bits, as a GPU runs it (the float32 tests above
    cannot see a table or store that a cast rounds): the kernel takes every
    step, and its logits and keys and values are the eager step's up to
    rounding order. float16, not bfloat16: Triton's interpreter computes
    tl.dot of bfloat16 tiles wrongly (the product's split kernel too, which
    is right on the GPU), so bfloat16 is checked on the GPU
    (tests/gpu/test_gpu_persistent.py)."""
    model = _model("ma_offset", n_kv_heads=2).to(torch.float16)
    want_cache, got_cache = new_cache(model, 1, 12), new_cache(model, 1, 12)
    prefill(model, want_cache, [[5, 1, 9, 2, 7]])
    prefill(model, got_cache, [[5, 1, 9, 2, 7]])
    step = PersistentStep(fallback=lambda *a: pytest.fail("a covered step ran the fallback"))
    token = torch.tensor([[3]])
    for pos in range(5, 9):  # the 3-slot rings wrap
        want = decode_step(model, want_cache, token, torch.tensor([[pos]])).float()
        got = step(model, got_cache, token, torch.tensor([[pos]])).float()
        assert (got - want).abs().mean() < 0.005 * want.abs().mean()
        token = want.argmax(-1, keepdim=True)
    for i, store in want_cache.stores.items():
        torch.testing.assert_close(got_cache.stores[i].kv.float(), store.kv.float(), rtol=0.01, atol=0.01)


def test_a_model_cast_to_bfloat16_is_covered():
    """The usual model, cast with .to(torch.bfloat16): its RoPE tables stay
    float32 (MixAttentionLM._apply), so the kernel takes its steps; tables
    cast past that fall back with the reason."""
    model = _model("ma").to(torch.bfloat16)
    cache = new_cache(model, 1, 12)
    assert model.rope_cos.dtype == torch.float32 and cache.dtype == torch.bfloat16
    assert unsupported(model, cache) is None
    model.rope_cos = model.rope_cos.half()
    assert unsupported(model, cache) == "its RoPE tables must be float32"


def test_the_decode_path_takes_it_on_request():
    path = DecodePath.resolve("cpu", persistent=True)
    assert path.persistent and path.describe().startswith("one persistent kernel for batch-1 layers, else")
    assert isinstance(path.step_fn(), PersistentStep)
    assert not DecodePath.resolve("cpu").persistent


def test_asking_for_it_where_triton_is_missing_says_why(monkeypatch):
    from mixattn import decode_kernel

    monkeypatch.setattr(decode_kernel, "triton", None)
    with pytest.raises(GenerationError, match="--persistent cannot run on cpu: "):
        DecodePath.resolve("cpu", persistent=True, flag="--")


HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixattn import persistent
sig = {n: t for n, t in zip(
    ["H", "QB", "AO", "U", "PO", "PML", "ACNT", "BAR", "READY", "META", "POS", "COS", "SIN", "T0", "T1", "eps", "scale"],
    ["*bf16"] * 4 + ["*fp32"] * 2 + ["*i32"] * 3 + ["*i64"] * 2 + ["*fp32"] * 2 + ["i32", "i32", "fp32", "fp32"])}
for head_flags in (False, True):
    const = dict(D=2048, HQ=16, HKV=16, HD=128, FF=8192, NORM=1, NPROG=132, R=8, RD=2, SPLITS=8, ROWS=16, BLOCK_N=64,
                 BLOCK_S=8, SYNC=True, IEEE=False, PREFETCH=True, POLL_LOAD=True, HEAD_FLAGS=head_flags,
                 L2_PREFETCH=head_flags)
    sig.update(dict.fromkeys(const, "constexpr"))
    names = list(sig)
    src = ASTSource(fn=persistent._step_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")})
    print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"])
    print("=== next ===")
"""


def test_the_kernel_compiles_for_hopper_with_16_byte_weight_loads():
    """The one-launch form (grid barriers) compiled for sm_90 here, without
    a GPU (Triton's compiler and ptxas, not the interpreter, which neither
    types the branches nor vectorises): at the decode benchmark's widths its
    weight loads are 16 bytes each (pointers read from the metadata table
    carry no alignment unless the kernel says so: one 2-byte load per weight
    otherwise), its barriers poll with loads, and L2_PREFETCH (a side effect
    only, never run in the interpreter) issues its L2 prefetches."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, check=True).stdout
    ptxs = out.split("=== next ===")[:2]  # the defaults, and with HEAD_FLAGS and L2_PREFETCH
    for ptx in ptxs:
        loads = re.findall(r"\bld\.global\.[\w.]+", ptx)
        assert loads.count("ld.global.v4.b32") >= 32
        assert "ld.global.b16" not in loads
        assert "ld.volatile.global.b32" in ptx and "atom.global.gpu.release.add" in ptx
    assert len(ptxs) == 2 and ptxs[0] != ptxs[1]
    assert "prefetch.global.L2" not in ptxs[0] and ptxs[1].count("prefetch.global.L2") >= 5


def test_the_cli_refuses_it_where_triton_is_missing_naming_the_flag(tmp_path, capsys, monkeypatch):
    from mixattn import decode_kernel
    from mixattn.cli import main

    monkeypatch.setattr(decode_kernel, "triton", None)
    code = main(["generate", str(tmp_path / "missing.pt"), "--prompt", "x", "--device", "cpu", "--persistent"])
    err = capsys.readouterr().err
    assert code == 2 and "--persistent cannot run on cpu: triton is not installed" in err and "Traceback" not in err
