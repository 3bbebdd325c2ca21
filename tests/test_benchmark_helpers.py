"""Arithmetic that benchmark programs report, checked on made-up inputs (the
benchmarks themselves need a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from train_scaling import gpu_idle_by_phase  # noqa: E402
from train_throughput import warm_until_steady  # noqa: E402


def _x(name, ts, dur, cat="user_annotation"):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}


def test_gpu_idle_time_is_split_by_the_composer_phase_the_host_was_in():
    # two batches of 100 us; host phases tile the time; kernels leave gaps
    events = []
    for t in (0, 100):
        events += [_x("composer/batch_start", t, 10), _x("composer/before_forward", t + 10, 50),
                   _x("composer/after_backward", t + 60, 30), _x("composer/batch_end", t + 90, 10)]
    events += [_x("k1", 20, 40, "kernel"), _x("k2", 50, 20, "kernel"),  # overlapping: busy 20..70
               _x("copy", 120, 5, "gpu_memcpy"), _x("k3", 130, 60, "kernel"),
               _x("cpu op", 0, 200, "cpu_op")]  # not GPU work
    got = gpu_idle_by_phase({"traceEvents": events}, steps=2)
    assert got["ms_per_step"] == pytest.approx(0.1)
    assert got["gpu_busy_ms_per_step"] == pytest.approx((50 + 5 + 60) / 2e3)
    # idle: 0-20 (batch_start 10, before_forward 10), 70-120 (after_backward 20, batch_end 10,
    # batch_start 10, before_forward 10), 125-130 (before_forward 5), 190-200 (batch_end 10)
    assert got["gpu_idle_ms_per_step"] == pytest.approx((20 + 50 + 5 + 10) / 2e3)
    assert got["idle_ms_per_step_by_phase"] == pytest.approx(
        {"before_forward": 25 / 2e3, "batch_end": 20 / 2e3, "batch_start": 20 / 2e3, "after_backward": 20 / 2e3})


def test_a_trace_without_gpu_work_says_so():
    got = gpu_idle_by_phase({"traceEvents": [_x("composer/batch_start", 0, 5), _x("composer/batch_end", 5, 5)]}, steps=1)
    assert "no GPU work" in got["error"]


@pytest.mark.parametrize("durations, steps", [
    ([1.30, 0.32, 0.20, 0.196, 0.5], 4),   # a compile in the 1st and 2nd steps, steady from the 3rd
    ([0.2, 0.205], 2),                     # steady at once: within 3%
    ([0.2, 0.3] * 20, 20),                 # never steady: stops at max_steps
])
def test_warm_up_runs_until_two_consecutive_steps_agree(durations, steps):
    now, calls = [0.0], []

    def step():
        now[0] += durations[len(calls)]
        calls.append(1)

    assert warm_until_steady(step, sync=lambda: None, clock=lambda: now[0]) == steps == len(calls)


def test_recipes_benchmark_spread_and_recipe_arguments():
    from recipes import parse_recipe_arg, spread

    assert spread([10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 20.0, 30.0]) == (10.0, 2.0)
    assert spread([4.0, 2.0, 3.0]) == (3.0, 4.0 / 3.0)
    assert parse_recipe_arg("yamls/x.yaml") == ("yamls/x.yaml", [])
    assert parse_recipe_arg("yamls/x.yaml:model.plan=ma,data.doc_mask=false") == ("yamls/x.yaml", ["model.plan=ma", "data.doc_mask=false"])


def test_loss_curve_gaps_are_the_smoothed_curves_largest_and_the_tail_means_difference():
    from loss_curves import compare, ema

    assert ema([4.0, 2.0, 2.0], 0.5) == [4.0, 3.0, 2.5]
    ref = [5.0, 4.0, 3.0, 3.0, 3.0, 3.0]
    other = [5.0, 4.5, 3.0, 3.0, 3.2, 3.2]
    got = compare(ref, other, skip=1, tail=2, alpha=0.0)  # alpha 0: no smoothing
    assert got["max_smoothed_gap"] == pytest.approx(0.5)
    assert got["tail_mean_gap"] == pytest.approx(0.2)
    assert compare(ref, other, skip=2, tail=2, alpha=0.0)["max_smoothed_gap"] == pytest.approx(0.2)  # warm-up skipped
    assert compare(ref, ref[:4], skip=0, tail=1, alpha=0.0)["tail_mean_gap"] == 0.0  # the shorter run bounds both


def test_loss_curves_every_seed_pairs_each_variant_with_the_reference_at_its_seed_and_reuses_only_the_same_data_order(
        tmp_path, monkeypatch):
    """--every-seed --shuffle-with-seed: a variant at seed s is compared with
    the reference at seed s, the data order follows the seed, and an earlier
    run is reused only where its seed and data order were the same."""
    import json

    import common
    import loss_curves
    import recipes

    def curve(seed, shift):
        return [5.0 - i / 100 + (seed % 7) * 0.01 + shift for i in range(60)]

    calls = []

    def fake_trainer(recipe, overrides, work, batches, warmup, corpus):
        calls.append(overrides)
        seed = int(next(o for o in overrides if o.startswith("seed="))[5:])
        bf16 = "model.fp32_residual=false" in overrides
        base = {"plan": "standard", "seq_len": 8, "batch": 2, "corpus": corpus, "fp32_residual": not bf16}
        return base, {"loss": curve(seed, -0.005 if bf16 else 0.0), "step_ms": [1.0] * batches}

    monkeypatch.setattr(common, "prepare_gpu", lambda *a, **k: True)
    monkeypatch.setattr(recipes, "run_trainer", fake_trainer)
    # an earlier call: both variants at seed 17 and the reference at 18, all in the recipe's data order (17)
    earlier = {"config": {"recipe": "yamls/pretrain/tiny-cpu.yaml", "batches": 60},
               "runs": [{"variant": v, "seed": s, "batch": 2, "seq_len": 8, "loss": curve(s, -0.005 if v.endswith("false") else 0.0)}
                        for v, s in (("model.fp32_residual=true", 17), ("model.fp32_residual=false", 17),
                                     ("model.fp32_residual=true", 18))]}
    (tmp_path / "old.json").write_text(json.dumps(earlier))
    rc = loss_curves.main(["yamls/pretrain/tiny-cpu.yaml", "--variants", "model.fp32_residual=true", "model.fp32_residual=false",
                           "--seeds", "17", "18", "--batches", "60", "--warmup-batches", "5", "--tail", "10", "--every-seed",
                           "--shuffle-with-seed", "--reuse", str(tmp_path / "old.json"), "--out", str(tmp_path), "--name", "lc"])
    assert rc == 0
    # seed 17's runs are reused (data order 17 either way); seed 18's reference ran in order 17 before, so it runs again
    assert [[o for o in c if o.startswith(("seed=", "data.shuffle_seed="))] for c in calls] == [
        ["seed=18", "data.shuffle_seed=18"], ["seed=18", "data.shuffle_seed=18"]]
    out = json.loads((tmp_path / "lc.json").read_text())
    rows = {(r["variant"], r["seed"]): r for r in out["rows"]}
    noise = rows[("model.fp32_residual=true", 18)]
    assert noise["of"] == "seed" and noise["against_seed"] == 17
    assert noise["tail_mean_gap"] == pytest.approx(0.01)  # seed 18's curve sits 0.01 above 17's
    for seed in (17, 18):  # paired: each bf16 run against the fp32 run of its own seed, 0.005 below it
        row = rows[("model.fp32_residual=false", seed)]
        assert row["against_seed"] == seed and row["tail_mean_gap"] == pytest.approx(-0.005)
        assert row["matches"] is True


def test_recipes_pick_long_documents_from_16k_and_the_package_corpus_is_whole_packages(tmp_path):
    import sysconfig

    from common import stdlib_packages
    from train_scaling import corpus_for

    assert [corpus_for("auto", t) for t in (4096, 8192, 16384, 32768)] == ["files", "files", "packages", "packages"]
    assert corpus_for("files", 32768) == "files" and corpus_for("packages", 4096) == "packages"
    docs = stdlib_packages(tmp_path)
    names = {d.stem for d in docs}
    assert {"json", "email", "asyncio"} <= names and "test" not in names
    root = Path(sysconfig.get_paths()["stdlib"])
    text = (tmp_path / "json.py").read_text()
    sources = sorted((root / "json").rglob("*.py"))
    assert text.count("# file: json/") == len(sources) and (root / "json" / "decoder.py").read_text() in text
    mtime = (tmp_path / "json.py").stat().st_mtime_ns
    assert stdlib_packages(tmp_path) == docs and (tmp_path / "json.py").stat().st_mtime_ns == mtime  # not rewritten


def test_llm_foundry_mfu_formula_reproduces_its_published_mpt_1b_rows():
    """benchmarks/recipes.py's mfu_llm_foundry on standard-1b.yaml (MPT-1B's
    dimensions): at llm-foundry's published tokens/s/GPU on an H100 it gives
    their MFU (4K: 38,535 -> 40.26%; 32K: 12,025 -> 33.54%) within half a
    point (their parameter count differs a little), so both sides of the
    comparison use one formula."""
    from recipes import foundry_flops_per_step

    for overrides, tokens_per_s, mfu in ((["device_train_microbatch_size=8"], 38535, 0.4026),
                                         (["model.max_seq_len=32768", "device_train_microbatch_size=1"], 12025, 0.3354)):
        flops = foundry_flops_per_step("yamls/pretrain/standard-1b.yaml", overrides)
        tokens = 8 * 4096 if len(overrides) == 1 else 32768
        assert abs(flops / tokens * tokens_per_s / 989e12 - mfu) < 0.005


def test_results_go_to_their_topic_folder_and_every_program_names_a_known_one(tmp_path, monkeypatch):
    import json
    import re

    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.write_result("x", {"rows": [1]}, topic="recipes")
    assert path == tmp_path / "recipes" / "x.json" and json.loads(path.read_text())["rows"] == [1]
    assert common.write_result("y", {}, str(tmp_path / "elsewhere"), topic="recipes") == tmp_path / "elsewhere" / "y.json"
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    topics = {p.name for p in results.iterdir() if p.is_dir()}
    assert not [p.name for p in results.iterdir() if p.is_file()]  # nothing loose at the top
    for program in sorted((results.parent).glob("*.py")):
        for found in re.findall(r'topic="(\w+)"', program.read_text()):
            assert found in topics, (program.name, found)


def test_the_prefill_and_serving_programs_run_end_to_end_on_a_tiny_model(tmp_path):
    """benchmarks/prefill.py and serving.py with --tiny on the CPU: every
    (plan, prefill attention) row is measured without an error, and their
    JSON carries what the docs read, so a GPU call does not find a broken
    program. (A check of the programs, not a measurement.)"""
    import json

    import prefill
    import serving

    assert prefill.main(["--tiny", "--plans", "standard", "ma_offset", "--prompt-len", "300", "--chunk-size", "64",
                         "--window", "32", "--iters", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prefill.json").read_text())["rows"]
    assert [(r["plan"], r["prefill"]) for r in rows] == [("standard", "masked"), ("standard", "ordered"),
                                                         ("ma_offset", "masked"), ("ma_offset", "ordered")]
    assert all("error" not in r and r["ms"] > 0 for r in rows)
    assert rows[1]["ordered_backends"] == {"global": "sdpa", "sliding": "sdpa"}  # the CPU's choice
    assert serving.main(["--tiny", "--plans", "standard", "ma_offset", "--prompts", "3", "--prompt-len", "96",
                         "--out-tokens", "3", "--context", "128", "--kv-budget", "4MiB", "--chunk-size", "16",
                         "--window", "16", "--prefill", "masked", "ordered", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "serving.json").read_text())["rows"]
    assert [(r["plan"], r["prefill"]) for r in rows] == [("standard", "masked"), ("ma_offset", "masked"),
                                                         ("standard", "ordered"), ("ma_offset", "ordered")]
    assert all(r["output_tokens"] == 9 and "error" not in r for r in rows)
    assert (tmp_path / "serving.png").is_file()


def test_the_serve_load_program_measures_a_server_process_and_a_running_server(tmp_path, capsys):
    """benchmarks/serve_load.py with --tiny on the CPU: a server process per
    plan (create_app over the engine, as mixattn serve), streamed requests at a
    Poisson rate with a concurrency limit, every request completed with all
    its tokens (ignore_eos), the metrics vLLM reports, and the cache of the
    server's /stats; then --url against a server already running. (A check of
    the program, not a measurement.)"""
    import json

    import serve_load

    from mixattn.engine import Engine
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.serve import create_app

    assert serve_load.main(["--tiny", "--plans", "standard", "ma_offset", "--num-prompts", "5", "--input-len", "60",
                            "--output-len", "6", "--context", "128", "--window", "16", "--kv-budget", "64MiB",
                            "--request-rate", "50", "--max-concurrency", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve_load.json").read_text())
    rows = result["rows"]
    assert [r["plan"] for r in rows] == ["standard", "ma_offset"] and "environment" in result and result["command"]
    for r in rows:
        assert r["completed"] == 5 and r["failed"] == 0 and r["output_tokens"] == 5 * 6 and r["rows"] == 5
        assert 5 * 58 <= r["input_tokens"] <= 5 * 61  # within --range-ratio 3% of 60
        assert 0 < r["ttft_median_ms"] <= r["e2e_median_ms"] and r["tpot_median_ms"] > 0 and r["itl_p99_ms"] > 0
        assert r["max_in_flight_tokens"] <= 3 * (61 + 6)  # --max-concurrency 3
    assert rows[1]["kv_cache_bytes"] < rows[0]["kv_cache_bytes"]  # MA-Offset's rows are smaller
    assert "vs standard" in capsys.readouterr().out

    import torch

    from _uvicorn_thread import ThreadedServer

    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=4, max_seq_len=128, plan="ma",
                                       window=16)).eval()
    app = create_app(Engine(model, max_slots=2, max_context=128, chunk_size=16), serve_load.synthetic_tokenizer(512), "mine")
    with ThreadedServer(app) as server:
        url = server.url
        assert serve_load.main(["--url", url, "--model", "mine", "--num-prompts", "3", "--input-len", "20",
                                "--output-len", "4", "--name", "external", "--out", str(tmp_path)]) == 0
    external = json.loads((tmp_path / "external.json").read_text())
    assert external["rows"][0]["completed"] == 3 and external["rows"][0]["rows"] == 2 and url in external["path"]
    with pytest.raises(SystemExit):
        serve_load.main(["--url", url])  # --url needs --model


def test_the_replication_program_runs_its_three_stages_end_to_end_on_a_tiny_model(tmp_path):
    """benchmarks/replicate.py on the CPU, tiny: the three stages (the last
    with --qa-lr), evaluation before and after the QA stage, and a second
    call with --reuse-stages that trains nothing again. (A check of the
    program before a GPU session spends 25 minutes on it.)"""
    import json

    import replicate

    argv = ["--size", "tiny", "--limit-files", "60", "--short", "512", "--long", "1024", "--window", "128", "--steps", "2",
            "--long-steps", "2", "--qa-steps", "2", "--qa-lr", "1e-4", "--device", "cpu", "--no-compile", "--plans", "ma",
            "--workdir", str(tmp_path / "w"), "--samples", "1", "--eval-batches", "1", "--vocab", "512", "--out", str(tmp_path)]
    assert replicate.main(argv) == 0
    row = json.loads((tmp_path / "replication.json").read_text())["rows"][0]
    assert set(row["stage_s"]) == {"short", "long", "qa"}
    assert row["val_loss_before_qa"] is not None and row["loss_by_position_before_qa"]
    assert set(row["retrieval_by_length"]) == {"256", "512", "960"}
    assert row["seed"] == 17  # the default seed, carried by the row (a merge of several seeds tells them apart)
    assert replicate.main([*argv, "--reuse-stages"]) == 0
    again = json.loads((tmp_path / "replication.json").read_text())["rows"][0]
    assert again["reused_stages"] == ["short", "long", "qa"]  # every stage reused, not trained again
    assert again["stage_s"] == row["stage_s"]  # with the seconds the call that trained it recorded


def test_a_merge_of_two_seeds_compares_each_plan_with_standard_of_its_own_seed(tmp_path, capsys):
    """--merge of runs of two seeds (as the 24-layer replication writes, one
    file per plan and seed): the table gains a seed column; "vs standard" is
    taken against the same seed's standard row and left blank for a seed
    that has none; a row written before rows carried their seed takes its
    run's; the plot is written beside the merged JSON."""
    import json

    import replicate

    def run(name, seed, plan, loss, with_seed=True):
        row = {"plan": plan, "kv_bytes_per_token_at_long": 1920.0, "val_loss": loss, "val_loss_before_qa": None,
               "retrieval_by_length": {"512": 0.5}, "retrieval": 0.5}
        if with_seed:
            row["seed"] = seed
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"benchmark": name, "config": {"seed": seed}, "rows": [row]}))
        return str(path)

    files = [run("std17", 17, "standard", 1.80), run("ma17", 17, "ma", 1.90, with_seed=False), run("ma18", 18, "ma", 1.85),
             run("std19", 19, "standard", 2.00), run("ma19", 19, "ma", 1.95)]
    assert replicate.main(["--merge", *files, "--name", "merged", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["plan", "seed", "KV", "B/token", "val"]
    cells = {tuple(line.split()[:2]): line.split() for line in lines[2:7]}
    assert cells[("ma", "17")][3:5] == ["1.9000", "+0.1000"]  # against standard of seed 17 (1.80), seed from its run
    assert cells[("ma", "19")][3:5] == ["1.9500", "-0.0500"]  # against standard of seed 19 (2.00), not of 17
    assert cells[("ma", "18")][3:5] == ["1.8500", "0.50"]  # seed 18 has no standard: blank, then retrieval
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [r["seed"] for r in merged["rows"]] == [17, 17, 18, 19, 19] and len(merged["sources"]) == 5
    assert (tmp_path / "merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot beside the JSON


def test_a_replication_stage_cut_short_goes_on_from_its_last_checkpoint(tmp_path, monkeypatch):
    """--save-every with --reuse-stages: a call killed in the middle of stage
    1 leaves its checkpoint; the same command again resumes that stage from
    it (not from batch 0) with the batches it had not seen, then trains the
    other stages, and a third call trains nothing."""
    import json

    import replicate
    from composer.core import Callback

    import mixattn.training.trainer as trainer_module

    class Cut(Exception):
        pass

    class _Cut(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 3:
                raise Cut  # after batch 3: the checkpoint of batch 2 is the last one written

    seen = []

    class _Batches(Callback):
        def after_dataloader(self, state, logger):
            seen.append((state.run_name, int(state.timestamp.batch), state.batch["input_ids"][0, :8].tolist()))

    real = trainer_module.build_trainer
    cut = {"on": True}

    def build(cfg, extra_callbacks=None, loggers=None):
        extra = [_Batches()] + ([_Cut()] if cut["on"] and cfg.run_name.endswith("-short") else [])
        return real(cfg, extra_callbacks=extra, loggers=loggers)

    monkeypatch.setattr(trainer_module, "build_trainer", build)
    argv = ["--size", "tiny", "--limit-files", "60", "--short", "512", "--long", "1024", "--window", "128", "--steps", "4",
            "--long-steps", "2", "--qa-steps", "2", "--device", "cpu", "--no-compile", "--plans", "ma",
            "--workdir", str(tmp_path / "w"), "--samples", "1", "--eval-batches", "1", "--vocab", "512", "--out", str(tmp_path),
            "--save-every", "2", "--reuse-stages"]
    with pytest.raises(Cut):
        replicate.main(argv)
    short = tmp_path / "w" / "runs" / "ma" / "short"
    assert not (short / "DONE").exists() and (short / "latest-rank0.pt").is_file()
    first = [s for s in seen if s[0] == "ma-short"]
    assert [b for _, b, _ in first] == [0, 1, 2]  # batches 1-3 (timestamps before each)
    cut["on"], seen[:] = False, []
    assert replicate.main(argv) == 0
    row = json.loads((tmp_path / "replication.json").read_text())["rows"][0]
    assert row["resumed_from"] == {"short": 2, "long": 0, "qa": 0}  # stage 1 went on from batch 2 of 4
    resumed = [s for s in seen if s[0] == "ma-short"]
    assert [b for _, b, _ in resumed] == [2, 3]
    assert resumed[0][2] == first[2][2]  # batch 3 again (its step was lost with the cut), the same data
    done = json.loads((short / "DONE").read_text())
    assert done["resumed_at_batch"] == 2 and done["seconds"] == row["stage_s"]["short"] > 0
    assert row["reused_stages"] == []
    assert replicate.main(argv) == 0  # all three stages finished: each is reused with its recorded seconds
    again = json.loads((tmp_path / "replication.json").read_text())["rows"][0]
    assert again["reused_stages"] == ["short", "long", "qa"]
    assert again["stage_s"] == row["stage_s"] and again["resumed_from"] == row["resumed_from"]
    assert again["train_s"] >= sum(row["stage_s"].values())


def test_profile_eager_ops_table_keeps_aten_ops_by_gpu_time_with_their_callers():
    """benchmarks/profile_step.py --ops: eager ATen ops only (kernels and
    compiled regions are in the kernel table), per step, the most GPU time
    first, the calling lines without torch's own frames."""
    from types import SimpleNamespace as E

    from profile_step import eager_ops

    events = [
        E(key="aten::copy_", device_time_total=9000.0, count=6, input_shapes=[[2, 32768, 16, 64], [2, 32768, 16, 64]],
          stack=["torch/_tensor.py(1): contiguous", "mixattn/attention.py(433): _fa4_backward", "x.py(2): f"]),
        E(key="aten::add_", device_time_total=3000.0, count=3, input_shapes=[[4]], stack=[]),
        E(key="triton_poi_fused_add_0", device_time_total=50000.0, count=3, input_shapes=[], stack=[]),
        E(key="aten::view", device_time_total=0.0, count=30, input_shapes=[[4]], stack=[]),
    ]
    rows = eager_ops(events, steps=3, top=5)
    assert [r["op"] for r in rows] == ["aten::copy_", "aten::add_"]
    assert rows[0]["ms_per_step"] == 3.0 and rows[0]["calls_per_step"] == 2
    assert rows[0]["stack"] == ["mixattn/attention.py(433): _fa4_backward", "x.py(2): f"]
    assert eager_ops(events, steps=3, top=1) == rows[:1]


def test_replicate_sh_passes_a_time_limit_on_to_every_plan_and_keeps_their_workdirs(tmp_path):
    """benchmarks/replicate.sh under `timeout -s INT`: the signal reaches the
    shell, which must stop all eight plans (none trains on into the next
    call; one deaf to TERM is killed after a grace), and each plan's workdir is the same on the next call (so that
    --reuse-stages finds its checkpoints); the data is copied there once."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_dir, work, out, data = tmp_path / "bin", tmp_path / "work", tmp_path / "out", tmp_path / "prepared"
    bin_dir.mkdir()
    (data / "data").mkdir(parents=True)
    (data / "data" / "marker").write_text("data")
    stub = bin_dir / "python3"  # stands in for a plan's training: says where it runs, then waits to be stopped
    stub.write_text('#!/usr/bin/env bash\nw=""; while [ $# -gt 0 ]; do [ "$1" = --workdir ] && w=$2; shift; done\n'
                    'trap \'echo stopped >> "$w/signals"; exit 143\' TERM\n'
                    'case $w in *ma_pairs_s17) trap "" TERM;; esac\n'  # one plan hangs, deaf to TERM: it is killed
                    'echo started >> "$w/signals"\n'
                    'while true; do sleep 0.1; done\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPLICATE_WORK": str(work), "REPLICATE_GRACE": "1"}
    for call in (1, 2):
        proc = subprocess.Popen(["bash", str(root / "benchmarks" / "replicate.sh"), "17", str(data), str(out), "--save-every", "200"],
                                env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while time.time() < deadline and len(list(work.glob("*_s17/signals"))) < 8:
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
        folders = sorted(work.glob("*_s17"))
        assert [f.name for f in folders] == sorted(f"{p}_s17" for p in (
            "standard", "all_sliding", "ma", "ma_endslide", "ma_offset", "ma_pairs", "ma_offset_slideshare", "ma_pairs_slideshare"))
        for f in folders:
            deaf = f.name == "ma_pairs_s17"
            assert (f / "signals").read_text().split() == (["started"] if deaf else ["started", "stopped"]) * call, f
            assert (f / "data" / "marker").read_text() == "data"
        assert stdout.count(": exit 143") == 7 and "ma_pairs: exit 137" in stdout, stdout
    assert proc.returncode is not None


def test_replicate_sh_trains_only_the_group_of_plans_it_is_given(tmp_path):
    """REPLICATE_PLANS: one call's group (its results come back with it)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_dir, work, out, data = tmp_path / "bin", tmp_path / "work", tmp_path / "out", tmp_path / "prepared"
    bin_dir.mkdir()
    (data / "data").mkdir(parents=True)
    stub = bin_dir / "python3"  # a plan that trains at once: records its plan and seed
    stub.write_text('#!/usr/bin/env bash\nw=""; a=""; while [ $# -gt 0 ]; do [ "$1" = --workdir ] && w=$2; '
                    '[ "$1" = --plans ] && a=$2; [ "$1" = --seed ] && a="$a $2"; shift; done\necho "$a" > "$w/args"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPLICATE_WORK": str(work),
           "REPLICATE_PLANS": "ma_offset standard"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "replicate.sh"), "18", str(data), str(out)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["ma_offset: exit 0", "standard: exit 0"], done
    assert sorted(f.name for f in work.iterdir()) == ["ma_offset_s18", "standard_s18"]
    assert (work / "ma_offset_s18" / "args").read_text().split() == ["ma_offset", "18"]


def test_batch1_sh_runs_each_part_under_its_limit_with_flags_the_programs_accept(tmp_path):
    """benchmarks/batch1.sh, issue #18's batch-1 measurement in one GPU call:
    every decode.py line parses with decode.py's own parser and asks for what
    the docs say (the persistent kernel with profiles, then the default path
    side by side; JSON names that overwrite nothing quoted), the GPU test's
    -k selects the test that exists, and a part cut by its limit does not stop
    the next."""
    import os
    import shlex
    import subprocess

    from decode import build_parser

    root = Path(__file__).resolve().parents[1]
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    stub = bin_dir / "python3"  # records each call; the persistent part hangs until its limit stops it
    stub.write_text('#!/usr/bin/env bash\nprintf "%q " "$@" >> "$CALLS"; echo >> "$CALLS"\n'
                    'case " $* " in *" decode_persistent_h200 "*) trap "exit 130" INT; while true; do sleep 0.1; done;; esac\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(log), "BATCH1_PERSISTENT_S": "1",
           "BATCH1_MORE": "1"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "batch1.sh"), str(tmp_path / "out"), "_h200"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    assert "=== persistent kernel: exit 124" in done.stdout and "=== default path: exit 0" in done.stdout, done.stdout
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    test, *decodes = calls
    assert test[:3] == ["-m", "pytest", "-x"]
    selected = test[test.index("-k") + 1]
    gpu_tests = (root / test[test.index("-k") - 1]).read_text()
    assert f"def test_the_persistent_step_gives_the_{selected}(" in gpu_tests
    args = [build_parser().parse_args(c[1:]) for c in decodes]
    assert all(c[0] == "benchmarks/decode.py" for c in decodes)
    assert [(a.name, a.persistent, a.persistent_kernel) for a in args] == [
        ("decode_persistent_h200", True, []), ("decode_default_h200", False, []),
        ("decode_persistent_head_flags_h200", True, ["HEAD_FLAGS=true"]),
        ("decode_persistent_l2_prefetch_h200", True, ["L2_PREFETCH=true"]),
        ("decode_persistent_num_warps_h200", True, ["NUM_WARPS=4"])]
    for a in args:
        assert (a.batches, a.contexts, a.budget, a.compare, a.out) == ([1], [8192, 32768], False, False, str(tmp_path / "out"))
    assert args[0].profile and {"ma", "standard", "ma_offset", "ma_pairs"} == set(args[0].plans)
    assert args[1].compile is None and args[1].gemv is None  # the default path: no flag but --no-persistent
    # without a suffix, the names overwrite no result that is committed (and quoted in the docs)
    log.unlink()
    env.pop("BATCH1_MORE")
    subprocess.run(["bash", str(root / "benchmarks" / "batch1.sh"), str(tmp_path / "out")], env=env, capture_output=True,
                   text=True, timeout=60, check=True)
    names = [build_parser().parse_args(shlex.split(line)[1:]).name for line in log.read_text().splitlines()[1:]]
    committed = {p.stem for p in (root / "benchmarks" / "results" / "decode").glob("*.json")}
    assert names == ["decode_persistent_batch1", "decode_default_batch1"] and not set(names) & committed
