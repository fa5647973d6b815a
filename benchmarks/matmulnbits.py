"""What ONNX Runtime's 4-bit MatMul costs by compute mode and zero-point type, on this CPU.

    python benchmarks/matmulnbits.py [--rounds 5]

Two export choices rest on this (export/onnx_graph.py):
  * accuracy_level: 0 computes in fp32 (weights dequantized), 4 quantizes activations to
    int8 per block and runs integer dot products (VNNI here);
  * zero points: none (symmetric, what the exporters ship), uint8 (4-bit, asymmetric), or
    float. Only float zero points represent a GGUF Q4_1 block (w = d * q + m) exactly.
A chain of 20 MatMulNBits (N=1536, K=576, block 32: one of the default model's MLP
projections) runs at M=1 (a decode step) and M=128 (a prefill chunk), 1 thread, every
variant in alternating rounds; a variant's figure is its per-round median ratio to the
fp32-compute, no-zero-point variant. Writes benchmarks/results/matmulnbits.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from common import write_table

N, K, BS, CHAIN = 1536, 576, 32, 20


def session(zero_points: str, accuracy_level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    inits = [numpy_helper.from_array((q[:, 0::2] | (q[:, 1::2] << 4)).reshape(N, K // BS, BS // 2), "B"),
             numpy_helper.from_array(rng.uniform(0.01, 0.05, (N * K // BS,)).astype(np.float32), "s"),
             numpy_helper.from_array(np.array([0], np.int64), "start"), numpy_helper.from_array(np.array([K], np.int64), "stop"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis")]
    if zero_points == "uint8":
        inits.append(numpy_helper.from_array(np.full((N * ((K // BS + 1) // 2),), 0x88, np.uint8), "zp"))
    elif zero_points == "float":
        inits.append(numpy_helper.from_array(rng.uniform(0, 15, (N * K // BS,)).astype(np.float32), "zp"))
    nodes, x = [], "x"
    for i in range(CHAIN):  # y = x W^T, cut back to K columns so the next one can read it
        nodes.append(helper.make_node("MatMulNBits", [x, "B", "s"] + (["zp"] if zero_points != "none" else []), [f"y{i}"],
                                      domain="com.microsoft", K=K, N=N, bits=4, block_size=BS, accuracy_level=accuracy_level))
        nodes.append(helper.make_node("Slice", [f"y{i}", "start", "stop", "axis"], [f"x{i}"]))
        x = f"x{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10, help="chain runs per round")
    args = ap.parse_args()
    variants = [(zp, level) for level in (0, 4) for zp in ("none", "uint8", "float")]
    sessions = {v: session(*v) for v in variants}
    rows = []
    for m in (1, 128):
        x = np.random.default_rng(1).standard_normal((m, K)).astype(np.float32) * 0.01
        us: dict = {v: [] for v in variants}
        for r in range(args.rounds + 1):  # round 0 warms up
            for v in variants if r % 2 else variants[::-1]:
                t = time.perf_counter()
                for _ in range(args.repeats):
                    sessions[v].run(None, {"x": x})
                if r:
                    us[v].append((time.perf_counter() - t) / args.repeats / CHAIN * 1e6)
        base = np.asarray(us[("none", 0)])
        for v in variants:
            rows.append({"M": m, "zero_points": v[0], "accuracy_level": v[1], "us_per_matmul": round(float(np.median(us[v])), 1),
                         "x_fp32_compute": round(float(np.median(np.asarray(us[v]) / base)), 3)})
            print(rows[-1], flush=True)
    command = ("python benchmarks/matmulnbits.py " + shlex.join(sys.argv[1:])).strip()
    write_table("matmulnbits", {"command": command, "N": N, "K": K, "block": BS, "rows": rows},
                "ONNX Runtime MatMulNBits on this CPU: compute mode and zero points",
                f"Reproduce: `{command}`. N={N}, K={K}, 4-bit blocks of {BS}, 1 thread, {args.rounds} alternating rounds; "
                "x fp32 compute: per-round median time ratio to accuracy_level 0 without zero points (lower is faster).",
                {"M": "M", "accuracy_level": "accuracy_level", "zero points": "zero_points", "us / matmul": "us_per_matmul",
                 "x fp32 compute": "x_fp32_compute"}, rows)

if __name__ == "__main__":
    main()
