"""What one cure step costs, and what the teacher cache and bf16 compute save.

    python benchmarks/cure_step.py [--student benchmarks/work/repair-local/p25r10] [--rounds 5]

A cure step (compress.heal) is the student's forward and backward, the optimizer, and
the dense teacher's forward for the distillation target. The teacher used to run in full
(head included) on every step; now it runs without its head, and once a healing sequence
has been seen its final hidden state comes from `TeacherCache`. This times, in alternating
rounds on one batch (4 x 256 tokens, the benchmarks' cure batch), with the real models:

    teacher+head   the old teacher forward: the *ForCausalLM with hidden states
    teacher        compress.heal.teacher_hidden: the decoder stack only
    step           a whole cure step that runs the teacher (first epoch)
    cached step    a whole cure step whose target comes from the cache (later epochs)
    ... bf16       the same two steps with compute_dtype="bfloat16" (torch autocast)

and reports medians and the per-round ratios step / cached step (the speed-up of every
step after the first epoch) and step / step bf16. Writes benchmarks/results/cure_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from compress.format import load_folded
    from compress.heal import HealConfig, _param_groups, _step, teacher_hidden
    from compress.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=str(ROOT / "benchmarks" / "work" / "repair-local" / "p25r10"), help="a folded model directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if not (Path(args.student) / "config.json").is_file():
        raise SystemExit(f"{args.student}: not a folded model directory (run benchmarks/quality.py first)")
    torch.manual_seed(0)
    teacher, _ = load_model("default")
    student, _ = load_folded(args.student)
    cfg = HealConfig(max_steps=1)
    optimizer = torch.optim.AdamW(_param_groups(student, cfg, []))
    student.train()
    batch = torch.randint(3, student.config.vocab_size, (args.batch, args.seq))
    ref = teacher_hidden(teacher, batch)

    def step(ref_hidden, bf16=False):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # as compress.heal does
            terms = _step(student, teacher, batch, cfg, ref_hidden)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    def full_teacher():
        with torch.no_grad():
            teacher(input_ids=batch, output_hidden_states=True)

    parts = {"teacher+head": full_teacher, "teacher": lambda: teacher_hidden(teacher, batch),
             "step": lambda: step(None), "cached step": lambda: step(ref),
             "step bf16": lambda: step(None, True), "cached step bf16": lambda: step(ref, True)}
    seconds: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(args.rounds + 1):  # round 0 warms up
        for name in parts if i % 2 == 0 else list(parts)[::-1]:
            s = timed(parts[name])
            if i:
                seconds[name].append(s)
            print(f"round {i} {name}: {s:.2f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    ratio = lambda a, b: float(np.median(np.asarray(seconds[a]) / np.asarray(seconds[b])))  # noqa: E731
    speedup, bf16 = ratio("step", "cached step"), ratio("step", "step bf16")
    result = {"command": ("python benchmarks/cure_step.py " + shlex.join(sys.argv[1:])).strip(), "student": args.student,
              "student_depth": student.config.num_hidden_layers, "teacher_depth": teacher.config.num_hidden_layers,
              "batch": [args.batch, args.seq], "threads": torch.get_num_threads(), "seconds": seconds,
              "median_s": med, "cached_step_speedup": round(speedup, 3), "bf16_step_speedup": round(bf16, 3),
              "bf16_cached_step_speedup": round(ratio("cached step", "cached step bf16"), 3)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cure_step.json").write_text(json.dumps(result, indent=1))
    lines = ["# One cure step on the default model: the teacher cache and bf16 compute", "",
             f"Reproduce: `{result['command']}`. Student {Path(args.student).name} ({result['student_depth']} layers), "
             f"dense teacher ({result['teacher_depth']} layers), batch {args.batch} x {args.seq}, "
             f"{result['threads']} threads, {args.rounds} alternating rounds after one warm-up.", "",
             "| part | median s | rounds |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.2f} | {', '.join(f'{s:.2f}' for s in v)} |" for k, v in seconds.items()]
    lines += ["", f"A cached step is {speedup:.2f}x as fast as one that runs the teacher (median of per-round ratios); "
              f"the teacher without its head takes {med['teacher'] / med['teacher+head']:.0%} of the full teacher forward. "
              f"In bf16 (autocast) a step is {bf16:.2f}x as fast as in fp32, a cached one "
              f"{result['bf16_cached_step_speedup']:.2f}x (median of per-round ratios)."]
    (RESULTS / "cure_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
