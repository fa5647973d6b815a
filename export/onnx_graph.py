"""ONNX graph passes that keep each shared weight stored once, and the weight quantizers.

Why these passes exist (measured on folded SmolLM2 and tiny Llamas):
  * The dynamo exporter turns a shared nn.Parameter into one initializer, but every
    Linear reads it through its own `Transpose(W)`. The onnxscript optimizer then folds
    those transposes of small shared weights into one copy per use, and ONNX Runtime's
    ConstantFolding folds the tied lm_head's transpose into a second (V x H) copy, so the
    model ORT runs was 1.585x the unique bytes. `pretranspose_weights` stores W^T once and
    lets every MatMul read it directly; the tied embedding reads the same W^T through
    `Gather(axis=1)` + `Transpose`.
  * int8 and int4 (MatMulNBits) quantize the lm_head's W^T but leave the embedding Gather
    on the fp32 copy. `share_tied_embedding` makes the embedding dequantize rows of the
    head's quantized tensor and scales instead, so the tied weight is stored once.

Everything here works on `onnx_ir.Model`s or paths and imports onnx packages lazily.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data: one external-data file per model


def pretranspose_weights(model, tied_head_rows: bool = False) -> dict:
    """Store each 2-D weight read only through Transpose(perm=[1, 0]) (and Gather) once, in
    the layout its readers need, so no optimizer later materialises a transposed copy.

    For such an initializer W (out, in), a Linear weight, shared or not:
      Transpose(W)      -> W^T                                   (MatMul reads it directly)
      Gather(W, ids)    -> Transpose(Gather(W^T, ids, axis=1))   (a tied embedding)
    With `tied_head_rows` a tied embedding instead stays W (V, H): Gather reads its rows
    and the head computes logits as Transpose(MatMul(W, x^T)). W is then the MatMul's
    A input, which ONNX Runtime does not prepack, so the session keeps one copy of it
    rather than a packed head plus the raw embedding (fp32 only: the quantizers want W^T).
    Returns {"linear": n, "tied": n} rewrites. Run it before the onnxscript optimizer.
    """
    import onnx_ir as ir

    graph = model.graph
    stats = {"linear": 0, "tied": 0}
    for name, init in list(graph.initializers.items()):
        value = init.const_value
        if value is None or len(value.shape) != 2:
            continue
        transposes, gathers = [], []
        for use in init.uses():
            node = use.node
            if node.domain == "" and node.op_type == "Transpose" and list(node.attributes["perm"].as_ints()) == [1, 0]:
                transposes.append(node)
            elif node.domain == "" and node.op_type == "Gather" and use.idx == 0 and _axis(node) == 0:
                gathers.append(node)
            else:
                break
        else:
            if not transposes:
                continue
            if gathers and tied_head_rows and _head_as_rows(graph, init, transposes):
                stats["tied"] += 1
                continue
            arr = np.ascontiguousarray(value.numpy().T)  # (in, out): what MatMul wants
            wt = ir.Value(name=name + ".T", shape=ir.Shape(arr.shape), type=ir.TensorType(init.dtype),
                          const_value=ir.tensor(arr, name=name + ".T"))
            graph.register_initializer(wt)
            for node in transposes:
                node.outputs[0].replace_all_uses_with(wt, replace_graph_outputs=True)
                graph.remove(node, safe=True)
            for node in gathers:
                ids = node.inputs[1]
                rank = len(ids.shape) if ids.shape is not None else 2
                cols = ir.node("Gather", [wt, ids], {"axis": 1}, name=f"{node.name}_cols")  # (H, *ids)
                back = ir.node("Transpose", [cols.outputs[0]], {"perm": [*range(1, rank + 1), 0]},
                               name=f"{node.name}_rows")  # (*ids, H)
                back.outputs[0].name = node.outputs[0].name + "_tied"
                back.outputs[0].type, back.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
                graph.insert_before(node, [cols, back])
                node.outputs[0].replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
                graph.remove(node, safe=True)
            graph.initializers.pop(name)
            stats["tied" if gathers else "linear"] += 1
    return stats


def _head_as_rows(graph, weight, transposes) -> bool:
    """Rewrite every MatMul(x, Transpose(W)) to Transpose(MatMul(W, Transpose(x))) when
    each x is 3-D (B, S, H); returns False (graph untouched) when one is not."""
    import onnx_ir as ir

    matmuls = [(t, u.node) for t in transposes for u in t.outputs[0].uses()]
    if not all(m.op_type == "MatMul" and m.domain == "" and m.inputs[1] is t.outputs[0] and m.inputs[0].shape is not None
               and len(m.inputs[0].shape) == 3 for t, m in matmuls):
        return False
    for _, matmul in matmuls:
        xt = ir.node("Transpose", [matmul.inputs[0]], {"perm": [0, 2, 1]}, name=f"{matmul.name}_xT")  # (B, H, S)
        rows = ir.node("MatMul", [weight, xt.outputs[0]], name=f"{matmul.name}_rows")  # (B, V, S)
        back = ir.node("Transpose", [rows.outputs[0]], {"perm": [0, 2, 1]}, name=f"{matmul.name}_back")  # (B, S, V)
        out = matmul.outputs[0]
        back.outputs[0].type, back.outputs[0].shape = out.type, out.shape
        graph.insert_before(matmul, [xt, rows, back])
        out.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
        name, out.name = out.name, f"{out.name}_replaced"
        back.outputs[0].name = name  # keeps the graph output called "logits"
        graph.remove(matmul, safe=True)
    for t in transposes:
        graph.remove(t, safe=True)
    return True


def _rank(value) -> int | None:
    """Rank of `value`, looking through a DynamicQuantizeLinear (the quantizer leaves its outputs unshaped)."""
    if value.shape is None and value.producer() is not None and value.producer().op_type == "DynamicQuantizeLinear":
        value = value.producer().inputs[0]
    return None if value.shape is None else len(value.shape)


def _axis(node) -> int:
    attr = node.attributes.get("axis")
    return attr.as_int() if attr is not None else 0


def save(model, path: Path) -> None:
    """Write `model` as path + path.data (every initializer external), replacing both."""
    import onnx_ir as ir

    path = Path(path)
    for f in (path, path.with_name(path.name + DATA_SUFFIX)):
        f.unlink(missing_ok=True)
    ir.save(model, path, external_data=path.name + DATA_SUFFIX)


def last_row_logits(model) -> None:
    """Declare the `logits` output (batch, 1, vocab), with a literal 1. The traced graph keeps
    one row already (logits_to_keep=1), but torch.export may name that dimension; ONNX
    Runtime GenAI takes a graph as last-row only ("pruned") when it reads a 1 there, and
    otherwise allocates a row per prompt token and fails on the smaller output."""
    import onnx_ir as ir

    logits = next(v for v in model.graph.outputs if v.name == "logits")
    batch, _, vocab = logits.shape
    logits.shape = ir.Shape([batch, 1, vocab])


def clean(model) -> None:
    """Drop per-node stack traces and doc strings (about 1.6 KB a node) from `model`."""
    import onnx_ir.passes.common as common

    common.ClearMetadataAndDocStringPass()(model)


# ----------------------------------------------------------------------------- quantization


NBITS_ACCURACY_LEVEL = 4  # MatMulNBits computes in int8 (activations quantized per block), as XNNPACK's 8da4w /
# 8da8w do: a 1536 x 576 matmul at 4 bits takes 0.33x the fp32 path's time at M=1, 0.85x at M=128 on this CPU
# (AVX-512 VNNI; benchmarks/results/matmulnbits.md)
AUX_SUFFIXES = (".sums.weight.T", ".offset.weight.T")  # export.grid.GridLinear's fp32 parts, pretransposed


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int = 32, method: str = "rtn",
                   head_bits: int | None = None) -> dict:
    """Weight-only MatMulNBits (symmetric blocks of `block_size`, int8 compute) for every MatMul
    weight, each once, then the tied embedding reads the head's quantized tensor
    (`share_tied_embedding`). 4 bits: the values and scales torchao gives ExecuTorch's 8da4w
    (`export.quantize.int4_weights`, `method`), so both backends ship one grid. 8 bits: scale
    max|w| / 127 per block, as GGUF's Q8_0, so the default model's Q8_0 embedding is stored
    exactly. (Per-tensor dynamic int8, the earlier ONNX int8, cost the dense model x1.76: its
    down_proj inputs carry outliers; blocks of 32 bound each block's error by its own range.)
    `head_bits`: the tied head (and so the embedding) at other bits than the rest (int4+emb8)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(src)
    fp32 = {t.name: t for t in proto.graph.initializer}
    aux = [n.name for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1
           and n.input[1].endswith(AUX_SUFFIXES)]  # a source grid's block sums and offsets stay fp32
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    heads = [n.name for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in gathered]
    passes = [(bits, aux)] if head_bits in (None, bits) else [
        (head_bits, [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in heads]), (bits, aux)]
    for b, exclude in passes:  # the head first when it takes its own bits; the second pass sees it done
        quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=NBITS_ACCURACY_LEVEL, bits=b))
        with _quiet_root_logger():
            quantizer.process()
        proto = quantizer.model.model
    model = ir.from_proto(proto)
    stats = {"grid": regrid(model, fp32, method), "tied": share_tied_embedding(model)}
    clean(model)
    save(model, dst)
    return stats


def _blocks(weight, bits: int, block_size: int, method: str):
    """(q in [-2^(bits-1), 2^(bits-1) - 1] of shape (N, K), scales (N, K / block_size)) of W (N, K)."""
    import torch

    if bits == 4:
        from export.quantize import int4_weights  # torch: only the exporter gets here, never OnnxLM

        q, s = int4_weights(weight, block_size, method)
        return q.numpy(), s.numpy()
    w = weight.reshape(weight.shape[0], -1, block_size)
    s = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / s).clamp(-127, 127).to(torch.int8).reshape(weight.shape).numpy(), s.squeeze(-1).numpy()


def regrid(model, fp32: dict, method: str) -> int:
    """Overwrite each MatMulNBits' values and scales with ours for the same fp32 weight (see
    `quantize_nbits`; ONNX Runtime's own symmetric rounding uses max|w| / 2^(bits-1)).
    `fp32`: the source initializers by name. Returns the number of (unique) weights rewritten."""
    import onnx_ir as ir
    import torch
    from onnx import numpy_helper

    done: set[str] = set()
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.inputs[1].name in done:  # a shared weight: once
            continue
        bq, scales, bits = node.inputs[1], node.inputs[2], node.attributes["bits"].as_int()
        source = fp32.get(bq.name.removesuffix(f"_Q{bits}"))  # MatMulNBitsQuantizer's naming
        n, k, bs = (node.attributes[a].as_int() for a in ("N", "K", "block_size"))
        if source is None or k % bs:
            raise RuntimeError(f"{node.name}: no fp32 weight {bq.name.removesuffix(f'_Q{bits}')!r} whose width {k} splits into blocks of {bs}")
        w = torch.from_numpy(numpy_helper.to_array(source).T.copy())  # (N, K): W^T was stored
        q, s = _blocks(w, bits, bs, method)
        u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // bs, -1)  # the default zero point
        packed = u if bits == 8 else u.reshape(n, k // bs, bs // 2, 2)[..., 0] | (u.reshape(n, k // bs, bs // 2, 2)[..., 1] << 4)
        bq.const_value = ir.tensor(np.ascontiguousarray(packed), name=bq.name)  # 4 bits: low nibble first
        scales.const_value = ir.tensor(s.astype(np.float32).reshape(scales.shape.numpy() if scales.shape else (n, -1)),
                                       name=scales.name)
        done.add(bq.name)
    return len(done)


def share_tied_embedding(model) -> int:
    """Make Gather(W^T, ids, axis=1) -> Transpose read the lm_head's MatMulNBits weight.

    MatMulNBits stores W (rows = vocab entries) as B_q[N, K/bs, bs * bits / 8] uint8 (4 bits:
    two values a byte, low nibble first; zero point 2^(bits-1) when symmetric) and
    scales[N, K/bs]. The embedding becomes, for ids (B, S):
      q = Gather(B_q, ids)                        # (B, S, K/bs, bs * bits / 8) uint8
      w = interleave(q & 15, q >> 4) - 8          # 4 bits; 8 bits: q - 128; (B, S, K/bs, bs)
      x = w * Gather(scales, ids)[..., None]      # then reshaped to (B, S, K)
    so B_q and the scales are stored once. Returns the number of rewrites.
    """
    import onnx_ir as ir

    graph = model.graph
    nbits = {node.inputs[1].name: node for node in graph if node.op_type == "MatMulNBits"}
    done = 0
    for gather in list(graph):
        if gather.domain != "" or gather.op_type != "Gather" or _axis(gather) != 1 or not gather.inputs[0].is_initializer():
            continue
        users = list(gather.outputs[0].uses())
        if len(users) != 1 or users[0].node.op_type != "Transpose":
            continue
        head = nbits.get(gather.inputs[0].name + "_Q4") or nbits.get(gather.inputs[0].name + "_Q8")  # the quantizer's naming
        if head is None:
            continue
        bits = head.attributes["bits"].as_int()
        if len(head.inputs) > 3 and head.inputs[3] is not None:
            raise RuntimeError(f"{head.name}: asymmetric blocks (zero points) are not supported for the tied embedding")
        transpose, ids = users[0].node, gather.inputs[1]
        bq, scales = head.inputs[1], head.inputs[2]
        n_out, k = head.attributes["N"].as_int(), head.attributes["K"].as_int()
        bs = head.attributes["block_size"].as_int()
        n_blocks = bq.shape[1]
        if scales.shape is None or list(scales.shape) != [n_out, n_blocks]:
            raise RuntimeError(f"{head.name}: expected scales of shape [{n_out}, {n_blocks}], got {scales.shape}")

        def const(name, arr):
            v = ir.Value(name=f"tied_embed.{name}", shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                         const_value=ir.tensor(arr, name=f"tied_embed.{name}"))
            graph.register_initializer(v)
            return v

        nodes = []

        def op(op_type, inputs, **attrs):
            nodes.append(ir.node(op_type, inputs, attrs, name=f"tied_embed.{op_type}_{len(nodes)}"))
            return nodes[-1].outputs[0]

        last = const("last_axis", np.array([-1], np.int64))
        q = op("Gather", [bq, ids], axis=0)  # (B, S, nb, bs * bits / 8)
        if bits == 4:
            lo = op("Unsqueeze", [op("BitwiseAnd", [q, const("low_mask", np.array(15, np.uint8))]), last])
            hi = op("Unsqueeze", [op("BitShift", [q, const("shift", np.array(4, np.uint8))], direction="RIGHT"), last])
            q = op("Concat", [lo, hi], axis=-1)  # (B, S, nb, bs/2, 2)
        w = op("Reshape", [op("Sub", [op("Cast", [q], to=ir.DataType.FLOAT), const("zero_point", np.array(1 << (bits - 1), np.float32))]),
                           const("block_shape", np.array([0, 0, n_blocks, bs], np.int64))])
        s = op("Unsqueeze", [op("Gather", [scales, ids], axis=0), last])  # (B, S, nb, 1)
        x = op("Reshape", [op("Mul", [w, s]), const("row_shape", np.array([0, 0, n_blocks * bs], np.int64))])
        if n_blocks * bs != k:  # the last block was zero-padded
            x = op("Slice", [x, const("start", np.array([0], np.int64)), const("stop", np.array([k], np.int64)), last])
        x.name = "tied_embed.rows"  # (B, S, K)
        fp32_weight = gather.inputs[0]
        graph.insert_before(gather, nodes)
        transpose.outputs[0].replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove([transpose, gather], safe=True)
        if not list(fp32_weight.uses()):
            graph.initializers.pop(fp32_weight.name)
        done += 1
    return done


class _quiet_root_logger:
    """ORT's quantizers log advice ("consider pre-processing") on the root logger."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def _remove_model_files(path: Path) -> None:
    path = Path(path)
    for f in path.parent.glob(path.name + "*"):
        f.unlink()


# ----------------------------------------------------------------------------- inspection


def model_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files its initializers point at."""
    import onnx

    path = Path(path)
    proto = onnx.load(path, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def model_bytes(path: Path) -> int:
    return sum(os.path.getsize(f) for f in model_files(path))


def initializer_stats(path: Path) -> dict:
    """Count and bytes of the initializers (external data is not read), by dtype."""
    import onnx_ir as ir

    model = ir.load(path)
    by_dtype: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        by_dtype[tensor.dtype.name.lower()] = by_dtype.get(tensor.dtype.name.lower(), 0) + tensor.nbytes
    return {"count": len(model.graph.initializers), "bytes": sum(by_dtype.values()), "by_dtype": by_dtype}
