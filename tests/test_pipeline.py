"""`foldgpt run` end to end on a tiny model: stages in order, resumable, failures recorded."""

import json

import pytest

from compress.format import save_folded
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture
def text(tmp_path, monkeypatch):
    """Calibration and healing text from a file (the run's data source), and held-out text from
    it too: the tiny model has no chat template worth sampling from."""
    file = tmp_path / "text.txt"
    file.write_text(("A short story about folding shared weights. " * 20 + "\n\n") * 10)
    import compress.data as data

    monkeypatch.setattr(data, "held_out_text", lambda model, tok, tokens: file.read_text())
    return file


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Exports kept per machine (export.cache) go under this test's folder, never the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def source(tmp_path, text):
    return save_folded(tiny_model(layers=6, hidden=64, vocab=99), tmp_path / "src", tiny_tokenizer())


def config(tmp_path, source, fold=None, heal=None, **kw):
    from compress.data import DataConfig
    from compress.fold import FoldConfig
    from compress.heal import HealConfig
    from compress.importance import GateConfig
    from compress.select import SelectConfig
    from foldgpt.pipeline import RunConfig

    text = str(tmp_path / "text.txt")
    base = dict(model=str(source), out=str(tmp_path / "run"),
                fold=FoldConfig(**{"removal_rate": 0.34, "group_size": 2, "gate": GateConfig(steps=5),
                                   "select": SelectConfig(candidates="gates"), **(fold or {})}),
                heal=HealConfig(**{"max_minutes": 0.05, **(heal or {})}),
                calib=DataConfig(source=text, num_sequences=12, seq_len=16),
                heal_data=DataConfig(source=text, num_sequences=8, seq_len=16, seed=1),
                exports=(("onnx", "fp32"),), max_context=64, bench=False)
    base.update(kw)
    return RunConfig(**base)


def test_run_makes_every_stage_and_resumes(tmp_path, source, monkeypatch):
    from foldgpt import pipeline

    summary = pipeline.run(config(tmp_path, source))
    run = tmp_path / "run"
    assert (run / "dense" / "model.safetensors").is_file() and (run / "folded" / "model.safetensors").is_file()
    assert [e["status"] for e in summary["exports"]["folded"]] == ["ok"]
    assert (run / "exports" / "folded-onnx-fp32" / "model.onnx").is_file()
    assert json.loads((run / "run.json").read_text())["exports"]["dense"][0]["status"] == "ok"
    folded = json.loads((run / "folded" / "config.json").read_text())["fold"]
    assert folded["schedule"] == [0, 0, 1, 1]
    quality = summary["quality"]  # what the fold costs, measured on text no stage saw
    assert quality["dense"]["depths"] == 6 and quality["folded"]["depths"] == 4
    assert quality["folded"]["unique_blocks"] == 2 and quality["folded"]["unique_bytes"] < quality["dense"]["unique_bytes"]
    assert quality["folded"]["perplexity"] != quality["dense"]["perplexity"] and quality["dense"]["perplexity"] > 1
    assert json.loads((run / "quality.json").read_text()) == quality
    texts = {f.name: f.read_text() for f in (run / "texts").iterdir()}  # the exports' gate and gptq texts
    assert sorted(texts) == ["calibration.txt", "held_out.txt"] and all(texts.values())

    import compress.recipe as recipe
    import export.onnx as onnx

    monkeypatch.setattr(recipe, "compress", lambda *a, **k: pytest.fail("finished compress stage was redone"))
    import compress.data as data

    monkeypatch.setattr(data, "held_out_text", lambda *a, **k: pytest.fail("measured quality was redone"))
    import export.registry as registry
    from dataclasses import replace

    monkeypatch.setitem(registry._BACKENDS.entries, "onnx",
                        replace(onnx.BACKEND, export=lambda *a, **k: pytest.fail("finished export was redone")))
    first = json.loads((run / "run.json").read_text())["timings_s"]
    pipeline.run(config(tmp_path, source))
    rerun = json.loads((run / "run.json").read_text())  # the stages it skipped keep the minutes they took
    stages = ["compress_s", "dense_s", "export_s", "quality_s"]
    assert rerun["timings_from_earlier_run"] == stages
    assert {k: rerun["timings_s"][k] for k in stages} == {k: first[k] for k in stages}


def test_failed_export_is_recorded_and_the_run_goes_on(tmp_path, source, monkeypatch):
    from foldgpt import pipeline
    import export.onnx as onnx

    def broken(*a, **k):
        raise ValueError("unsupported op: for the test")

    from dataclasses import replace

    import export.registry as registry

    monkeypatch.setitem(registry._BACKENDS.entries, "onnx", replace(onnx.BACKEND, export=lambda *a, **k: broken()))
    summary = pipeline.run(config(tmp_path, source, export_workers=1))  # the patch lives in this process
    row = summary["exports"]["folded"][0]
    assert row["status"] == "failed" and "unsupported op" in row["error"]


def test_bad_settings_fail_before_the_run_folder_is_made(tmp_path, source):
    from foldgpt import pipeline

    for bad, match in ((dict(fold={"removal_rate": 1.5}), "removal_rate"), (dict(heal={"max_minutes": -1}), "max_minutes must be positive"),
                       (dict(exports=(("onnx", "8da4w"),)), "onnx backend exports"), (dict(quality_tokens=-1), "quality_tokens"),
                       (dict(weight_method="awq"), "unknown weight method 'awq'"), (dict(max_ppl_ratio=0.5), "at least 1, got 0.5"),
                       (dict(export_workers=0), "export_workers >= 1")):
        with pytest.raises(ValueError, match=match):
            pipeline.run(config(tmp_path, source, **bad))
        assert not (tmp_path / "run").exists()


def test_quality_section_states_the_cost():
    from foldgpt.pipeline import quality_section

    row = dict(depths=30, unique_blocks=30, unique_params=134.5e6, unique_bytes=538 * 2**20)
    text = quality_section({"text": "4096 tokens", "dense": {**row, "perplexity": 4.0},
                            "folded": {**row, "perplexity": 6.0, "depths": 24, "unique_blocks": 20}})
    assert "| folded | 6.00 | 1.50x | 24 | 20 | 134.5M | 538.0 |" in text


def test_exports_spec_parses_and_rejects_bad_input():
    from export.registry import ExportConfig
    from foldgpt.pipeline import parse_exports

    assert parse_exports("onnx:fp32, executorch:8da4w+emb8") == (("onnx", "fp32"), ("executorch", "8da4w+emb8"))
    cfg = ExportConfig.from_spec("8da4w+emb4", max_context=64)
    assert (cfg.precision.value, cfg.embedding_bits, cfg.max_context) == ("8da4w", 4, 64)
    for bad, match in (("tflite:fp32", "BACKEND:PRECISION"), ("onnx", "BACKEND:PRECISION"),
                       ("onnx:int3", "unknown precision"), ("executorch:8da4w+emb2", "suffixes"), (",", "empty"),
                       ("onnx:8da4w", "onnx backend exports fp32, int8, int4, not 8da4w")):
        with pytest.raises(ValueError, match=match):
            parse_exports(bad)


def test_a_new_export_backend_is_one_registration(tmp_path, monkeypatch):
    """A dummy backend, registered once, is accepted by --exports (its precisions, no others)
    and written by the run's export stage where it says, its report beside the artifact."""
    import export.registry as registry
    from export.registry import Precision, register_backend
    from foldgpt.pipeline import RunConfig, export_all, parse_exports

    monkeypatch.setattr(registry._BACKENDS, "entries", dict(registry._BACKENDS.entries))
    written = []

    def export(model_dir, out, cfg, measure=True):
        out.write_text(f"{cfg.precision.value} of {model_dir}")
        written.append(out)
        return {"precision": cfg.precision.value}

    register_backend("dummy", export=export, generate=lambda *a, **k: [], precisions=(Precision.INT8,), artifact="m.bin")
    exports = parse_exports("dummy:int8")
    with pytest.raises(ValueError, match="dummy backend exports int8, not fp32"):
        parse_exports("dummy:fp32")
    assert RunConfig(exports=exports).exports == (("dummy", "int8"),)  # the run accepts it as any other
    rows = export_all({"folded": tmp_path / "model"}, exports, tmp_path / "exports", max_context=64)["folded"]
    folder = tmp_path / "exports" / "folded-dummy-int8"
    assert rows == [{"backend": "dummy", "precision": "int8", "path": str(folder / "m.bin"), "status": "ok"}]
    assert written == [folder / "m.bin"] and (folder / "m.bin").read_text().startswith("int8 of")
    assert json.loads((folder / "export_report.json").read_text()) == {"precision": "int8"}


def test_exports_in_worker_processes_keep_their_order_and_failures(tmp_path, source):
    """Two workers: each export runs in its own process, the rows come back in the order asked
    (not the order finished), a failure is one row, and a rerun keeps what exists."""
    from foldgpt.pipeline import export_all, exports_section

    models = {"missing": tmp_path / "no-model", "folded": source}
    rows = export_all(models, (("onnx", "fp32"),), tmp_path / "exports", 64, workers=2)
    assert list(rows) == ["missing", "folded"]
    (missing,), (made,) = rows["missing"], rows["folded"]
    assert missing["status"] == "failed" and "no-model" in missing["error"]
    assert made["status"] == "ok" and made["parity"]["passed"] and (tmp_path / "exports" / "folded-onnx-fp32").is_dir()
    assert json.loads((tmp_path / "exports" / "folded-onnx-fp32" / "export_report.json").read_text())["seconds"] == made["seconds"]
    assert "ran 2 at a time" in exports_section(rows, workers=2) and "at a time" not in exports_section(rows)
    again = export_all(models, (("onnx", "fp32"),), tmp_path / "exports", 64, workers=2)["folded"][0]
    assert again["kept"] and again["seconds"] == made["seconds"]


def test_an_unchanged_model_is_exported_once_per_machine(tmp_path, source, monkeypatch):
    """A model named in `cached` is exported once: a second run copies that export in (same bytes,
    same report, the backend not called); other gate text is another export; a model not named
    is exported every time and not kept."""
    import export.registry as registry
    from pathlib import Path

    from export.cache import cache_root
    from export.registry import Precision, register_backend
    from foldgpt.pipeline import export_all, exports_section

    monkeypatch.setattr(registry._BACKENDS, "entries", dict(registry._BACKENDS.entries))
    calls = []

    def export(model_dir, out, cfg, measure=True):
        calls.append(out)
        out.write_text(f"{len(calls)}: {cfg.precision.value} gated on {Path(cfg.gate_text).read_text()}")
        return {"seconds": {"lower": 1.5}}

    register_backend("dummy", export=export, generate=lambda *a, **k: [], precisions=(Precision.INT8,), artifact="m.bin")
    gate = tmp_path / "gate.txt"
    gate.write_text("held out")
    run = lambda out, **kw: export_all({"dense": source}, (("dummy", "int8"),), tmp_path / out, 64,  # noqa: E731
                                       {"gate_text": str(gate)}, **kw)["dense"][0]
    first, second = run("a", cached=("dense",)), run("b", cached=("dense",))
    assert len(calls) == 1 and "from_cache" not in first and second["from_cache"]
    assert (tmp_path / "b" / "dense-dummy-int8" / "m.bin").read_text() == "1: int8 gated on held out"
    assert second["seconds"] == {"lower": 1.5} and len(list(cache_root().iterdir())) == 1
    assert "| dense | dummy | int8 | ok, from an earlier run |" in exports_section({"dense": [second]})
    gate.write_text("another text")
    assert "from_cache" not in run("c", cached=("dense",)) and len(calls) == 2
    assert "from_cache" not in run("d") and len(calls) == 3 and len(list(cache_root().iterdir())) == 2


def test_timing_section_splits_compress_into_its_stages():
    from foldgpt.pipeline import timing_section

    text = timing_section({"dense_s": 30, "compress_s": 600, "export_s": 300},
                          {"data_s": 120, "fold_s": 180, "local_s": 60, "heal_s": 240})
    lines = text.splitlines()
    assert lines.index("| compress | 10.0 |") < lines.index("| - end-to-end healing | 4.0 |") < lines.index("| exports | 5.0 |")
    assert "| - local healing | 1.0 |" in lines and "| **total** | **15.5** |" in lines
    assert "bench" not in text  # a stage that did not run is not listed
    rerun = timing_section({"dense_s": 30, "compress_s": 600, "bench_s": 300}, {}, earlier=("compress_s",))
    assert "| compress (earlier run) | 10.0 |" in rerun.splitlines() and "| bench | 5.0 |" in rerun.splitlines()


def test_4bit_exports_use_gptq_and_the_held_out_gate(tmp_path, source):
    """The run's 4-bit exports round with gptq on the calibration file and are gated on the
    held-out file (never the same text); the report's export table shows each gate."""
    from foldgpt.pipeline import export_all, exports_section

    calib, held_out = tmp_path / "calib.txt", tmp_path / "held_out.txt"
    calib.write_text("boats and tides and clocks. " * 60)
    held_out.write_text("a different text about gardens and rain. " * 60)
    texts = {"gate_text": str(held_out), "calibration": str(calib)}
    rows = export_all({"folded": source}, (("onnx", "int4"), ("onnx", "fp32")), tmp_path / "exports", 64, texts,
                      weight_method="gptq", max_ppl_ratio=3.0)["folded"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    report = json.loads((tmp_path / "exports" / "folded-onnx-int4" / "export_report.json").read_text())
    assert report["gptq_weights"] == 6 * 7  # every unique decoder weight of the 6-block source
    assert rows[0]["parity"]["details"]["max_ppl_ratio"] == 3.0 and "bound x3" in rows[0]["parity"]["reason"]
    assert rows[1]["parity"]["kind"] == "logits"  # fp32 takes no method and stays gated on logits
    section = exports_section({"folded": rows})
    assert "| folded | onnx | int4 | ok | perplexity " in section and "| folded | onnx | fp32 | ok | max |logits diff|" in section
    int4_line = next(line for line in section.splitlines() if "| int4 |" in line)
    assert rows[0]["seconds"] == report["seconds"] and f"trace {report['seconds']['trace']:g}" in int4_line
