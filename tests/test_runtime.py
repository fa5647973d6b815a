"""Runtime harnesses on tiny models: profiles, pinning, memory cap, latency, roofline, report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from compress.blocks import share_blocks
from compress.format import save_folded
from runtime_tests.emulate import (Isolation, bytes_per_token, gemm_peak, prefill_flops_per_token, project_decode,
                                   project_prefill, run_isolated, shape_of, stream_triad)
from runtime_tests.latency import measure_latency
from runtime_tests.runtimes import TorchRunner, make_runner
from runtime_tests.memory import weights_check
from runtime_tests.profiles import DEFAULT_PROFILE, check_cores, known_profiles, load_profile
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A dense 4-depth tiny llama and the same model folded to 2 shared blocks, with gates."""
    root = tmp_path_factory.mktemp("rt")
    dense = save_folded(tiny_model("llama"), root / "dense", tiny_tokenizer(), provenance={"method": "test"})
    m = tiny_model("llama")
    share_blocks(m, [0, 0, 1, 1])
    folded = save_folded(m, root / "folded", tiny_tokenizer(), provenance={"method": "test", "gates": [0.9, 0.2, 0.8, 0.7]})
    return dense, folded


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", known_profiles())
def test_every_profile_parses_with_sources(name):
    p = load_profile(name)
    assert p.performance_cores >= 1 and p.memory_bandwidth_gbs > 0 and p.app_ram_budget_mb > 0
    assert set(p.sources) == {"performance_cores", "clock_ghz", "memory_bandwidth_gbs", "llc_mb", "app_ram_budget_mb"}
    assert all(s["source"].strip() for s in p.sources.values())


def test_the_three_device_classes_and_the_default_exist():
    assert {"snapdragon_8_gen_3", "snapdragon_7_gen_3", "apple_a17_pro"} <= set(known_profiles())
    assert DEFAULT_PROFILE in known_profiles()


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ValueError, match="known profiles: .*apple_a17_pro"):
        load_profile("pixel_99")


def test_a_figure_without_source_is_rejected(tmp_path):
    data = json.loads((Path(load_profile.__globals__["PROFILE_DIR"]) / "apple_a17_pro.json").read_text())
    data["llc_mb"]["source"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="llc_mb has no source"):
        load_profile(tmp_path / "bad.json")


def test_more_cores_than_the_machine_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs \d+ cores but this machine has"):
        check_cores((os.cpu_count() or 1) + 1)
    assert check_cores(1) == [sorted(os.sched_getaffinity(0))[0]]


# ----------------------------------------------------------------------------- emulation


def test_pinning_restricts_the_child_process():
    core = sorted(os.sched_getaffinity(0))[-1]
    rec = run_isolated("runtime_tests.emulate:affinity_probe", {}, Isolation(cores=[core]), preload=("torch",))
    assert rec["status"] == "ok", rec
    assert rec["result"]["affinity"] == [core]
    assert rec["result"]["torch_threads"] == 1


def test_low_memory_cap_is_reported_as_does_not_fit():
    rec = run_isolated("runtime_tests.emulate:allocate_probe", {"mb": 256}, Isolation(cores=check_cores(1), budget_mb=32),
                       preload=("numpy",))
    assert rec["status"] == "does_not_fit", rec
    assert rec["message"].startswith("does not fit: needs ") and rec["message"].endswith("budget 32 MB")
    assert rec["needs_mb"] >= 256
    ok = run_isolated("runtime_tests.emulate:allocate_probe", {"mb": 8}, Isolation(cores=check_cores(1), budget_mb=64),
                      preload=("numpy",))
    assert ok["status"] == "ok"


def die_by(name: str) -> None:
    """A child that a signal kills below Python (run_isolated's target in the test below)."""
    import signal

    signal.raise_signal(getattr(signal, name))


def test_a_crash_under_a_memory_cap_is_an_error_not_does_not_fit():
    """SIGILL (llama.cpp's AMX kernels on a guest without AMX state) is a crash; SIGKILL may be the OOM killer."""
    iso = Isolation(cores=check_cores(1), budget_mb=256)
    crash = run_isolated("tests.test_runtime:die_by", {"name": "SIGILL"}, iso, preload=("tests.test_runtime",))
    assert crash["status"] == "error" and crash["message"] == "tests.test_runtime:die_by: killed by SIGILL", crash
    assert run_isolated("tests.test_runtime:die_by", {"name": "SIGKILL"}, iso, preload=("tests.test_runtime",))["status"] == "does_not_fit"


def test_stream_triad_measures_a_bandwidth():
    r = stream_triad(array_mb=8, threads=1, repeats=2)
    assert r["triad_gbs"] > 0.1 and "measured" in r["label"]


def test_gemm_peak_measures_fp32_and_int8():
    r = gemm_peak(n=128, threads=1, repeats=2)
    assert r["fp32_gflops"] > 0.1 and r["int8_gops"] > 0.1 and "measured" in r["label"]


def test_prefill_roofline_counts_every_depth_and_the_head_once_per_prompt(models):
    from compress.format import load_folded
    from runtime_tests.bench import prefill_vs_roofline

    folded = shape_of(load_folded(models[1])[0])  # 4 depths over 2 unique blocks: compute counts depths
    blocks = 2 * sum(folded.block_params[b] for b in folded.schedule)
    assert blocks == 2 * 2 * sum(folded.block_params.values())
    n = 8
    attention = 2 * 2 * folded.hidden * (n + 1) / 2 * 4
    assert prefill_flops_per_token(folded, n) == pytest.approx(blocks + attention + 2 * folded.head_params / n)
    p = project_prefill(folded, 100.0, n)
    assert p["tokens_per_s"] == pytest.approx(100e9 / prefill_flops_per_token(folded, n), rel=1e-3)
    half = 1000 * n / (project_prefill(folded, 200.0, n)["tokens_per_s"] / 2)  # a TTFT at half the int8 roofline
    run = {"precision": "8da4w+emb8", "latency": {"ttft_ms": {"8": {"p50": half, "p90": 2 * half}}}}
    row = prefill_vs_roofline(folded, run, {"fp32_gflops": 50.0, "int8_gops": 200.0})["8"]
    assert row["compute"] == "int8" and row["tokens_per_s"] == pytest.approx(n / half * 1000, abs=0.1)
    assert row["fraction_of_roofline"] == pytest.approx(0.5, abs=2e-3)
    assert prefill_vs_roofline(folded, {**run, "precision": "fp32"}, {"fp32_gflops": 50.0})["8"]["compute"] == "fp32"


def test_roofline_counts_a_shared_block_once_when_it_fits_the_cache(models):
    from compress.format import load_folded

    dense, folded = (shape_of(load_folded(p)[0]) for p in models)
    block = folded.block_params[0] * 4
    stream = bytes_per_token(folded, 4, context=16)
    cached = bytes_per_token(folded, 4, context=16, llc_bytes=block)
    assert stream["blocks"] == pytest.approx(bytes_per_token(dense, 4, 16)["blocks"], rel=0.05)  # every depth reads
    assert stream["blocks"] - cached["blocks"] == pytest.approx(2 * block)  # depths 1 and 3 hit the cache
    assert bytes_per_token(folded, 4, 16, llc_bytes=block - 1)["blocks"] == stream["blocks"]  # too big: no reuse
    assert stream["kv_cache"] == 2 * 4 * 2 * 8 * 16 * 4  # K+V x depths x kv_heads x head_dim x context x fp32
    p = project_decode(folded, 50.0, 1.0, 4, 16)
    assert "projection" in p["label"] and p["tokens_per_s_cache_resident"] > p["tokens_per_s"]


# ----------------------------------------------------------------------------- latency and memory


def test_latency_harness_on_a_tiny_torch_model(models):
    r = measure_latency(TorchRunner(models[1], threads=1), prompt_lengths=(4, 16), decode_tokens=4, warmup=1,
                        repeats=2, vocab=99)
    assert set(r["ttft_ms"]) == {"4", "16"}
    assert len(r["ttft_ms"]["16"]["runs"]) == 2 and r["ttft_ms"]["16"]["p90"] >= r["ttft_ms"]["16"]["p50"] > 0
    assert r["decode_tokens_per_s"]["p50"] > 0


def test_torch_runner_decode_matches_a_full_forward(models):
    import torch
    from compress.format import load_folded

    runner = TorchRunner(models[1], threads=1)
    ids = [5, 9, 12, 7]
    runner.reset()
    runner.prefill(ids[:2])
    runner.step(ids[2])
    last = runner.step(ids[3])
    model, _ = load_folded(models[1])
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert abs(last - full).max() < 1e-4


def test_static_context_skips_long_prompts(models):
    runner = TorchRunner(models[1], threads=1)
    runner.max_context = 20
    r = measure_latency(runner, prompt_lengths=(4, 32), decode_tokens=30, warmup=0, repeats=1, vocab=99)
    assert "32" in r["skipped"] and "4" in r["ttft_ms"] and r["decode_tokens"] == 16


def test_unknown_runtime_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="known runtimes: etrunner, executorch, genai, llamacpp, onnx, torch"):
        make_runner("tflite", "x")


class FakeLlama:
    """Stands in for llama_cpp.Llama: records the settings and, like llama-cpp-python's
    `Llama.eval` with logits_all off (it writes `scores` only when logits_all is on), keeps
    only the last evaluated position's logits in its context, so a runner reading `scores`
    fails here; the logits depend on the whole context."""

    def __init__(self, path, **kw):
        import ctypes

        self.path, self.kw, self.n_tokens, self.history = path, kw, 0, []
        self.ctx = (ctypes.c_float * 7)()
        self.scores = None

    def n_vocab(self):
        return 7

    def reset(self):
        self.n_tokens, self.history = 0, []

    def eval(self, ids):
        self.history += ids
        self.n_tokens += len(ids)
        for i in range(7):
            self.ctx[i] = float(i == sum(self.history) % 7)


def fake_logits_ith(ctx, i):
    import ctypes

    assert i == -1
    return ctypes.cast(ctx, ctypes.POINTER(ctypes.c_float))


def test_llamacpp_runner_reads_the_last_positions_logits(tmp_path, monkeypatch):
    import sys
    import types

    from runtime_tests.runtimes import LlamaCppRunner

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, llama_get_logits_ith=fake_logits_ith))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    runner = make_runner("llamacpp", gguf, threads=2)
    assert isinstance(runner, LlamaCppRunner) and runner.llm.kw["n_threads"] == runner.llm.kw["n_threads_batch"] == 2
    assert runner.llm.kw["n_ctx"] >= 512 + 128 and runner.vocab_size == 7
    assert int(runner.prefill([1, 2]).argmax()) == 3 and int(runner.step(3).argmax()) == 6
    runner.reset()
    assert int(runner.prefill([2]).argmax()) == 2
    r = measure_latency(runner, prompt_lengths=(4,), decode_tokens=3, warmup=0, repeats=1, vocab=7)
    assert r["decode_tokens_per_s"]["p50"] > 0
    with pytest.raises(FileNotFoundError, match="not a .gguf"):
        make_runner("llamacpp", tmp_path / "model.pte")


def test_llamacpp_loads_without_extra_buffers_only_where_the_cpu_reports_amx(tmp_path, monkeypatch):
    """AMX reported but not enabled kills llama.cpp with SIGILL: there its weights skip the
    extra (AMX) buffers; elsewhere llama.cpp's defaults stand, and are restored after loading."""
    import sys
    import types

    from runtime_tests import runtimes

    seen = []

    class Params:
        use_extra_bufts = True

    lib = types.SimpleNamespace(llama_model_default_params=Params)

    class Loading(FakeLlama):
        def __init__(self, path, **kw):
            super().__init__(path, **kw)
            seen.append(lib.llama_model_default_params().use_extra_bufts)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(
        Llama=Loading, llama_get_logits_ith=fake_logits_ith, llama_cpp=lib))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for amx in (True, False):
        monkeypatch.setattr(runtimes, "cpu_reports_amx", lambda: amx)
        make_runner("llamacpp", gguf)
    assert seen == [False, True] and lib.llama_model_default_params is Params


def test_ratios_are_per_round_medians_within_a_decode_group():
    from runtime_tests.bench import decode_groups, ratios

    run = lambda model, backend, precision: {"model": model, "backend": backend, "precision": precision,  # noqa: E731
                                             "status": "ok"}
    runs = [run("dense", "executorch", "8da4w+emb8"), run("folded", "executorch", "8da4w+emb8"),
            run("dense", "llamacpp", "q4_1"), run("dense", "onnx", "fp32"), run("folded", "onnx", "fp32"),
            {**run("folded", "torch", "fp32"), "status": "missing"}]
    groups = decode_groups(runs)
    # one runtime per group (llama.cpp alone); a run that did not work is in none
    assert {k: [(r["model"], r["backend"]) for r in v] for k, v in groups.items()} == {
        "executorch:8da4w+emb8": [("dense", "executorch"), ("folded", "executorch")],
        "llamacpp:q4_1": [("dense", "llamacpp")], "onnx:fp32": [("dense", "onnx"), ("folded", "onnx")]}
    # a slow phase of the machine (round 2) slows both members; per-round ratios cancel it,
    # while comparing each member's own median would not
    et = {"dense/executorch:8da4w+emb8": [5.0, 10.0, 5.0], "folded/executorch:8da4w+emb8": [4.0, 8.0, 4.4]}
    result = {"models": {"dense": {"depth": 30}, "folded": {"depth": 27}},
              "decode_groups": {"executorch:8da4w+emb8": {"status": "ok", "ms_per_token": et},
                                "llamacpp:q4_1": {"status": "ok", "ms_per_token": {"dense/llamacpp:q4_1": [6.0, 6.6, 7.0]}},
                                "onnx:fp32": {"status": "error", "message": "x"}}}
    out = ratios(result)
    assert out["folded/executorch:8da4w+emb8"] == {"decode_speedup_vs_dense": 1.25, "target": 1.056,
                                                   "meets_target": True, "rounds": 3}
    # against llama.cpp: medians of separate processes (6.6 / 4.4 and 6.6 / 5.0)
    peer = out["folded/executorch:8da4w+emb8 vs dense/llamacpp:q4_1"]
    assert peer == {"decode_speed_vs_llamacpp": 1.5, "target": 1.0, "meets_target": True, "paired": False}
    assert out["dense/executorch:8da4w+emb8 vs dense/llamacpp:q4_1"]["decode_speed_vs_llamacpp"] == 1.32
    assert not any(k.startswith("folded/onnx") for k in out)  # its group failed: no ratio


def test_decode_rounds_alternate_the_runners(models):
    from runtime_tests.latency import decode_rounds

    order = []

    class Recording(TorchRunner):
        def __init__(self, name, *args, **kw):
            self.name = name  # set first: the base __init__ calls reset()
            super().__init__(*args, **kw)

        def reset(self):
            order.append(self.name)
            super().reset()

    runners = {"a": Recording("a", models[0], threads=1), "b": Recording("b", models[1], threads=1)}
    order.clear()
    r = decode_rounds(runners, rounds=3, decode_tokens=2, prompt_len=4, warmup=1, vocab=99)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up round, then 3 timed, order reversed each round
    assert {k: len(v) for k, v in r["ms_per_token"].items()} == {"a": 3, "b": 3}
    assert all(v > 0 for t in r["ms_per_token"].values() for v in t)
    with pytest.raises(ValueError, match="rounds >= 1"):
        decode_rounds(runners, rounds=0)


def test_weight_bytes_counts_each_file_once(tmp_path):
    from runtime_tests.memory import weight_bytes

    (tmp_path / "model.onnx").write_bytes(b"g" * 10)
    (tmp_path / "model.onnx.data").write_bytes(b"w" * 1000)  # matches "*.data" only once
    (tmp_path / "tokenizer.json").write_text("{}")
    assert weight_bytes(tmp_path) == 1010


def test_memory_follows_unique_is_decided_against_dense():
    """Both runs hold 60 MB besides weights; a ratio to the weights alone would call the
    folded torch run 'effective' (see the committed report's history), the difference does not."""
    from runtime_tests.bench import memory_vs_dense

    mb = 1 << 20
    models = {"dense": {"unique_params": 100 * mb, "effective_params": 100 * mb},
              "folded": {"unique_params": 70 * mb, "effective_params": 90 * mb}}
    run = lambda model, rss: {"model": model, "backend": "torch", "precision": "fp32", "status": "ok",  # noqa: E731
                              "memory": {"rss_after_run": rss}}
    out = memory_vs_dense({"models": models, "runs": [run("dense", 460 * mb), run("folded", 340 * mb)]})
    assert out == {"folded/torch:fp32": {"rss_saved": 120 * mb, "unique_saving": 120 * mb, "effective_saving": 40 * mb,
                                         "follows_unique": True}}
    out = memory_vs_dense({"models": models, "runs": [run("dense", 460 * mb), run("folded", 425 * mb)]})
    assert out["folded/torch:fp32"]["follows_unique"] is False  # a copy per depth: saved only the removed blocks
    models["removed"] = {"unique_params": 70 * mb, "effective_params": 70 * mb}  # nothing shared: nothing to decide
    out = memory_vs_dense({"models": models, "runs": [run("dense", 460 * mb), run("removed", 340 * mb)]})
    assert out["removed/torch:fp32"]["follows_unique"] is None
    assert weights_check(340 * mb, 280 * mb, 360 * mb)["rss_over_unique"] == round(340 / 280, 3)


def test_onnx_runner(models, tmp_path):
    from export.onnx import export_onnx
    from export.registry import ExportConfig

    out = tmp_path / "onnx"
    export_onnx(models[1], out, ExportConfig(parity=False), measure=False)
    r = measure_latency(make_runner("onnx", out, threads=1), prompt_lengths=(4,), decode_tokens=4, warmup=0,
                        repeats=1, vocab=99)
    assert r["decode_tokens_per_s"]["p50"] > 0
    # ONNX Runtime GenAI on the same folder: the same next-token logits as our session
    genai, ours, ids = make_runner("genai", out, threads=1), make_runner("onnx", out, threads=1), [5, 9, 11, 7]
    np.testing.assert_allclose(genai.prefill(ids), ours.prefill(ids), atol=1e-4)
    np.testing.assert_allclose(genai.step(13), ours.step(13), atol=1e-4)
    r = measure_latency(genai, prompt_lengths=(4,), decode_tokens=4, warmup=0, repeats=1, vocab=99)
    assert r["decode_tokens_per_s"]["p50"] > 0


def test_a_new_runtime_is_one_registration(monkeypatch):
    """A dummy runtime, registered once, is driven by the latency and memory harnesses and
    accepted by the bench."""
    from runtime_tests import runtimes
    from runtime_tests.bench import BenchConfig
    from runtime_tests.memory import memory_job

    monkeypatch.setattr(runtimes._RUNTIMES, "entries", dict(runtimes._RUNTIMES.entries))

    @runtimes.register_runtime("dummy", preload=("numpy",))
    class Dummy:
        max_context = None

        def __init__(self, artifact, threads=None):
            self.seen = []

        def reset(self):
            self.seen = []

        def prefill(self, ids):
            self.seen += list(ids)
            return np.eye(5)[len(self.seen) % 5]

        def step(self, token):
            return self.prefill([token])

    r = measure_latency(make_runner("dummy", "x"), prompt_lengths=(4,), decode_tokens=3, warmup=0, repeats=1, vocab=5)
    assert r["decode_tokens_per_s"]["p50"] > 0 and "4" in r["ttft_ms"]
    assert memory_job("dummy", "x", threads=1, decode_tokens=3)["decode_tokens"] == 3
    assert BenchConfig(models={"m": "x"}, artifacts={"m": {"dummy:fp32": "x"}}).artifacts
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        BenchConfig(models={"m": "x"}, artifacts={"m": {"nope:fp32": "x"}})


# ----------------------------------------------------------------------------- bench and report


def test_bench_writes_the_report_with_missing_export_and_oom(models, tmp_path):
    from runtime_tests.bench import BenchConfig, bench

    out = tmp_path / "bench"
    result = bench(BenchConfig(models={"dense": str(models[0]), "folded": str(models[1])},
                               artifacts={"folded": {"executorch:fp32": str(tmp_path / "missing.pte")}},
                               out=str(out), cores=1, prompt_lengths=(4, 8), decode_tokens=4, warmup=0, repeats=1))
    statuses = {(r["model"], r["backend"]): r["status"] for r in result["runs"]}
    assert statuses == {("dense", "torch"): "ok", ("folded", "torch"): "ok", ("folded", "executorch"): "missing"}
    assert all(r["affinity_seen"] == result["cores"] for r in result["runs"] if r["status"] == "ok")
    md = (out / "report.md").read_text()
    assert "projection" in md and "measured" in md and "missing" in md and "compute roofline" in md
    assert result["host_compute"]["int8_gops"] > 0 and set(result["runs"][0]["prefill"]) == {"4", "8"}
    assert {"latency_vs_compression", "memory_vs_compression", "size_breakdown", "gates"} <= set(result["files"])
    assert json.loads((out / "bench.json").read_text())["ratios"]["folded/torch:fp32"]["target"] == 0.95

    tight = bench(BenchConfig(models={"folded": str(models[1])}, out=str(tmp_path / "tight"), cores=1,
                              prompt_lengths=(4,), decode_tokens=2, warmup=0, repeats=1, budget_mb=1))
    assert tight["runs"][0]["status"] == "does_not_fit"
    assert "does not fit: needs" in (tmp_path / "tight" / "report.md").read_text()


def test_bench_rejects_bad_input_before_work(models, tmp_path):
    from runtime_tests.bench import BenchConfig, bench

    with pytest.raises(ValueError, match="unknown profile"):
        bench(BenchConfig(models={"m": str(models[1])}, profile="nope", out=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown backend"):
        BenchConfig(models={"m": str(models[1])}, artifacts={"m": {"tflite:fp32": "x"}})
    with pytest.raises(ValueError, match=r"the only suffixes are \+emb4 and \+emb8"):  # parsed as exports parse it
        BenchConfig(models={"m": str(models[1])}, artifacts={"m": {"executorch:8da4w+emb2": "x"}})
    with pytest.raises(ValueError, match="cores"):
        bench(BenchConfig(models={"m": str(models[1])}, cores=(os.cpu_count() or 1) + 1, out=str(tmp_path)))

