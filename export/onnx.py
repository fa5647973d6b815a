"""ONNX backend: folded model directory -> ONNX Runtime folder, each shared weight stored once.

    foldgpt export onnx runs/folded --out runs/onnx [--precision fp32|int8|int4]
    foldgpt generate --backend onnx runs/onnx --prompt "The capital of France is"

Stages of `export_onnx` (each a function below):
  1. load      `compress.format.load_folded`, as fp32
  2. trace     torch.onnx (dynamo) of `FlatKVCausalLM`: one graph for prefill and decode,
               inputs  input_ids (B, S), attention_mask (B, P+S), position_ids (B, S),
                       past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) per depth
               outputs logits (B, S, V), present.{i}.key / .value (B, kv_heads, P+S, head_dim)
               then `onnx_graph.pretranspose_weights`, the onnxscript optimizer, no metadata
  3. quantize  int8 or int4: MatMulNBits (symmetric blocks of `group_size`, int8 compute); int4 on
               the 4-bit grid ExecuTorch's 8da4w gets, a source GGUF's grid kept exactly
               (`export.quantize.prepare_weights`; smoothing too, `export.smooth`), each weight once (`onnx_graph.quantize_nbits`)
  4. package   genai_config.json and the tokenizer files beside model.onnx
  5. gate      `export.parity` against the PyTorch model (fp32: logits + greedy tokens,
               quantized: perplexity); a failed gate leaves the export at its temporary path
  6. measure   bytes on disk, bytes of ORT's optimized model, session RSS in a fresh process,
               each over the unique weight bytes
  7. commit    rename the temporary directory beside OUT to OUT

Raises FileNotFoundError / ValueError (one line) for a path that is not a model, an OUT
inside the model directory, a model the exporter cannot convert, or a failed gate.

Memory with ONNX Runtime's default options (prepacking on): fp32 stores the tied
embedding as rows that the head reads as MatMul's A input, which ORT does not prepack,
so the session holds that weight once (the mapped file pages). int8's and int4's head
(MatMulNBits) is prepacked from the mapped quantized rows the embedding also gathers,
and prepacking reads every weight page: `OnnxLM` then releases the mapped
pages (`export.pages`), so only the rows a run gathers come back. Without the release
the tied weight was resident twice (about +18-21% on SmolLM2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export import onnx_graph
from export.genai_runner import GENAI_CONFIG  # the file the runtime reads names itself there
from export.pages import mapped_resident, release_mapped_pages
from export.parity import GateFailed, record_gate
from export.registry import ExportConfig, Precision, WeightMethod, check_paths, load_model, register_backend

MODEL_FILE = "model.onnx"
# ONNX opset 23 has Attention, RotaryEmbedding and RMSNormalization, which torch.onnx emits for
# SDPA, rotary and RMSNorm; ONNX Runtime runs each as one fused kernel where opset 18 spelled them
# out in dozens of nodes (attention's masking alone was ~23% of a 512-token int4 prefill,
# benchmarks/results/prefill_profile.md). Before/after: benchmarks/results/onnx_opset.md.
OPSET = 23
INSTALL_HINT = "pip install 'onnx>=1.23,<1.24' 'onnxruntime>=1.32,<1.33' 'onnxscript>=0.7,<0.8'"


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the onnx backend needs {e.name}: {INSTALL_HINT}") from None


def export_onnx(model_dir, out, cfg: ExportConfig | None = None, measure: bool = True) -> dict:
    """Export the folded (or dense) model at `model_dir` to the directory `out`; returns the report."""
    cfg = cfg or ExportConfig()
    model_dir, out = Path(model_dir), Path(out)
    from compress.format import Kind  # here: the runtime half (OnnxLM) must not import torch

    out = check_paths(model_dir, out, Kind.ONNX, cfg.overwrite)
    BACKEND.check(cfg)
    bits = {Precision.INT8: 8, Precision.INT4: 4}.get(cfg.precision)
    if cfg.embedding_bits not in (None, bits) and (bits, cfg.embedding_bits) != (4, 8):
        raise ValueError(f"onnx: the tied embedding is quantized with the head ({cfg.precision.value}, or 8 bits "
                         f"beside int4: int4+emb8); embedding_bits={cfg.embedding_bits} is not supported")
    if bits is not None and cfg.group_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"onnx int{bits}: group_size must be a power of two from 16 to 256, got {cfg.group_size}")
    require_onnx()
    model, tokenizer = load_model(model_dir)
    if bits is not None:
        import torch

        from export.quantize import check_group_widths, prepare_weights  # torch: the exporter's half only

        check_group_widths([m for m in model.modules() if isinstance(m, torch.nn.Linear)], cfg.group_size, f"onnx int{bits}")
        prepared = prepare_weights(model, tokenizer, cfg)  # smoothing; source grid kept exactly; gptq
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    report = {"backend": "onnx", "precision": cfg.precision.value, "model_dir": str(model_dir), "seconds": {}}
    if bits is not None:
        report.update(prepared)
    clock = time.perf_counter()
    try:
        path = stage / MODEL_FILE
        fp32_path = path if bits is None else stage / ".fp32" / MODEL_FILE
        report["graph_passes"] = trace(model, fp32_path, tied_head_rows=bits is None)
        report["seconds"]["trace"] = round(time.perf_counter() - clock, 1)
        if bits is not None:
            report["graph_passes"].update(quantize(fp32_path, path, cfg.precision, cfg.group_size, cfg.weight_method,
                                                   cfg.embedding_bits))
            shutil.rmtree(fp32_path.parent)
        package(stage, model.config, tokenizer, cfg)
        report["seconds"]["quantize_package"] = round(time.perf_counter() - clock - report["seconds"]["trace"], 1)
        report["unique_weight_bytes"] = unique_weight_bytes(model, cfg.precision, cfg.group_size, cfg.embedding_bits)
        report["initializers"] = onnx_graph.initializer_stats(path)
        if cfg.parity:
            clock = time.perf_counter()
            gate = run_gate(model, tokenizer, path, cfg)
            record_gate(gate, report, time.perf_counter() - clock, stage, out)
        if measure:
            clock = time.perf_counter()
            from compress.format import sync_files  # here: the runtime half (OnnxLM) must not import torch

            sync_files(stage)  # pages still waiting for writeback cannot be released (export.pages)
            report.update(measure_sizes(path, report["unique_weight_bytes"]))
            report["seconds"]["measure"] = round(time.perf_counter() - clock, 1)
        commit(stage, out, cfg.overwrite)
    except BaseException as e:
        if not isinstance(e, GateFailed):  # a rejected export is left for inspection; the error says where
            shutil.rmtree(stage, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report


# ----------------------------------------------------------------------------- 1. load


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of the decoder's KV cache."""
    c = config.get_text_config(decoder=True)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, kv_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


# ----------------------------------------------------------------------------- 2. trace


def _flat_kv_module(model):
    import torch
    from transformers import DynamicCache

    class FlatKVCausalLM(torch.nn.Module):
        """(input_ids, attention_mask, position_ids, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...):
        the explicit past/present tensors ONNX Runtime GenAI and optimum use. Logits of the
        last position only (batch, 1, vocab), as a runner needs: a prefill runs the head
        once, not once per prompt token. ONNX Runtime GenAI reads such a graph as "pruned"
        when the output's second dimension is a literal 1 (`last_row_logits`)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    return FlatKVCausalLM().eval()


def trace(model, path: Path, tied_head_rows: bool = True) -> dict:
    """Export `model` to `path` (+ path.data). Raises ValueError if the exporter cannot convert it.
    `tied_head_rows`: see `onnx_graph.pretranspose_weights` (fp32 only)."""
    import torch
    import onnx_ir.passes.common as common

    num_layers, kv_heads, head_dim = kv_shape(model.config)
    inputs, outputs = io_names(num_layers)
    batch, seq, past = 2, 3, 4  # example sizes; 0 and 1 would be specialised by torch.export
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(0, model.config.vocab_size, (batch, seq), generator=g),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(),
            *[torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2 * num_layers)])
    B, S = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=65536)
    P, T = torch.export.Dim("past_sequence", max=65536), torch.export.Dim("total_sequence", max=131072)
    # The *past varargs are ONE entry of dynamic_shapes: a tuple with a spec per tensor.
    dynamic_shapes = ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in range(2 * num_layers)))
    try:
        with torch.no_grad():
            program = torch.onnx.export(_flat_kv_module(model), args, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic_shapes, dynamo=True, optimize=False, opset_version=OPSET,
                                        external_data=True, verbose=False, report=False)
    except Exception as e:  # torch.onnx wraps the cause in pages of advice: report the innermost error
        while e.__cause__ is not None:
            e = e.__cause__
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = re.sub(r"\x1b\[[0-9;]*m", "", first).strip()
        raise ValueError(f"cannot export {model.config.model_type} to ONNX: {first[:300]}") from None
    stats = onnx_graph.pretranspose_weights(program.model, tied_head_rows)
    program.optimize()  # onnxscript: constant folding, CSE; after pretranspose (see onnx_graph)
    onnx_graph.last_row_logits(program.model)
    common.ClearMetadataAndDocStringPass()(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_graph.save(program.model, path)
    return {"pretransposed": stats["linear"], "tied_embedding": stats["tied"]}


# ----------------------------------------------------------------------------- 3. quantize


def quantize(src: Path, dst: Path, precision: Precision, group_size: int = 32,
             method: WeightMethod = WeightMethod.RTN, embedding_bits: int | None = None) -> dict:
    bits = {Precision.INT8: 8, Precision.INT4: 4}[precision]
    stats = onnx_graph.quantize_nbits(src, dst, bits, block_size=group_size, method=WeightMethod(method).value,
                                      head_bits=embedding_bits)
    grid = f"torchao's {WeightMethod(method).value} grid" if bits == 4 else "max|w| / 127 per block (Q8_0's grid)"
    return {f"int{bits}_weights": f"{stats['grid']} on {grid}", f"tied_embedding_int{bits}": stats["tied"]}


def unique_weight_bytes(model, precision: Precision = Precision.FP32, group_size: int = 32,
                        embedding_bits: int | None = None) -> int:
    """Bytes of every unique parameter stored once at the export precision: the bound.

    Each nn.Parameter counts once (by identity: shared blocks and a tied embedding once).
    fp32: 4 bytes an element. int8 / int4: a Linear weight (out N, in K) is N * ceil(K / group)
    blocks of group (int8) or group/2 (int4) bytes plus one fp32 scale each; an untied input
    embedding stays fp32. Everything else (norms, biases, a source grid's block sums and
    offsets: `export.grid`) stays fp32.
    """
    import torch

    from export.grid import aux_weights

    aux = aux_weights(model)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) not in aux}
    block_bytes = {Precision.INT8: group_size + 4, Precision.INT4: group_size // 2 + 4}.get(Precision(precision))
    head = model.get_output_embeddings()
    head_bytes = group_size + 4 if embedding_bits == 8 and block_bytes else block_bytes  # int4+emb8: an 8-bit head
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if block_bytes and p.ndim == 2 and id(p) in linear:
            n, k = p.shape
            total += n * -(-k // group_size) * (head_bytes if head is not None and p is head.weight else block_bytes)
        else:
            total += p.numel() * 4
    return total


# ----------------------------------------------------------------------------- 4. package


def package(stage: Path, config, tokenizer, cfg: ExportConfig) -> None:
    """genai_config.json (ONNX Runtime GenAI schema) and the tokenizer files beside model.onnx."""
    num_layers, kv_heads, head_dim = kv_shape(config)
    text = config.get_text_config(decoder=True)
    eos = text.eos_token_id
    pad = text.pad_token_id if text.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    genai = {
        "model": {
            "bos_token_id": text.bos_token_id, "eos_token_id": eos, "pad_token_id": pad,
            "context_length": text.max_position_embeddings, "vocab_size": text.vocab_size, "type": config.model_type,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": head_dim, "hidden_size": text.hidden_size,
                "num_attention_heads": text.num_attention_heads, "num_key_value_heads": kv_heads,
                "num_hidden_layers": num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": min(cfg.max_context, text.max_position_embeddings), "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }
    (stage / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(stage)


# ----------------------------------------------------------------------------- 5. gate and decode


class OnnxLM:
    """One ONNX Runtime session and the KV cache of one sequence (batch 1).

    The reference decode loop: `step(ids)` appends tokens and returns the logits the graph
    gives, the last position's (1, vocab) for this exporter's graphs (every position's for
    graphs exported before it); `steps()` is a fresh-sequence factory for `export.parity`
    that gives every fed token's logits either way.
    """

    def __init__(self, path, num_threads: int | None = None, prepack: bool = True, release_pages: bool = True):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options(num_threads, prepack),
                                            providers=["CPUExecutionProvider"])
        if release_pages:  # prepacking has read the mapped weights; keep only the pages still used
            release_mapped_pages(onnx_graph.model_files(Path(path)))
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = ["present." + n.removeprefix("past_key_values.") for n in self.past_names]
        shape = next(i.shape for i in self.session.get_inputs() if i.name == self.past_names[0])  # (B, kv_heads, P, head_dim)
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.last_row = self.session.get_outputs()[0].shape[1] == 1
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        self.past = {n: empty for n in self.past_names}
        self.length = 0

    def step(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, self.length + n), np.int64),
                "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None], **self.past}
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        self.past = dict(zip(self.past_names, present))
        self.length += n
        return logits[0]

    def steps(self):
        """Every fed token's logits. With a last-row graph a multi-token call feeds all but
        its last token one at a time (the decode path gives the earlier rows), then prefills
        the whole call from its start (the prefill path: the last row and the cache the
        next calls read), as export.executorch_runtime.PteLM.steps does."""
        self.reset()
        if not self.last_row:
            return self.step

        def step(ids) -> np.ndarray:
            ids = [int(t) for t in np.asarray(ids).reshape(-1)]
            past, length = self.past, self.length
            rows = [self.step([t])[-1] for t in ids[:-1]]
            self.past, self.length = past, length
            rows.append(self.step(ids)[-1])
            return np.stack(rows)

        return step


def session_options(num_threads: int | None = None, prepack: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if num_threads:
        so.intra_op_num_threads = num_threads
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def run_gate(model, tokenizer, path: Path, cfg: ExportConfig):
    from export.parity import text_windows, parity_gate, prompts, torch_steps

    vocab, bound = model.config.vocab_size, cfg.ppl_bound()
    lm = OnnxLM(path, cfg.num_threads or 1)  # one thread: the gate's steps are small (see torch_steps)
    text = text_windows(tokenizer, vocab, cfg.gate_text, cfg.gate_tokens) if bound else None
    return parity_gate(torch_steps(model, cfg.num_threads or 1), lm.steps, prompts(tokenizer, vocab), quantized=bound is not None,
                       text_ids=text, max_ppl_ratio=bound or 1.0)


def generate(artifact, prompt: str, max_new_tokens: int, on_token=None) -> list[int]:
    """Greedy decode with the KV cache; `on_token(text)` receives each new piece of text."""
    from transformers import AutoTokenizer

    artifact = Path(artifact)
    if not (artifact / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{artifact}: no {MODEL_FILE} (not an ONNX export)")
    if not (artifact / "tokenizer_config.json").is_file() and not (artifact / "tokenizer.json").is_file():
        raise ValueError(f"{artifact}: no tokenizer files beside {MODEL_FILE}; export from a model directory that has them")
    require_onnx()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    genai = json.loads((artifact / GENAI_CONFIG).read_text())["model"] if (artifact / GENAI_CONFIG).is_file() else {}
    eos = genai.get("eos_token_id", tokenizer.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = list(tokenizer(prompt).input_ids)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    lm = OnnxLM(artifact / MODEL_FILE)
    logits, new, shown = lm.step(ids), [], ""
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        if token in eos:
            break
        new.append(token)
        if on_token is not None:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_token(text[len(shown):])
                shown = text
        logits = lm.step([token])
    return new


# ----------------------------------------------------------------------------- 6. measure


def measure_sizes(path: Path, unique_bytes: int) -> dict:
    """Bytes on disk, bytes of ORT's saved optimized model, and session memory, over `unique_bytes`.

    Session memory (see `session_rss`) as `OnnxLM` runs by default (prepacking on, mapped
    pages released after load), with the pages kept, and with prepacking off:
      rss_load          RSS growth from creating the session (mapped weights not yet
                        touched by a run are not resident, so this can be below 1)
      session_overhead  anonymous memory of a session that copies no weight (prepacking
                        off, weights memory-mapped): graph, kernels, session state
      resident_weights  anonymous memory allocated at load (copies, prepacked weights)
                        minus session_overhead, plus the mapped weight pages resident after
                        a prefill and 8 decode steps; activations are left out
    """
    disk = onnx_graph.model_bytes(path)
    optimized = ort_optimized_bytes(path)
    rss = {"default": session_rss(path), "pages_kept": session_rss(path, release_pages=False),
           "no_prepack": session_rss(path, prepack=False)}
    overhead = rss["no_prepack"]["load_anon"]
    resident = {k: max(0, r["load_anon"] - overhead) + r["run_file"] for k, r in rss.items()}
    ratio = lambda b: round(b / unique_bytes, 4)  # noqa: E731
    return {
        "bytes_on_disk": disk, "bytes_ort_optimized": optimized, "session_rss": rss,
        "session_overhead": overhead, "resident_weights": resident["default"],
        "resident_weights_no_prepack": resident["no_prepack"], "resident_weights_pages_kept": resident["pages_kept"],
        "ratios": {"disk": ratio(disk), "ort_optimized": ratio(optimized), "rss_load": ratio(rss["default"]["load"]),
                   "resident_weights": ratio(resident["default"]),
                   "resident_weights_pages_kept": ratio(resident["pages_kept"]),
                   "resident_weights_no_prepack": ratio(resident["no_prepack"])},
    }


def ort_optimized_bytes(path: Path) -> int:
    """Size of the model ONNX Runtime runs: save its optimized graph (all levels) and weigh it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="foldgpt-ortopt-") as tmp:
        so = session_options()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return sum(f.stat().st_size for f in Path(tmp).iterdir())


def session_rss(path: Path, prepack: bool = True, release_pages: bool = True) -> dict:
    """Resident-set growth (bytes) in a fresh process, after a warm-up session on a throwaway graph.

    load / load_anon / load_file   after creating the session (file: resident pages of the model's files)
    run / run_*                    after an 8-token prefill and 8 decode steps as well
    """
    code = ("import sys; from export.onnx import _rss_probe; "
            "_rss_probe(sys.argv[1], sys.argv[2] == '1', sys.argv[3] == '1')")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(path), "1" if prepack else "0", "1" if release_pages else "0"],
                          capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"RSS probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_probe(path: str, prepack: bool, release_pages: bool) -> None:
    import onnx
    import onnxruntime as ort

    # Warm up ORT (library pages, thread pools, kernel registry) on a throwaway graph so
    # the measured growth is this model's, not the runtime's first-session cost.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "warmup", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w])
    warm = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), session_options(1, prepack),
                                providers=["CPUExecutionProvider"])
    warm.run(None, {"x": np.ones((1, 4), np.float32)})

    files = onnx_graph.model_files(Path(path))

    def status() -> dict:  # RssFile counts library code too; "file" is the model's own mapped pages
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {**{k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}, "file": mapped_resident(files)}

    before = status()
    lm = OnnxLM(path, num_threads=1, prepack=prepack, release_pages=release_pages)
    loaded = status()
    vocab = lm.step(list(range(8))).shape[-1]
    for token in range(100, 108):  # decode reads embedding rows the prefill did not
        lm.step([token % vocab])
    ran = status()
    grow = lambda now, key: now[key] - before[key]  # noqa: E731
    print(json.dumps({"load": grow(loaded, "VmRSS"), "load_anon": grow(loaded, "RssAnon"), "load_file": loaded["file"],
                      "run": grow(ran, "VmRSS"), "run_anon": grow(ran, "RssAnon"), "run_file": ran["file"]}))


# ----------------------------------------------------------------------------- 7. commit


def commit(stage: Path, out: Path, overwrite: bool = False) -> None:
    """Replace `out` with `stage` (same filesystem, so the swap is atomic)."""
    from compress.format import Kind, replace_path

    replace_path(stage, out, Kind.ONNX, overwrite)


BACKEND = register_backend("onnx", export=export_onnx, generate=generate,
                           precisions=(Precision.FP32, Precision.INT8, Precision.INT4))
