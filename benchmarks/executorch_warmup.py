"""ExecuTorch decode from run to run in one process: warm-up, thread count, and vCPU wake-ups.

    python benchmarks/executorch_warmup.py [--run runs/main] [--runs 8] [--threads 2,1]
        [--halt-poll-ns 0,200000]

For each 4-bit ExecuTorch export of a `foldgpt run` (dense and folded), times `--runs`
consecutive decode runs (32-token prompt, 128 greedy steps) in one fresh process per
model, thread count and idle-polling setting, with the latency harness's own runner.

Why: the same program decodes 2-3x apart between consecutive runs here. This machine is a
KVM guest whose idle vCPUs halt at once (cpuidle haltpoll, guest_halt_poll_ns=0 on the
kernel command line), so waking a sleeping thread costs a trip through the host. XNNPACK's
thread pool lets its worker sleep between operators, and a decode step dispatches a few
hundred of them; llama.cpp's pool spins instead. `--halt-poll-ns` sets the guest's
/sys/module/haltpoll/parameters/guest_halt_poll_ns for a variant (root only; restored
afterwards): if wake-ups are the cause, polling should remove the slow runs.
Results: benchmarks/results/executorch_warmup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from runtime_tests.latency import measure_latency
from runtime_tests.runtimes import make_runner
runner = make_runner("executorch", sys.argv[1], threads=int(sys.argv[3]))
r = measure_latency(runner, prompt_lengths=(32,), decode_tokens=128, warmup=0, repeats=int(sys.argv[2]), vocab=49152)
print(json.dumps(r["decode_ms_per_token"]["runs"]))
"""


def set_halt_poll(ns: str | None) -> bool:
    if ns is None:
        return True
    try:
        HALT_POLL.write_text(ns)
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "main"), help="a finished `foldgpt run` output")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--halt-poll-ns", default=None, help="comma-separated guest_halt_poll_ns values (root, KVM guests)")
    args = ap.parse_args()
    ptes = sorted(Path(args.run, "exports").glob("*-executorch-*/model.pte"))
    if not ptes:
        raise SystemExit(f"{args.run}: no ExecuTorch exports (run `foldgpt run` first)")
    original = HALT_POLL.read_text().strip() if HALT_POLL.is_file() else None
    polls = args.halt_poll_ns.split(",") if args.halt_poll_ns else [None]
    rows = []
    try:
        for poll in polls:
            if not set_halt_poll(poll):
                print(f"cannot set {HALT_POLL} to {poll}: skipped", flush=True)
                continue
            for threads in args.threads.split(","):
                for pte in ptes:
                    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), str(pte), str(args.runs), threads],
                                         capture_output=True, text=True, check=True)
                    row = {"export": pte.parent.name, "threads": int(threads),
                           "halt_poll_ns": poll if poll is not None else original,
                           "ms_per_token": json.loads(out.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        if original is not None and args.halt_poll_ns:
            set_halt_poll(original)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "executorch_warmup.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    lines = ["# ExecuTorch decode, consecutive runs in one process (ms/token, 128 tokens after a 32-token prompt)",
             "", f"`python {' '.join(sys.argv)}`", "", __doc__.split("Why: ")[1].split("Results:")[0].replace("\n", " ").strip(), "",
             "| export | threads | guest_halt_poll_ns | " + " | ".join(f"run {i + 1}" for i in range(args.runs)) + " |",
             "|---" * (args.runs + 3) + "|"]
    lines += [f"| {r['export']} | {r['threads']} | {r['halt_poll_ns']} | " + " | ".join(f"{v:.2f}" for v in r["ms_per_token"]) + " |"
              for r in rows]
    (RESULTS / "executorch_warmup.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
