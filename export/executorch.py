"""ExecuTorch backend: folded model directory -> a .pte for ExecuTorch's LLM runner, each shared weight stored once.

    foldgpt export executorch runs/folded --out runs/model.pte [--precision fp32|int8|8da4w]
        [--embedding-bits 8] [--max-context 512]
    foldgpt generate --backend executorch runs/model.pte --prompt "The capital of France is"

Writes OUT (the program), `tokenizer.json` beside it and, with --embedding-bits 8 only,
`OUT.ptd` (external weights; Android: `new LlmModule(LlmModule.MODEL_TYPE_TEXT, pte,
tokenizer, temperature, ptd)`). The program contract is in export/executorch_runtime.py.

Stages of `export_executorch` (each a function below):
  1. load      `compress.format.load_folded`, as fp32; the reference copy for the gate
  2. quantize  `export.quantize.quantize_shared`: one quantization per shared weight
  3. trace     torch.export of `CachedLM`: forward(tokens (1, seq), input_pos (1,)) -> logits
               (1, vocab), seq dynamic in [1, max_seq_len]; attention through ExecuTorch's
               `llama::update_cache` / `llama::custom_sdpa` on a static cache per depth
  4. lower     XNNPACK partitioner + the runner's constant methods, then to_executorch.
               The tied embedding is one tensor read by a gather and by the head. A tied fp32
               head (any precision without embedding_bits) is left out of the delegate, as
               mm(W, h^T), so both read the same program constant; an 8-bit head stays in XNNPACK and every weight goes to OUT.ptd,
               where its int8 rows and scales are byte-identical to the embedding_byte table
               and stored once (in memory too: `PteLM` releases the mapped .ptd pages once
               XNNPACK has packed the head, see `export.pages`). A 4-bit embedding cannot
               be shared that way (XNNPACK and embedding_4bit pack nibbles differently), so
               embedding_bits=4 is refused.
  5. package   tokenizer.json (the fast tokenizer file the runner reads)
  6. gate      `export.parity` against PyTorch (fp32: logits + 32 greedy tokens; quantized:
               perplexity); a failed gate leaves the export at its temporary path
  7. measure   file bytes over the unique weight bytes; resident memory after load and after
               a run in a fresh process: as PteLM runs, with the mapped pages kept, and
               without XNNPACK's weight cache
  8. commit    rename the files from the temporary directory beside OUT

Raises FileNotFoundError / ValueError (one line) for a path that is not a model, an OUT
that is not a .pte or lies inside the model, a precision this backend does not run, a
context shorter than the gate's prompts, a model it cannot export, or a failed gate
(`GateFailed`, a ValueError carrying the kept export's path and the report so far).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

from compress.format import Kind, check_output, sync_files
from export.executorch_runtime import INSTALL_HINT, TOKENIZER_FILE, PteLM, data_file, resident_memory, runtime
from export.llm_runner import kernel_libraries
from export.quantize import check_shapes, layer_bits, prepare_weights, quantize_shared, unique_weight_bytes
from export.parity import GateFailed, record_gate
from export.registry import ExportConfig, Precision, check_paths, load_model, register_backend

ATTENTION = "foldgpt_executorch_sdpa"
MAX_SEQ_LEN = 128  # tokens per forward call (prefill chunk); the runner splits longer prompts
GATE_NEW_TOKENS = 32
PRECISIONS = (Precision.FP32, Precision.INT8, Precision.INT8DA4W)


def require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the executorch backend needs {e.name}: {INSTALL_HINT} 'torchao>=0.18,<0.19'") from None


def export_executorch(model_dir, out, cfg: ExportConfig | None = None, measure: bool = True) -> dict:
    """Export the folded (or dense) model at `model_dir` to the .pte file `out`; returns the report."""
    cfg = cfg or ExportConfig()
    model_dir, out = Path(model_dir), Path(out)
    if out.suffix != ".pte":
        raise ValueError(f"{out}: the executorch backend writes a .pte file; name OUT like model.pte")
    out = check_paths(model_dir, out, Kind.PTE, cfg.overwrite)
    BACKEND.check(cfg)  # int8 here is 8da8w
    if cfg.embedding_bits == 4:  # measured on SmolLM2 (dense): 8da4w+emb4 89.7 MiB on disk, 8da4w+emb8 84.8 MiB
        raise ValueError("the executorch backend does not take +emb4: XNNPACK's 4-bit head and embedding_4bit pack "
                         "nibbles differently, so the tied table would be stored twice and the file comes out larger "
                         "than with +emb8; use +emb8")
    require_executorch()
    model, tokenizer = load_model(model_dir)
    max_seq_len = min(MAX_SEQ_LEN, cfg.max_context)
    check_model(model, cfg)
    gate_inputs = gate_prompts(model, tokenizer, cfg) if cfg.parity else None
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"backend": "executorch", "precision": cfg.precision.value, "embedding_bits": cfg.embedding_bits,
              "group_size": cfg.group_size if 4 in (layer_bits(cfg.precision), cfg.embedding_bits) else None,
              "model_dir": str(model_dir), "max_context": cfg.max_context, "max_seq_len": max_seq_len, "seconds": {}}
    check_shapes(model, cfg.precision, cfg.group_size, cfg.embedding_bits)  # before gptq's minutes
    if cfg.precision is not Precision.FP32:
        report.update(prepare_weights(model, tokenizer, cfg))  # smoothing; source-grid weights stored exactly; gptq
    report["unique_weight_bytes"] = unique_weight_bytes(model, cfg.precision, cfg.group_size, cfg.embedding_bits)
    reference = copy.deepcopy(model) if cfg.parity else None  # deepcopy keeps the Parameter sharing
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    clock = time.perf_counter()
    try:
        quantize_shared(model, cfg.precision, cfg.group_size, cfg.embedding_bits, cfg.weight_method)
        head_fqn, external, report["tied_embedding"] = tied_layout(model, cfg.embedding_bits)
        program = trace(model, cfg.max_context, max_seq_len, head_outside=head_fqn is not None)
        report["seconds"]["trace"] = round(time.perf_counter() - clock, 1)
        meta = metadata(model, tokenizer, cfg.max_context, max_seq_len)
        lowered = lower(program, meta, head_fqn, external)
        report["link"] = kernel_libraries(lowered.executorch_program)
        files = write_program(lowered, stage, out.stem, external)
        package(stage, tokenizer)
        report["seconds"]["lower"] = round(time.perf_counter() - clock - report["seconds"]["trace"], 1)
        report["metadata"] = meta
        if cfg.parity:
            clock = time.perf_counter()
            gate = run_gate(reference, files["pte"], gate_inputs, quantized=layer_bits(cfg.precision) is not None
                            or cfg.embedding_bits is not None, num_threads=cfg.num_threads)
            record_gate(gate, report, time.perf_counter() - clock, stage, out)
        report.update(sizes(files, report["unique_weight_bytes"]))
        if measure:
            clock = time.perf_counter()
            sync_files(stage)  # pages still waiting for writeback cannot be released (export.pages)
            report["resident"] = measure_resident(files["pte"], report["unique_weight_bytes"])
            report["seconds"]["measure"] = round(time.perf_counter() - clock, 1)
        report["files"] = {k: str(v) for k, v in commit(stage, out, cfg.overwrite).items()}
    except BaseException as e:
        if not isinstance(e, GateFailed):  # a rejected export is left for inspection; the error says where
            shutil.rmtree(stage, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report


# ----------------------------------------------------------------------------- 1. load


def check_model(model, cfg: ExportConfig) -> None:
    """ValueError for attention the static-cache SDPA cannot reproduce at this context length."""
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "attn_logit_softcapping", None):
        raise ValueError(f"{model.config.model_type}: attention logit soft-capping is not supported by "
                         "ExecuTorch's custom_sdpa; this family cannot be exported to executorch")
    window = getattr(text, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or []) or getattr(text, "use_sliding_window", True)
    if window and sliding and window < cfg.max_context:
        raise ValueError(f"{model.config.model_type} attends over a sliding window of {window} tokens; "
                         f"export with --max-context {window} or less (got {cfg.max_context})")


def gate_prompts(model, tokenizer, cfg: ExportConfig) -> dict:
    """The gate's fixed prompts and perplexity text; ValueError if they do not fit the context."""
    from export.parity import text_windows, prompts

    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = prompts(tokenizer, vocab)
    need = max(len(p) for p in ids) + GATE_NEW_TOKENS
    if need > cfg.max_context:
        raise ValueError(f"max_context {cfg.max_context} is below the parity gate's longest prompt plus "
                         f"{GATE_NEW_TOKENS} new tokens ({need}); raise --max-context or pass --no-parity")
    return {"prompts": ids, "text": text_windows(tokenizer, vocab, cfg.gate_text, cfg.gate_tokens, min(256, cfg.max_context)),
            "bound": cfg.ppl_bound()}


# ----------------------------------------------------------------------------- 3. trace


def executorch_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function over the module's static cache.

    query (1, Hq, S, D), key/value (1, Hkv, S, D): the new tokens only (no HF cache is
    passed). They are written at `start_pos` of the cache (1, max_context, Hkv, D) and
    query i attends to cache[0 : start_pos + i + 1]; custom_sdpa handles grouped heads.
    """
    import torch

    start = kwargs["et_start_pos"]
    cache = module.et_cache
    q = query.transpose(1, 2)  # (1, S, Hq, D)
    torch.ops.llama.update_cache(key.transpose(1, 2).contiguous(), cache.k, start)
    torch.ops.llama.update_cache(value.transpose(1, 2).contiguous(), cache.v, start)
    out = torch.ops.llama.custom_sdpa(q, cache.k, cache.v, start, None, 0.0, True, scaling)
    return out, None  # (1, S, Hq, D), as transformers' sdpa_attention_forward returns


def _cached_lm(model, max_context: int, head_outside: bool = False):
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, executorch_attention)  # not a mask interface: no mask is built

    class StaticCache(torch.nn.Module):
        def __init__(self, kv_heads: int, head_dim: int):
            super().__init__()
            self.register_buffer("k", torch.zeros(1, max_context, kv_heads, head_dim), persistent=False)
            self.register_buffer("v", torch.zeros(1, max_context, kv_heads, head_dim), persistent=False)

    class CachedLM(torch.nn.Module):
        """forward(tokens (1, seq), input_pos (1,)) -> next-token logits of the last token (1, vocab)."""

        def __init__(self):
            super().__init__()
            text = model.config.get_text_config(decoder=True)
            kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
            if len(attention) != text.num_hidden_layers:
                raise ValueError(f"{model.config.model_type}: found {len(attention)} attention modules for "
                                 f"{text.num_hidden_layers} depths; cannot place a cache per depth")
            for attn in attention:  # one cache per depth: shared weights, separate keys and values
                attn.et_cache = StaticCache(kv_heads, head_dim)
            if head_outside:
                model.set_output_embeddings(_row_major_head()(model.get_output_embeddings().weight))
            model.config._attn_implementation = text._attn_implementation = ATTENTION
            self.model = model

        def forward(self, tokens, input_pos):
            seq, start = tokens.shape[1], input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + seq <= max_context)
            positions = (torch.arange(seq, dtype=torch.long) + input_pos[0]).unsqueeze(0)
            out = self.model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=1, et_start_pos=start)
            return out.logits[:, -1, :]

    return CachedLM().eval()


def _row_major_head():
    import torch

    class RowMajorHead(torch.nn.Module):
        """The tied head as mm(W, h^T)^T over W (vocab, hidden), the layout the embedding
        gather reads, so the two share one program constant. Outside XNNPACK, mm runs on
        ExecuTorch's optimized kernel and reads W in place; `linear` is decomposed to a
        permute copy of the whole table plus mm, on every call."""

        def __init__(self, weight):
            super().__init__()
            self.weight = weight  # the same Parameter as the embedding

        def forward(self, hidden):  # (B, S, H) -> (B, S, V)
            flat = hidden.reshape(-1, hidden.shape[-1])
            return torch.mm(self.weight, flat.t()).t().reshape(*hidden.shape[:-1], self.weight.shape[0])

    return RowMajorHead


def trace(model, max_context: int, max_seq_len: int, head_outside: bool = False):
    """torch.export of the cached model, sequence length dynamic in [1, max_seq_len].
    `head_outside`: the tied head becomes a RowMajorHead (see `tied_layout`)."""
    import torch

    runtime()  # registers llama::custom_sdpa / update_cache for eager and export
    wrapper = _cached_lm(model, max_context, head_outside)
    example = (torch.tensor([[1, 2]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    seq = torch.export.Dim("seq", min=1, max=max(max_seq_len, 2))
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, None), strict=False)
    except Exception as e:  # torch.export raises many error types, with pages of detail
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"cannot export {model.config.model_type} to executorch: {first.strip()[:300]}") from None


# ----------------------------------------------------------------------------- 4. lower


def metadata(model, tokenizer, max_context: int, max_seq_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runner reads."""
    text = model.config.get_text_config(decoder=True)
    eos = set()
    for source in (text.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    bos = text.bos_token_id if text.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    return {
        "get_max_seq_len": max_seq_len, "get_max_context_len": max_context, "get_vocab_size": text.vocab_size,
        "get_n_layers": text.num_hidden_layers, "get_bos_id": bos if bos is not None else 0,
        "get_eos_ids": sorted(eos), "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
    }


def tied_layout(model, embedding_bits: int | None) -> tuple[str | None, bool, str]:
    """How the tied embedding/head tensor is stored once: (head module left out of XNNPACK,
    weights to an external .ptd, one line saying which)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return None, False, "not tied: the embedding and the head are separate tensors"
    if embedding_bits is None:
        fqn = "model." + next(name for name, m in model.named_modules() if m is head)  # inside CachedLM
        return fqn, False, "once: one fp32 program constant, read by the gather and by the head (mm, outside XNNPACK)"
    return None, True, ("once: one int8 tensor + scales in the .ptd, read by the XNNPACK head (8da8w) "
                        "and by embedding_byte")


def _in_module(node, fqn: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(str(path) == fqn or str(path).endswith("." + fqn) for path, _ in stack.values())


def partitioner(head_fqn: str | None):
    """XNNPACK partitioner; with `head_fqn`, that module stays out of the delegate."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class HeadOutside(XnnpackPartitioner):
        def generate_partitions(self, ep):
            parts = super().generate_partitions(ep)
            if head_fqn is None:
                return parts
            for p in parts:
                for n in [n for n in p.nodes if _in_module(n, head_fqn)]:
                    p.remove_node(n)
            return [p for p in parts if len(p.nodes)]

    return HeadOutside()


def tag_external(ep, tag: str) -> None:
    """Send every delegate constant to the .ptd `tag`. XNNPACK reads the tag from the node it
    serializes, for a quantized weight the dequantize node, so operator nodes are tagged too."""
    sig = ep.graph_signature
    constants = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    for n in ep.graph.nodes:
        if (n.op == "placeholder" and n.name in constants) or n.op == "call_function":
            n.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


EXTERNAL_TAG = "weights"


def lower(program, meta: dict, head_fqn: str | None, external: bool):
    """XNNPACK lowering and the ExecuTorch program (an ExecutorchProgramManager)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if external:
        tag_external(program, EXTERNAL_TAG)
    edge = to_edge_transform_and_lower(program, partitioner=[partitioner(head_fqn)], constant_methods=meta,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        external_constants=(lambda node: EXTERNAL_TAG) if external else False))


def write_program(program, stage: Path, stem: str, external: bool) -> dict[str, Path]:
    """Write `<stem>.pte` (and `<stem>.ptd`) into `stage`; returns {"pte": path[, "ptd": path]}."""
    files = {"pte": stage / f"{stem}.pte"}
    with open(files["pte"], "wb") as f:
        program.write_to_file(f)
    if external:
        program.write_tensor_data_to_file(str(stage))  # writes <tag>.ptd
        files["ptd"] = stage / f"{stem}.ptd"
        os.replace(stage / f"{EXTERNAL_TAG}.ptd", files["ptd"])
    return files


# ----------------------------------------------------------------------------- 5. package


def package(stage: Path, tokenizer) -> None:
    """tokenizer.json (the fast tokenizer's file, what the LLM runner and `generate` read)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.save(str(stage / TOKENIZER_FILE))


# ----------------------------------------------------------------------------- 6. gate


def run_gate(reference, pte: Path, inputs: dict, quantized: bool, num_threads: int | None = None):
    from export.parity import parity_gate, torch_steps

    lm = PteLM(pte, num_threads=num_threads)
    return parity_gate(torch_steps(reference), lm.steps, inputs["prompts"], quantized=quantized,
                       text_ids=inputs["text"] if quantized else None, new_tokens=GATE_NEW_TOKENS,
                       max_ppl_ratio=inputs["bound"] or 1.0)


def generate(artifact, prompt: str, max_new_tokens: int, on_token=None) -> list[int]:
    """Greedy decode with the static KV cache; `on_token(text)` receives each new piece of text."""
    artifact = Path(artifact)
    if artifact.is_dir() or artifact.suffix != ".pte":
        raise ValueError(f"{artifact}: the executorch backend runs a .pte file")
    lm = PteLM(artifact)
    ids = lm.encode(prompt)
    if len(ids) >= lm.max_context:
        raise ValueError(f"the prompt is {len(ids)} tokens; the program's context is {lm.max_context} "
                         "(export with a larger --max-context)")
    stream, _ = lm.stream_text(on_token) if on_token is not None else (None, None)
    return lm.generate(ids, max_new_tokens, on_token=stream)


# ----------------------------------------------------------------------------- 7. measure


def pte_layout(pte: Path) -> dict:
    """Where the bytes of a .pte are: constant segment, named data (delegate weights), the rest."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = Path(pte).read_bytes()
    parsed = deserialize_pte_binary(data)
    program, named = parsed.program, parsed.named_data
    return {"constant_segment": sum(len(b.storage) for b in program.constant_buffer),
            "named_data": 0 if named is None else sum(len(b) for b in named.buffers),
            "delegates": len(program.execution_plan[0].delegates),
            "planned_memory": sum(program.execution_plan[0].non_const_buffer_sizes)}


def sizes(files: dict[str, Path], unique: int) -> dict:
    pte = files["pte"].stat().st_size
    ptd = files["ptd"].stat().st_size if "ptd" in files else 0
    return {"bytes": {"pte": pte, "ptd": ptd, "total": pte + ptd}, "ratio": round((pte + ptd) / unique, 4),
            "pte_layout": pte_layout(files["pte"])}


def measure_resident(pte: Path, unique: int) -> dict:
    """Fresh-process RSS growth over `unique`: as `PteLM` runs by default (XNNPACK weight cache
    on, mapped pages released after packing), with the mapped pages kept, and without the cache."""
    out = {}
    for name, cache, release in (("weight_cache", True, True), ("pages_kept", True, False),
                                 ("no_weight_cache", False, True)):
        r = resident_memory(pte, weight_cache=cache, release_pages=release)
        out[name] = {**r, "ratio": round(r["after_forward"] / unique, 4)}
    return out


# ----------------------------------------------------------------------------- 8. commit


def commit(stage: Path, out: Path, overwrite: bool = False) -> dict[str, Path]:
    """Move the staged files beside OUT (the .pte last); a stale OUT.ptd goes if the new export has none.
    Each move is one rename; what is at OUT is checked again first (`check_output`)."""
    check_output(out, Kind.PTE, overwrite=overwrite)
    moved = {}
    names = {"ptd": out.with_suffix(".ptd"), "tokenizer": out.parent / TOKENIZER_FILE, "pte": out}
    staged = {"ptd": stage / f"{out.stem}.ptd", "tokenizer": stage / TOKENIZER_FILE, "pte": stage / out.name}
    if not staged["ptd"].exists() and data_file(out) is not None:
        data_file(out).unlink()
    for key in ("ptd", "tokenizer", "pte"):
        if staged[key].exists():
            sync_files(staged[key])
            os.replace(staged[key], names[key])
            moved[key] = names[key]
    shutil.rmtree(stage, ignore_errors=True)
    return moved


# a .pte file with its tokenizer and report beside it, in its own folder
BACKEND = register_backend("executorch", export=export_executorch, generate=generate, precisions=PRECISIONS,
                           artifact="model.pte")
