"""ExecuTorch backend on tiny folded models: weights stored once, runner contract, KV-cache decode, gate, bad input.

Lowering is slow (tens of seconds for a 4-depth model), so the two exports (fp32 and
8da4w + 8-bit embedding) are module fixtures every test reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.blocks import count_parameters, share_blocks
from compress.format import save_folded
from export.registry import ExportConfig, Precision, get_backend
from tests.conftest import FAMILIES, reference_greedy, tiny_config, tiny_model, tiny_tokenizer


from export import executorch as et_backend  # noqa: E402
from export.executorch import export_executorch  # noqa: E402
from export.executorch_runtime import PteLM  # noqa: E402
from export.quantize import quantize_shared, unique_weight_bytes  # noqa: E402

CONTEXT = 128


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A 4-depth tiny llama folded to 2 blocks ([0, 0, 1, 1]), tied embedding, with a tokenizer."""
    model = tiny_model("llama")
    share_blocks(model, [0, 0, 1, 1])
    path = save_folded(model, tmp_path_factory.mktemp("model") / "folded", tiny_tokenizer(), provenance={"method": "test"})
    return path, model


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, folded):
    out = tmp_path_factory.mktemp("et_fp32") / "model.pte"
    return out, export_executorch(folded[0], out, ExportConfig(max_context=CONTEXT))


@pytest.fixture(scope="module")
def quant(tmp_path_factory, folded):
    out = tmp_path_factory.mktemp("et_8da4w") / "model.pte"
    cfg = ExportConfig(precision="8da4w", embedding_bits=8, max_context=CONTEXT)
    return out, export_executorch(folded[0], out, cfg, measure=False)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()


def occurrences(blob: bytes, t) -> int:
    return blob.count(t if isinstance(t, bytes) else tensor_bytes(t))


def program_operators(pte: Path) -> set[str]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(pte.read_bytes()).program.execution_plan[0]
    return {op.name for op in plan.operators}


# ----------------------------------------------------------------------------- fp32


def test_registry_finds_the_backend():
    backend = get_backend("executorch")
    assert backend.name == "executorch" and callable(backend.export) and callable(backend.generate)


def test_fp32_export_layout_and_report(fp32, folded):
    out, report = fp32
    assert sorted(f.name for f in out.parent.iterdir()) == ["model.pte", "tokenizer.json"]  # no .ptd, no temp dirs
    assert report["parity"]["passed"] and report["parity"]["details"]["max_abs_diff"] < 1e-3
    assert report["parity"]["details"]["tokens_identical"]
    assert report["unique_weight_bytes"] == count_parameters(folded[1]).unique_bytes
    assert report["bytes"] == {"pte": out.stat().st_size, "ptd": 0, "total": out.stat().st_size}
    layout = report["pte_layout"]
    # weights: within a few hundred bytes of the unique bytes (the rest is rotary inv_freq and alignment)
    assert 0 <= layout["constant_segment"] + layout["named_data"] - report["unique_weight_bytes"] < 1024
    for name in ("weight_cache", "pages_kept", "no_weight_cache"):
        assert report["resident"][name]["after_forward"] > 0
    assert set(report["files"]) == {"pte", "tokenizer"}


def test_each_unique_weight_stored_once(fp32, folded):
    """Every unique Parameter's bytes appear exactly once in the .pte: shared blocks once,
    per-depth norms once each. (fp32 weights are stored as they are, [out, in].)"""
    out, _ = fp32
    blob = out.read_bytes()
    model = folded[1]
    unique = {id(p): (name, p) for name, p in model.named_parameters()}  # named_parameters drops shared duplicates
    counts = {name: occurrences(blob, p) for name, p in unique.values()}
    assert all(c == 1 for c in counts.values()), {n: c for n, c in counts.items() if c != 1}
    assert len(counts) == len(list(model.parameters())) < len(list(model.named_parameters(remove_duplicate=False)))
    assert sum(p.numel() * 4 for _, p in unique.values()) == count_parameters(model).unique_bytes


def test_tied_embedding_stored_once(fp32, folded):
    out, _ = fp32
    model = folded[1]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert occurrences(out.read_bytes(), model.lm_head.weight) == 1
    # the gather and the head (mm over the row-major table) run outside the delegate on that one constant
    ops = program_operators(out)
    assert {"aten::embedding", "aten::mm"} <= ops and "aten::linear" not in ops


def test_runner_metadata_and_forward_signature(fp32):
    out, report = fp32
    lm = PteLM(out)
    expected = {"get_max_seq_len": CONTEXT, "get_max_context_len": CONTEXT, "get_vocab_size": 99, "get_n_layers": 4,
                "get_bos_id": 1, "get_eos_ids": [2], "use_kv_cache": True, "use_sdpa_with_kv_cache": True,
                "enable_dynamic_shape": True}
    assert lm.metadata == expected == report["metadata"]
    meta = lm.module.method_meta("forward")
    assert meta.num_inputs() == 2 and meta.num_outputs() == 1
    assert meta.input_tensor_meta(0).dtype() == meta.input_tensor_meta(1).dtype() == 4  # int64
    assert tuple(meta.output_tensor_meta(0).sizes()) == (1, 99) and meta.output_tensor_meta(0).dtype() == 6  # float32


def test_kv_cache_decode_equals_full_forward(fp32, folded):
    out, _ = fp32
    ids = [5, 17, 23, 42, 8, 9, 61, 33, 12, 3]
    with torch.no_grad():
        reference = folded[1](torch.tensor([ids])).logits[0].numpy()  # no cache: the whole sequence at once
    lm = PteLM(out)
    rows = [lm.prefill(ids[:4])] + [lm.step(t) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(rows), reference[3:], atol=1e-4)
    lm.reset()
    np.testing.assert_allclose(lm.prefill(ids), reference[-1], atol=1e-4)
    lm.reset()
    lm.max_seq_len = 3  # the runner splits a prompt longer than get_max_seq_len into chunks
    np.testing.assert_allclose(lm.prefill(ids), reference[-1], atol=1e-4)
    assert lm.position == len(ids)


def test_generate_streams_the_greedy_tokens_and_stops_on_eos(fp32, folded, capsys):
    from foldgpt.cli import main

    out, _ = fp32
    tok = tiny_tokenizer()
    pieces = []
    tokens = get_backend("executorch").generate(out, "hello", 12, on_token=pieces.append)
    ids = tok("hello").input_ids
    expected = reference_greedy(folded[1], ids, 12, tok.eos_token_id)
    assert tokens == expected and "".join(pieces) == tok.decode(expected, skip_special_tokens=True)
    assert main(["generate", "--backend", "executorch", str(out), "--prompt", "hello", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == "".join(pieces).strip()
    # a token the program lists as EOS ends generation before it is emitted
    k = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), 0)
    lm = PteLM(out, eos_ids=[tokens[k]])
    assert lm.generate(lm.encode("hello"), 12) == tokens[:k]


# ----------------------------------------------------------------------------- quantized


def test_quantized_weights_stored_once(quant, folded):
    """8da4w blocks: each shared weight's packed int4 bytes once. Tied 8-bit head/embedding:
    its int8 rows and scales once across .pte + .ptd, read by XNNPACK and by embedding_byte."""
    out, report = quant
    ptd = out.with_suffix(".ptd")
    assert sorted(f.name for f in out.parent.iterdir()) == ["model.ptd", "model.pte", "tokenizer.json"]
    blob = out.read_bytes() + ptd.read_bytes()
    model = tiny_model("llama")
    share_blocks(model, [0, 0, 1, 1])
    quantize_shared(model, Precision.INT8DA4W, 32, embedding_bits=8)
    head = model.lm_head.weight
    assert model.model.embed_tokens.weight is head
    assert occurrences(blob, head.qdata) == 1 and occurrences(blob, head.scale.reshape(-1)) == 1
    assert "quantized_decomposed::embedding_byte" in program_operators(out)
    blocks = {id(m.weight): m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    assert len(blocks) == 2 * 7  # 2 unique blocks x (q, k, v, o, gate, up, down)
    for w in blocks.values():
        nibbles = (w.qdata.to(torch.int16) + 8).to(torch.uint8).reshape(-1)  # XNNPACK: even element in the low nibble
        assert occurrences(blob, (nibbles[1::2] << 4 | nibbles[::2]).numpy().tobytes()) == 1
    assert report["unique_weight_bytes"] == unique_weight_bytes(folded[1], Precision.INT8DA4W, 32, 8)
    assert report["parity"]["passed"] and report["parity"]["kind"] == "perplexity"
    assert abs(report["parity"]["details"]["ppl_ratio"] - 1) < 0.05


def test_mapped_weight_pages_are_released_after_packing(tmp_path):
    """With +emb8 the head's int8 rows are the gather's table: XNNPACK packs the head from
    the mapped .ptd, after which PteLM gives the pages back and a run reads back only the
    rows it gathers (fresh processes, as the memory probe measures). The vocabulary is
    large enough that the table spans many pages."""
    from export.executorch_runtime import resident_memory

    model = tiny_model("llama", layers=2, hidden=128, vocab=16384)
    path = save_folded(model, tmp_path / "model", tiny_tokenizer(), provenance={"method": "test"})
    out = tmp_path / "out" / "model.pte"
    export_executorch(path, out, ExportConfig(precision="8da4w", embedding_bits=8, max_context=CONTEXT), measure=False)
    table = 16384 * 128  # int8 rows
    kept = resident_memory(out, weight_cache=True, release_pages=False)
    released = resident_memory(out, weight_cache=True)
    assert kept["after_forward_file"] >= table  # packing read the whole table
    assert released["after_forward_file"] < table / 4
    assert released["after_forward"] < kept["after_forward"] - table / 2


def test_unique_weight_bytes_definition(folded):
    model = folded[1]
    params = list({id(p): p for p in model.parameters()}.values())
    head = model.lm_head.weight
    linears = [p for p in params if p.ndim == 2 and p is not head]
    other = sum(p.numel() * 4 for p in params if p.ndim != 2)
    n, k = head.shape
    assert unique_weight_bytes(model) == count_parameters(model).unique_bytes
    assert unique_weight_bytes(model, Precision.INT8) == other + n * k * 4 + sum(p.numel() + 4 * p.shape[0] for p in linears)
    int4 = sum(p.numel() // 2 + 4 * p.numel() // 32 for p in linears)
    assert unique_weight_bytes(model, Precision.INT8DA4W) == other + n * k * 4 + int4
    assert unique_weight_bytes(model, Precision.INT8DA4W, embedding_bits=8) == other + n * k + 4 * n + int4


# ----------------------------------------------------------------------------- gate and bad input


def test_parity_gate_rejects_a_corrupted_export(fp32, folded, tmp_path, monkeypatch):
    """A program whose weights differ slightly from the model's fails the fp32 gate; it
    stays at its temporary path and nothing lands at OUT or beside it."""
    good, _ = fp32
    w = folded[1].model.layers[0].self_attn.q_proj.weight.detach()
    bad = w.clone()
    bad[0] += 0.05  # one row of one shared weight: small, but past the 1e-3 logits bound
    blob = good.read_bytes()
    assert occurrences(blob, w) == 1

    def corrupted_program(stage, stem, external):
        path = stage / f"{stem}.pte"
        path.write_bytes(blob.replace(tensor_bytes(w), tensor_bytes(bad)))
        return {"pte": path}

    from types import SimpleNamespace

    no_plan = SimpleNamespace(executorch_program=SimpleNamespace(execution_plan=[]))
    monkeypatch.setattr(et_backend, "lower", lambda *a, **kw: no_plan)  # skip the slow lowering
    monkeypatch.setattr(et_backend, "write_program", lambda program, stage, stem, external: corrupted_program(stage, stem, external))
    out = tmp_path / "out" / "model.pte"
    with pytest.raises(ValueError, match="parity gate failed") as err:
        export_executorch(folded[0], out, ExportConfig(max_context=CONTEXT), measure=False)
    message = str(err.value)
    assert "\n" not in message and not out.exists() and not (out.parent / "tokenizer.json").exists()
    kept = Path(message.split("export kept at ")[1].split(",")[0])
    assert kept.parent == out.parent and (kept / "model.pte").is_file()
    assert isinstance(err.value, et_backend.GateFailed) and err.value.stage == kept
    assert not err.value.report["parity"]["passed"] and err.value.report["parity"]["details"]["max_abs_diff"] > 1e-3


def test_not_a_model_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out" / "model.pte"
    with pytest.raises(FileNotFoundError, match="no such model"):
        export_executorch(tmp_path / "missing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        export_executorch(tmp_path / "empty", out)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        export_executorch(tmp_path / "broken", out)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bad_config_is_one_error_before_any_work(folded, tmp_path):
    out = tmp_path / "model.pte"
    with pytest.raises(ValueError, match="unknown precision 'int3'; choose one of"):
        ExportConfig(precision="int3")
    with pytest.raises(ValueError, match="executorch backend exports fp32, int8, 8da4w"):
        export_executorch(folded[0], out, ExportConfig(precision="int4"))
    with pytest.raises(ValueError, match="writes a .pte file"):
        export_executorch(folded[0], tmp_path / "model.onnx", ExportConfig())
    with pytest.raises(ValueError, match=r"does not take \+emb4: .* stored twice"):
        export_executorch(folded[0], out, ExportConfig.from_spec("8da4w+emb4"))
    with pytest.raises(ValueError, match=r"max_context 40 is below the parity gate's longest prompt"):
        export_executorch(folded[0], out, ExportConfig(max_context=40))
    with pytest.raises(ValueError, match="lies inside the input"):
        export_executorch(folded[0], folded[0] / "model.pte", ExportConfig())
    assert list(tmp_path.iterdir()) == []


def test_generate_bad_input(fp32, tmp_path):
    out, _ = fp32
    backend = get_backend("executorch")
    with pytest.raises(ValueError, match=f"the prompt is 200 tokens; the program's context is {CONTEXT}"):
        backend.generate(out, "a" * 200, 4)
    with pytest.raises(FileNotFoundError, match="no such .pte"):
        backend.generate(tmp_path / "missing.pte", "hello", 4)
    with pytest.raises(ValueError, match="runs a .pte file"):
        backend.generate(out.parent, "hello", 4)
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program")
    with pytest.raises(ValueError, match="cannot load the program"):
        backend.generate(junk, "hello", 4)


def test_killed_mid_write_keeps_the_previous_export(fp32, folded, tmp_path):
    """kill -9 just before the staged files move beside OUT: the previous export is whole,
    and the rerun completes."""
    import shutil

    from tests.conftest import kill_mid_write

    (tmp_path / "et").mkdir()
    out = shutil.copy(fp32[0], tmp_path / "et" / "model.pte")
    shutil.copy(fp32[0].parent / "tokenizer.json", tmp_path / "et")
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    cfg = f"ExportConfig(parity=False, max_context={CONTEXT})"
    kill_mid_write("from export.executorch import export_executorch\nfrom export.registry import ExportConfig\n"
                   f"export_executorch({str(folded[0])!r}, {str(out)!r}, {cfg}, measure=False)",
                   "export.executorch:sync_files", tmp_path / "ready")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir() if not p.name.startswith(".")} == before
    export_executorch(folded[0], out, ExportConfig(parity=False, max_context=CONTEXT), measure=False)
    assert PteLM(out).steps()([1, 2, 3]).shape[-1] == 99


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from foldgpt.cli import main

    assert main(["export", "executorch", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pte")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldgpt export: error:") and "\n" not in err


def test_softcapping_and_long_sliding_windows_are_rejected():
    from types import SimpleNamespace

    from transformers import Gemma2Config

    gemma2 = SimpleNamespace(config=Gemma2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2))
    with pytest.raises(ValueError, match="soft-capping"):
        et_backend.check_model(gemma2, ExportConfig())
    mistral = SimpleNamespace(config=tiny_config("mistral", sliding_window=64))
    with pytest.raises(ValueError, match="--max-context 64 or less"):
        et_backend.check_model(mistral, ExportConfig(max_context=128))
    et_backend.check_model(mistral, ExportConfig(max_context=64))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_program_matches_transformers(family):
    """torch.export of the static-cache wrapper (before lowering) reproduces each family's
    logits, prefill then decode: the attention hook is family-independent."""
    model = tiny_model(family)
    share_blocks(model, [0, 0, 1, 1])
    ids = [5, 17, 23, 42, 8, 9]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
        program = et_backend.trace(model, 32, 16).module()
        rows = [program(torch.tensor([ids[:4]]), torch.tensor([0]))[0]]
        rows += [program(torch.tensor([[t]]), torch.tensor([4 + i]))[0] for i, t in enumerate(ids[4:])]
    torch.testing.assert_close(torch.stack(rows), reference[3:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_folded_passes_the_gate(default_model, tmp_path):
    """SmolLM2-135M with 14 of 30 blocks removed and the 16 left shared in pairs (8 unique
    blocks; fewer depths keep the lowering to a few minutes here): fp32 .pte within 1.02x
    of the unique weight bytes, greedy tokens and logits equal to PyTorch's."""
    import copy

    from compress.blocks import remove_blocks

    model, tok = default_model
    model = copy.deepcopy(model)  # deepcopy keeps Parameter sharing; the fixture stays dense
    remove_blocks(model, list(range(8, 22)))
    share_blocks(model, [d // 2 for d in range(16)])
    path = save_folded(model, tmp_path / "folded", tok, provenance={"source": "default"})
    out = tmp_path / "et" / "model.pte"
    report = export_executorch(path, out, ExportConfig(max_context=256), measure=False)
    print(json.dumps({k: report[k] for k in ("bytes", "unique_weight_bytes", "ratio", "seconds")}))
    assert report["parity"]["passed"], report["parity"]["reason"]
    assert report["unique_weight_bytes"] == count_parameters(model).unique_bytes
    assert report["ratio"] <= 1.02
    assert out.is_file() and (out.parent / "tokenizer.json").is_file()
    # the app's runtime: ExecuTorch's C++ LLM runner says what eager PyTorch says
    from export.executorch_runtime import PteLM
    from export.llm_runner import RunnerLM
    from tests.conftest import reference_greedy

    prompt = "The capital of France is"
    text, stats = RunnerLM(out).generate(prompt, 16)
    ours = PteLM(out)
    tokens = ours.generate(ours.encode(prompt), 16)
    assert tokens == reference_greedy(model, ours.encode(prompt), 16, tok.eos_token_id) and len(tokens) > 0
    assert text == ours.decode(tokens) and stats["generated_tokens"] == len(tokens)
