"""ONNX backend on tiny folded models: weights stored once, KV-cache decode, quantization, parity gate."""

from __future__ import annotations

import ast
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.blocks import count_parameters, share_blocks
from compress.format import save_folded
from tests.conftest import reference_greedy, tiny_model, tiny_tokenizer
from export import onnx as onnx_backend
from export.onnx import OnnxLM, export_onnx, unique_weight_bytes
from export.parity import compare_greedy, parity_gate, torch_steps
from export.registry import ExportConfig, Precision, get_backend

EXPORT_DIR = Path(onnx_backend.__file__).parent


def folded_tiny(path: Path, family: str = "llama") -> tuple[Path, torch.nn.Module]:
    """A 4-depth tiny model folded to 2 blocks ([0, 0, 1, 1]), tied embedding, with a tokenizer."""
    model = tiny_model(family)
    share_blocks(model, [0, 0, 1, 1])
    return save_folded(model, path, tiny_tokenizer(), provenance={"method": "test"}), model


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    return folded_tiny(tmp_path_factory.mktemp("model") / "folded")


def _export(tmp_path_factory, folded, precision, measure=False):
    out = tmp_path_factory.mktemp(f"onnx_{precision}") / "out"
    report = export_onnx(folded[0], out, ExportConfig(precision=precision), measure=measure)
    return out, report


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, folded):
    return _export(tmp_path_factory, folded, "fp32", measure=True)


@pytest.fixture(scope="module")
def int8(tmp_path_factory, folded):
    return _export(tmp_path_factory, folded, "int8")


@pytest.fixture(scope="module")
def int4(tmp_path_factory, folded):
    return _export(tmp_path_factory, folded, "int4")


def initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx_ir as ir

    return {name: v.const_value.numpy() for name, v in ir.load(path).graph.initializers.items()}


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def holders(model, arrays: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Unique parameter name -> initializers holding its content, as W or as W^T."""
    index = defaultdict(list)
    for name, a in arrays.items():
        index[_key(a)].append(name)
    found = {}
    for pname, p in model.named_parameters():  # each shared Parameter once
        w = p.detach().numpy()
        found[pname] = index.get(_key(w), []) + (index.get(_key(w.T), []) if w.ndim == 2 else [])
    return found


# ----------------------------------------------------------------------------- contracts


def test_export_reads_compress_only_through_format():
    """The folded format is the only bridge for models; compress.registry (the one registry
    helper, no model code) is the other module export/ may import."""
    for file in EXPORT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name == "compress" or name.startswith("compress."):
                    assert name in ("compress.format", "compress.registry"), f"{file.name} imports {name}"


def test_the_onnx_runtime_side_does_not_import_torch():
    """OnnxLM is what an ONNX deployment (and the memory harness) loads: importing torch
    and transformers with it added ~240 MB to every measured ONNX session."""
    import subprocess
    import sys

    code = "import sys, export.onnx; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=EXPORT_DIR.parent)
    assert done.stdout.strip() == "[]"


def test_registry_finds_the_backend():
    backend = get_backend("onnx")
    assert backend.name == "onnx" and callable(backend.export) and callable(backend.generate)


# ----------------------------------------------------------------------------- fp32


def test_fp32_export_layout_and_report(fp32, folded):
    out, report = fp32
    files = {f.name for f in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= files
    assert not [f for f in out.parent.iterdir() if f.name != "out"], "temporary directories left beside OUT"
    assert report["parity"]["passed"] and report["parity"]["details"]["max_abs_diff"] < 1e-3
    assert report["unique_weight_bytes"] == count_parameters(folded[1]).unique_bytes
    assert report["bytes_on_disk"] == sum(f.stat().st_size for f in out.glob("model.onnx*"))
    assert report["ratios"]["ort_optimized"] < 1.6  # tiny model: graph bytes dominate; the bound is checked below
    assert report["session_rss"]["default"]["load"] > 0


def test_initializers_are_the_unique_tensors(fp32, folded):
    out, _ = fp32
    model = folded[1]
    arrays = initializers(out / "model.onnx")
    found = holders(model, arrays)
    assert all(len(names) == 1 for names in found.values()), {k: v for k, v in found.items() if len(v) != 1}
    params = {names[0] for names in found.values()}
    rest = {n: a for n, a in arrays.items() if n not in params}  # rotary inv_freq and scalar constants
    assert all(a.nbytes <= 64 for a in rest.values()), {n: a.shape for n, a in rest.items() if a.nbytes > 64}
    assert len(params) == len(found) == len(list(model.parameters()))
    assert sum(arrays[n].nbytes for n in params) == count_parameters(model).unique_bytes


def test_tied_embedding_stored_once(fp32, folded):
    import onnx_ir as ir

    out, _ = fp32
    model = folded[1]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    arrays = initializers(out / "model.onnx")
    w = model.lm_head.weight.detach().numpy()
    holding = [n for n, a in arrays.items() if a.shape in (w.shape, w.T.shape) and a.size == w.size]
    assert len(holding) == 1 and np.array_equal(arrays[holding[0]], w)  # fp32: rows, read by Gather and the head
    users = {node.op_type for node in ir.load(out / "model.onnx").graph for v in node.inputs if v is not None and v.name == holding[0]}
    assert users == {"MatMul", "Gather"}


def test_graphs_return_the_last_row_as_genai_reads_it(fp32, int8, int4, folded):
    """The head runs on the last position only, and the output says so with a literal 1
    (what ONNX Runtime GenAI needs to take it as last-row only, and greedy tokens equal eager's
    through GenAI in test_onnx_runtime_genai_generates_what_our_runner_does)."""
    import onnx as onnx_proto

    ids = [5, 17, 23, 42, 8, 9]
    for out, _ in (fp32, int8, int4):
        logits = onnx_proto.load(out / "model.onnx", load_external_data=False).graph.output[0]
        dims = logits.type.tensor_type.shape.dim
        assert logits.name == "logits" and len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1
        lm = OnnxLM(out / "model.onnx")
        assert lm.last_row and lm.step(ids).shape == (1, 99)
    with torch.no_grad():
        reference = folded[1](torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(OnnxLM(fp32[0] / "model.onnx").step(ids)[0], reference, atol=1e-4)


def test_attention_rotary_and_norms_are_fused_operators(fp32, int4):
    """Opset 23: each depth's attention is one Attention node (no spelled-out masking), rotary and
    RMSNorm are single nodes too, in the fp32 graph and after int4's rewrites."""
    import onnx as onnx_proto

    for out, _ in (fp32, int4):
        model = onnx_proto.load(out / "model.onnx", load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert {o.domain: o.version for o in model.opset_import}[""] == 23
        assert ops.count("Attention") == 4 and ops.count("RotaryEmbedding") == 2 * 4  # q and k per depth
        assert ops.count("RMSNormalization") == 2 * 4 + 1 and "IsNaN" not in ops and "Softmax" not in ops


def test_kv_cache_decode_equals_full_forward(fp32, folded):
    out, _ = fp32
    model = folded[1]
    ids = [5, 17, 23, 42, 8, 9, 61, 33, 12, 3]
    lm = OnnxLM(out / "model.onnx")
    step = lm.steps()
    incremental = np.concatenate([step(ids[:4])] + [step([t]) for t in ids[4:]])
    full = lm.steps()(ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(incremental, full, atol=1e-5)
    np.testing.assert_allclose(full, reference, atol=1e-4)


def test_genai_config(fp32, folded):
    out, _ = fp32
    cfg = json.loads((out / "genai_config.json").read_text())
    model, dec = cfg["model"], cfg["model"]["decoder"]
    assert (model["vocab_size"], model["eos_token_id"], model["bos_token_id"], model["type"]) == (99, 2, 1, "llama")
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"], dec["hidden_size"]) == (4, 4, 2, 8, 32)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["present_value_names"] == "present.%d.value"
    import onnxruntime as ort

    names = {i.name for i in ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).get_inputs()}
    assert {dec["inputs"]["past_key_names"] % i for i in range(4)} <= names


def test_generate_streams_the_greedy_tokens(fp32, folded, capsys):
    from foldgpt.cli import main

    out, _ = fp32
    model, tok = folded[1], tiny_tokenizer()
    pieces = []
    tokens = get_backend("onnx").generate(out, "hello", 12, on_token=pieces.append)
    ids = tok("hello").input_ids
    expected = reference_greedy(model, ids, 12, tok.eos_token_id)
    assert tokens == expected and "".join(pieces) == tok.decode(expected, skip_special_tokens=True)
    assert main(["generate", "--backend", "onnx", str(out), "--prompt", "hello", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == "".join(pieces).strip()


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_onnx_runtime_genai_generates_what_our_runner_does(precision, fp32, int8, int4):
    """ONNX Runtime GenAI (what ONNX apps ship) reads genai_config.json and the graph: the same greedy
    tokens as `foldgpt generate --backend onnx` on every precision."""
    from export.genai_runner import GenaiLM

    out = {"fp32": fp32, "int8": int8, "int4": int4}[precision][0]
    ids = tiny_tokenizer()("hello").input_ids
    expected = get_backend("onnx").generate(out, "hello", 12)
    tokens, stats = GenaiLM(out).generate(ids, 12)
    assert tokens == expected and len(tokens) > 0
    assert stats["generated_tokens"] == len(tokens) and stats["prefill_s"] > 0


def test_genai_names_a_missing_config(tmp_path):
    from export.genai_runner import GenaiLM

    with pytest.raises(FileNotFoundError, match="genai_config.json: no such file"):
        GenaiLM(tmp_path)


def test_optimum_cli_export_foldgpt_is_foldgpt_export(folded, tmp_path):
    """The Hugging Face convention: `optimum-cli export foldgpt` (registered through optimum's
    command namespace) writes the same artifact, and bad input is one line, exit 2."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "optimum-cli"
    out = tmp_path / "onnx"
    run = subprocess.run([str(exe), "export", "foldgpt", "onnx", str(folded[0]), "--out", str(out), "--no-parity"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".json"))[:2] == ["genai_config.json", "model.onnx"]
    bad = subprocess.run([str(exe), "export", "foldgpt", "tflite", str(folded[0]), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "optimum-cli export foldgpt: error: unknown backend 'tflite'"), bad.stderr


# ----------------------------------------------------------------------------- quantized


def test_int8_shared_weights_quantized_once(int8, folded):
    """8-bit MatMulNBits blocks: each shared weight's bytes once (the tied one read by the head
    and by the embedding's gather), Q8_0's grid (max|w| / 127 per block of 32)."""
    import onnx_ir as ir

    out, report = int8
    model = folded[1]
    graph = ir.load(out / "model.onnx").graph
    nbits = [n for n in graph if n.op_type == "MatMulNBits"]
    assert {n.attributes["bits"].as_int() for n in nbits} == {8}
    matrices = [p for p in {id(p): p for p in model.parameters()}.values() if p.ndim == 2]
    assert len({n.inputs[1].name for n in nbits}) == len(matrices) < len(nbits)
    arrays = initializers(out / "model.onnx")
    assert not [n for n, a in arrays.items() if a.dtype == np.float32 and a.ndim == 2 and a.size >= 32 * 32]
    for n in nbits:
        bq, scales = n.inputs[1].const_value.numpy(), n.inputs[2].const_value.numpy()
        q = bq.astype(np.int16) - 128
        peak = np.abs(q).max(-1)
        assert np.all((peak == 127) | (peak == 0)) and peak.shape == scales.shape  # each block's max at 127 (or all zero)
    assert report["initializers"]["bytes"] - report["unique_weight_bytes"] < 1024
    assert report["unique_weight_bytes"] == unique_weight_bytes(model, Precision.INT8)
    assert report["parity"]["passed"] and report["parity"]["kind"] == "perplexity"
    assert abs(report["parity"]["details"]["ppl_ratio"] - 1) < 0.01


def test_session_releases_the_mapped_weight_pages(tmp_path):
    """Prepacking reads every mapped weight page; OnnxLM gives them back after load and
    the logits do not change (a page read again faults back in from the file). The vocabulary
    is large enough that ORT maps the weights rather than copying them."""
    from export.onnx_graph import model_files
    from export.pages import mapped_resident

    model = tiny_model("llama", layers=2, hidden=128, vocab=16384)
    path = save_folded(model, tmp_path / "model", tiny_tokenizer(), provenance={"method": "test"})
    export_onnx(path, tmp_path / "out", ExportConfig(precision="int4"), measure=False)
    onnx_path = tmp_path / "out" / "model.onnx"
    files = model_files(onnx_path)
    ids = [3, 7, 42, 11]
    kept = OnnxLM(onnx_path, num_threads=1, release_pages=False)
    resident_kept = mapped_resident(files)
    assert resident_kept > 512 * 1024  # the 4-bit embedding (~1.1 MB) was read by prepacking
    logits = kept.step(ids)
    del kept  # the kernel only reclaims pages that one mapping holds
    released = OnnxLM(onnx_path, num_threads=1)
    assert mapped_resident(files) < resident_kept / 4
    np.testing.assert_array_equal(released.step(ids), logits)
    assert mapped_resident(files) < resident_kept / 2  # a run reads back the rows it gathers, not the table


def test_int4_shared_weights_quantized_once(int4, folded):
    import onnx_ir as ir

    out, report = int4
    model = folded[1]
    graph = ir.load(out / "model.onnx").graph
    nbits = [n for n in graph if n.op_type == "MatMulNBits"]
    weights = {n.inputs[1].name for n in nbits}
    matrices = [p for p in {id(p): p for p in model.parameters()}.values() if p.ndim == 2]
    assert len(weights) == len(matrices) < len(nbits)  # shared blocks: two MatMulNBits read one 4-bit tensor
    arrays = initializers(out / "model.onnx")
    assert not [n for n, a in arrays.items() if a.dtype == np.float32 and a.ndim == 2 and a.size >= 32 * 32]
    assert report["initializers"]["bytes"] - report["unique_weight_bytes"] < 1024
    assert report["parity"]["passed"] and abs(report["parity"]["details"]["ppl_ratio"] - 1) < 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_reads_the_head_weight(bits, int4, int8, folded, tmp_path):
    """The embedding rows the graph computes equal an independent dequantization of the
    head's MatMulNBits tensor (4 bits: low nibble first, zero point 8; 8 bits: zero point 128),
    which is the fp32 embedding to within one quantization step."""
    import onnx_ir as ir
    import onnxruntime as ort

    out, _ = {4: int4, 8: int8}[bits]
    w = folded[1].model.embed_tokens.weight.detach().numpy()  # (V, H)
    model = ir.load(out / "model.onnx")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["N"].as_int() == w.shape[0])
    bq, scales = head.inputs[1].const_value.numpy(), head.inputs[2].const_value.numpy()  # (V, nb, 32 bits / 8) u8, (V, nb)
    assert {u.node.op_type for u in head.inputs[1].uses()} == {"MatMulNBits", "Gather"}
    if bits == 4:
        q = np.stack([bq & 15, bq >> 4], -1).reshape(w.shape[0], bq.shape[1], -1).astype(np.float32) - 8
    else:
        q = bq.astype(np.float32) - 128
    deq = (q * scales[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]
    step = np.repeat(np.abs(scales), 32, axis=1)[:, : w.shape[1]]  # ORT's symmetric scales may be negative
    assert np.all(np.abs(deq - w) <= step + 1e-6)  # within one step (the range end is clipped to 7)
    assert np.abs(deq - w).mean() < 0.3 * step.mean()
    # expose the embedding rows the rewritten graph computes
    rows = next(v for n in model.graph for v in n.outputs if v.name == "tied_embed.rows")
    model.graph.outputs.append(rows)
    ir.save(model, tmp_path / "probe.onnx", external_data="probe.onnx.data")
    sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 7, 98, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    feeds.update({i.name: np.zeros((1, 2, 0, 8), np.float32) for i in sess.get_inputs() if i.name.startswith("past")})
    got = sess.run(["tied_embed.rows"], feeds)[0]
    np.testing.assert_allclose(got[0], deq[ids[0]], atol=1e-6)


def test_int4_is_executorchs_grid_with_int8_compute(int4, folded):
    """Every MatMulNBits holds exactly torchao's 4-bit values and scales for its weight, the
    ones ExecuTorch's 8da4w quantize_shared stores: one grid for both backends."""
    import copy

    import onnx_ir as ir

    from export.quantize import int4_weights, quantize_shared

    out, report = int4
    nbits = {}
    for n in ir.load(out / "model.onnx").graph:
        if n.op_type == "MatMulNBits":
            assert n.attributes["accuracy_level"].as_int() == 4
            bq, scales = n.inputs[1].const_value.numpy(), n.inputs[2].const_value.numpy()
            nib = np.stack([bq & 15, bq >> 4], -1).reshape(bq.shape[0], bq.shape[1], -1).astype(np.float32) - 8
            nbits[n.inputs[1].name] = (nib * scales[..., None]).reshape(bq.shape[0], -1)
    et = quantize_shared(copy.deepcopy(folded[1]), Precision.INT8DA4W, 32, embedding_bits=None)
    et_linears = {id(m): m for m in et.modules() if isinstance(m, torch.nn.Linear)}
    for name, module in folded[1].named_modules():
        if isinstance(module, torch.nn.Linear):
            q, s = int4_weights(module.weight, 32)
            mine = (q.float().reshape(q.shape[0], -1, 32) * s[..., None]).reshape(q.shape).numpy()
            assert any(d.shape == mine.shape and np.array_equal(d, mine) for d in nbits.values()), name
            if name != "lm_head":  # the head stays fp32 in ExecuTorch without embedding_bits
                et_w = et.get_submodule(name).weight.dequantize().detach().numpy()
                np.testing.assert_allclose(et_w, mine, rtol=0, atol=1e-7)
    assert report["graph_passes"]["int4_weights"].startswith(f"{len(nbits)} on torchao's rtn grid")
    assert len(et_linears) > 0


def test_hqq_scales_lower_the_output_error(folded):
    """The quality-aware method against naive rounding, on a fixed batch: logits error of the
    model whose every Linear holds its dequantized 4-bit weight."""
    import copy

    from export.quantize import int4_weights

    model = folded[1]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        errors = {}
        for method in ("rtn", "hqq"):
            m = copy.deepcopy(model)
            for module in {id(x.weight): x for x in m.modules() if isinstance(x, torch.nn.Linear)}.values():
                q, s = int4_weights(module.weight, 32, method)
                module.weight.copy_((q.float().reshape(q.shape[0], -1, 32) * s[..., None]).reshape(q.shape))
            errors[method] = (m(ids).logits - ref).pow(2).mean().item()
    assert 0 < errors["hqq"] < errors["rtn"]
    # ExecuTorch's quantize_shared takes the same method and stores the same weights
    from export.quantize import quantize_shared

    et = quantize_shared(copy.deepcopy(model), Precision.INT8DA4W, 32, method="hqq")
    q, s = int4_weights(model.model.layers[0].mlp.down_proj.weight, 32, "hqq")
    torch.testing.assert_close(et.model.layers[0].mlp.down_proj.weight.dequantize(),
                               (q.float().reshape(q.shape[0], -1, 32) * s[..., None]).reshape(q.shape), rtol=0, atol=1e-7)


def test_weight_method_bad_input_is_one_line(folded, tmp_path):
    with pytest.raises(ValueError, match="unknown weight method 'awq'; choose one of rtn, hqq, gptq"):
        ExportConfig(precision="int4", weight_method="awq")
    with pytest.raises(ValueError, match="weight_method gptq rounds against calibration text: pass calibration"):
        ExportConfig(precision="int4", weight_method="gptq")
    text = tmp_path / "calib.txt"
    text.write_text("some text")
    with pytest.raises(ValueError, match="calibration and gate_text are the same file"):
        ExportConfig(precision="int4", weight_method="gptq", calibration=str(text), gate_text=str(text))
    with pytest.raises(ValueError, match="weight_method hqq applies to 4-bit weights \\(int4, 8da4w\\), not int8"):
        ExportConfig(precision="int8", weight_method="hqq")
    with pytest.raises(ValueError, match="onnx int4 needs input widths divisible by group_size 128; a Linear has 32"):
        export_onnx(folded[0], tmp_path / "out", ExportConfig(precision="int4", group_size=128))
    assert not (tmp_path / "out").exists()


def test_unique_weight_bytes_definition(folded):
    model = folded[1]
    matrices = [p for p in {id(p): p for p in model.parameters()}.values() if p.ndim == 2]
    other = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values() if p.ndim != 2)
    assert unique_weight_bytes(model, Precision.INT8) == other + sum(p.numel() + p.numel() // 32 * 4 for p in matrices)
    assert unique_weight_bytes(model, Precision.INT4) == other + sum(p.numel() // 2 + p.numel() // 32 * 4 for p in matrices)


# ----------------------------------------------------------------------------- gate and bad input


def test_parity_gate_rejects_a_corrupted_export(folded, tmp_path, monkeypatch):
    import onnx_ir as ir

    trace = onnx_backend.trace

    def corrupted_trace(model, path, **kw):
        stats = trace(model, path, **kw)
        m = ir.load(path)
        name, value = max(m.graph.initializers.items(), key=lambda kv: kv[1].const_value.size)
        arr = value.const_value.numpy().copy()
        arr[0] += 0.05  # one row of one weight: small, but more than the 1e-3 logits bound
        value.const_value = ir.tensor(arr, name=name)
        from export.onnx_graph import save

        save(m, path.with_name("corrupt.onnx"))
        for f in ("model.onnx", "model.onnx.data"):
            (path.parent / f).unlink()
        save(ir.load(path.with_name("corrupt.onnx")), path)
        return stats

    monkeypatch.setattr(onnx_backend, "trace", corrupted_trace)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="parity gate failed") as err:
        export_onnx(folded[0], out, ExportConfig(), measure=False)
    message = str(err.value)
    assert "\n" not in message and not out.exists()
    kept = Path(message.split("export kept at ")[1].split(",")[0])
    assert kept.parent == tmp_path and (kept / "model.onnx").is_file()


def test_parity_gate_functions_compare_step_factories(folded):
    model = folded[1]
    ref = torch_steps(model)
    same = compare_greedy(ref, ref, [5, 6, 7], new_tokens=4)
    assert same["tokens_identical"] and same["max_abs_diff"] == 0.0

    def noisy():
        step = ref()
        return lambda ids: step(ids) + 0.01

    gate = parity_gate(ref, noisy, [[5, 6, 7]], new_tokens=4)
    assert not gate.passed and "max |logits diff|" in gate.reason


def test_not_a_model_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for src, err in ((tmp_path / "missing", FileNotFoundError), (tmp_path / "empty", FileNotFoundError)):
        with pytest.raises(err) as e:
            export_onnx(src, tmp_path / "out", ExportConfig())
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_out_inside_model_dir_is_rejected(folded):
    with pytest.raises(ValueError, match="lies inside the input"):
        export_onnx(folded[0], folded[0] / "onnx", ExportConfig())
    assert not (folded[0] / "onnx").exists()


def test_unsupported_precision_and_embedding_bits(folded, tmp_path):
    with pytest.raises(ValueError, match="onnx backend exports fp32, int8, int4, not 8da4w"):
        export_onnx(folded[0], tmp_path / "out", ExportConfig(precision="8da4w"))
    with pytest.raises(ValueError, match="embedding_bits=4 is not supported"):
        export_onnx(folded[0], tmp_path / "out", ExportConfig(precision="int8", embedding_bits=4))
    assert not (tmp_path / "out").exists()


def test_int4_with_an_8bit_head(folded, tmp_path):
    """int4+emb8: decoder weights 4-bit, the tied head 8-bit (Q8_0's grid), and the embedding
    gathers the head's 8-bit rows: stored once, within one 8-bit step of fp32."""
    import onnx_ir as ir

    model = folded[1]
    report = export_onnx(folded[0], tmp_path / "out", ExportConfig.from_spec("int4+emb8"), measure=False)
    graph = ir.load(tmp_path / "out" / "model.onnx").graph
    vocab = model.model.embed_tokens.weight.shape[0]
    bits = {n.attributes["N"].as_int() == vocab: n.attributes["bits"].as_int() for n in graph if n.op_type == "MatMulNBits"}
    assert bits == {True: 8, False: 4}
    head = next(n for n in graph if n.op_type == "MatMulNBits" and n.attributes["N"].as_int() == vocab)
    assert {u.node.op_type for u in head.inputs[1].uses()} == {"MatMulNBits", "Gather"}
    assert report["graph_passes"]["tied_embedding_int4"] == 1
    assert report["unique_weight_bytes"] == unique_weight_bytes(model, Precision.INT4, 32, 8)
    hidden = model.model.embed_tokens.weight.shape[1]  # 8 bits: 16 more bytes a block of 32
    assert unique_weight_bytes(model, Precision.INT4, 32, 8) - unique_weight_bytes(model, Precision.INT4) == vocab * hidden // 32 * 16
    assert report["initializers"]["bytes"] - report["unique_weight_bytes"] < 1024
    assert report["parity"]["passed"]


@torch.library.custom_op("foldgpt_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_op_is_one_line_and_writes_nothing(folded, tmp_path, monkeypatch):
    load = onnx_backend.load_model

    def load_with_mystery_op(model_dir):
        model, tok = load(model_dir)
        norm = model.model.norm
        forward = norm.forward
        norm.forward = lambda h: torch.ops.foldgpt_test.mystery(forward(h))
        return model, tok

    monkeypatch.setattr(onnx_backend, "load_model", load_with_mystery_op)
    with pytest.raises(ValueError, match="cannot export llama to ONNX") as err:
        export_onnx(folded[0], tmp_path / "out", ExportConfig(), measure=False)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_killed_mid_write_keeps_the_previous_export(fp32, folded, tmp_path):
    """kill -9 with the new export staged: the previous one is whole, and the rerun completes."""
    import shutil

    from tests.conftest import kill_mid_write

    out = shutil.copytree(fp32[0], tmp_path / "onnx")
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    kill_mid_write("from export.onnx import export_onnx\nfrom export.registry import ExportConfig\n"
                   f"export_onnx({str(folded[0])!r}, {str(out)!r}, ExportConfig(parity=False), measure=False)",
                   "compress.outputs:sync_files", tmp_path / "ready")
    assert files() == before
    export_onnx(folded[0], out, ExportConfig(parity=False), measure=False)
    assert OnnxLM(out / "model.onnx").step([1, 2, 3]).shape[-1] == 99


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from foldgpt.cli import main

    assert main(["export", "onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldgpt export: error:") and "\n" not in err
    assert main(["generate", "--backend", "onnx", str(tmp_path), "--prompt", "x"]) == 2
    capsys.readouterr()
    for flags, message in ((["--precision", "int4+emb8", "--max-ppl-ratio", "0.5"], "must be at least 1, got 0.5"),
                           (["--precision", "int4", "--weight-method", "awq"], "unknown weight method 'awq'"),
                           (["--precision", "int4", "--weight-method", "gptq"], "pass calibration")):
        assert main(["export", "onnx", str(tmp_path), "--out", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_default_model_folded_passes_the_gate(default_model, tmp_path):
    import copy

    from compress.blocks import remove_blocks

    model, tok = default_model
    model = copy.deepcopy(model)
    remove_blocks(model, list(range(20, 26)))
    share_blocks(model, [d // 2 for d in range(24)])
    path = save_folded(model, tmp_path / "folded", tok, provenance={"source": "default"})
    out = tmp_path / "onnx"
    report = export_onnx(path, out, ExportConfig(), measure=False)
    assert report["parity"]["passed"], report["parity"]["reason"]
    assert report["parity"]["details"]["tokens_identical"]
    disk = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    assert report["unique_weight_bytes"] == count_parameters(model).unique_bytes
    assert disk <= 1.02 * report["unique_weight_bytes"]
    assert report["initializers"]["bytes"] <= 1.001 * report["unique_weight_bytes"]
    # the app's runtime: ONNX Runtime GenAI generates eager PyTorch's greedy tokens
    from export.genai_runner import GenaiLM

    ids = tok("The capital of France is").input_ids
    tokens, stats = GenaiLM(out).generate(ids, 16)
    assert tokens == reference_greedy(model, ids, 16, tok.eos_token_id) and len(tokens) > 0
    assert tokens == get_backend("onnx").generate(out, "The capital of France is", 16)


def test_quantized_gate_bounds_by_weight_bits_and_refuses_above_them(folded, tmp_path):
    """Default bounds x1.02 (8-bit) and x1.10 (4-bit); an export above its bound is refused,
    kept at its temporary path, and nothing lands at OUT. A bound below 1 is one line."""
    assert ExportConfig(precision="int8").ppl_bound() == 1.02 and ExportConfig(precision="int4").ppl_bound() == 1.10
    assert ExportConfig(precision="8da4w", embedding_bits=8).ppl_bound() == 1.10
    assert ExportConfig(precision="fp32", embedding_bits=8).ppl_bound() == 1.02
    assert ExportConfig().ppl_bound() is None and ExportConfig(precision="int4", max_ppl_ratio=1.3).ppl_bound() == 1.3
    with pytest.raises(ValueError, match="max_ppl_ratio bounds quantized / fp32 perplexity and must be at least 1, got 0.9"):
        ExportConfig(precision="int4", max_ppl_ratio=0.9)
    with pytest.raises(ValueError, match="gate_text .*nope.txt: no such file"):
        ExportConfig(precision="int4", gate_text=str(tmp_path / "nope.txt"))
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    cfg = ExportConfig(precision="int4", max_ppl_ratio=1.0, gate_text=str(text), gate_tokens=300)
    with pytest.raises(ValueError, match="parity gate failed: perplexity .* bound x1\\) on 300 tokens") as err:
        export_onnx(folded[0], out, cfg, measure=False)  # 4-bit rounding costs something: above x1.0
    assert "\n" not in str(err.value) and not out.exists()
    assert err.value.report["parity"]["details"]["ppl_ratio"] > 1.0


def test_text_windows_split_held_out_text():
    from export.parity import text_windows, perplexity, ppl_ids

    tok = tiny_tokenizer()
    ids = ppl_ids(tok, 99, 100)
    assert len(ids) == 100  # the built-in prose is longer than that
    windows = text_windows(tok, 99, None, tokens=100, window=40)
    assert windows == [ids[:40], ids[40:80], ids[80:]]
    assert text_windows(tok, 99, None, tokens=90, window=40) == [ids[:40], ids[40:80]]  # a 10-token tail is dropped
    rng = np.random.default_rng(0)
    table = rng.normal(size=(99, 99)).astype(np.float32)

    def factory():
        return lambda ids: table[np.asarray(ids)]  # a bigram model: each window's NLL is the same pooled or split

    flat = [t for w in windows for t in w]
    pooled = perplexity(factory, windows)
    assert np.isclose(np.log(pooled) * (len(flat) - len(windows)),
                      sum(np.log(perplexity(factory, w)) * (len(w) - 1) for w in windows))
