"""How many runs ExecuTorch decode needs to reach steady state, in one process.

    python benchmarks/executorch_warmup.py [--run runs/main] [--runs 8]

For each 4-bit ExecuTorch export of a `foldgpt run` (dense and folded), times `--runs`
consecutive decode runs (32-token prompt, 128 greedy steps, 2 threads) in one fresh
process per model, with the latency harness's own runner. Written because the bench's
single warm-up left the folded program at ~2x its later speed. Results:
benchmarks/results/executorch_warmup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from runtime_tests.latency import make_runner, measure_latency
runner = make_runner("executorch", sys.argv[1], threads=2)
r = measure_latency(runner, prompt_lengths=(32,), decode_tokens=128, warmup=0, repeats=int(sys.argv[2]), vocab=49152)
print(json.dumps(r["decode_ms_per_token"]["runs"]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "main"), help="a finished `foldgpt run` output")
    ap.add_argument("--runs", type=int, default=8)
    args = ap.parse_args()
    ptes = sorted(Path(args.run, "exports").glob("*-executorch-*/model.pte"))
    if not ptes:
        raise SystemExit(f"{args.run}: no ExecuTorch exports (run `foldgpt run` first)")
    rows = {}
    for pte in ptes:
        out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), str(pte), str(args.runs)],
                             capture_output=True, text=True, check=True)
        rows[pte.parent.name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(pte.parent.name, rows[pte.parent.name], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "executorch_warmup.json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1))
    lines = ["# ExecuTorch decode, consecutive runs in one process (ms/token, 128 tokens after a 32-token prompt, 2 threads)",
             "", "`python benchmarks/executorch_warmup.py`", "",
             "| export | " + " | ".join(f"run {i + 1}" for i in range(args.runs)) + " |", "|---" * (args.runs + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in runs) + " |" for name, runs in rows.items()]
    (RESULTS / "executorch_warmup.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
