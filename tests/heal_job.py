"""One cure of a tiny folded model, run by tests/test_distributed.py under torch.distributed.run.

    python -m torch.distributed.run --nproc_per_node N tests/heal_job.py OUT BATCH STEPS [--resume] [--crash-at K] [--parallel fsdp]

BATCH is per process, so N x BATCH is the global batch. The main process writes OUT/weights.pt
and the folded model to OUT/folded.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import compress.heal as heal_mod
from compress.blocks import share_blocks
from compress.format import save_folded
from compress.heal import HealConfig, heal
from tests.conftest import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("batch", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--crash-at", type=int, default=None)
    ap.add_argument("--parallel", default="ddp")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = tiny_model(layers=4, hidden=64, vocab=99)
    student = copy.deepcopy(teacher)
    share_blocks(student, [0, 0, 1, 1])
    data = torch.randint(3, 99, (args.windows, 16), generator=torch.Generator().manual_seed(1))
    if args.crash_at is not None:  # an interrupt in step crash_at (1-based)
        real, calls = heal_mod._step, [0]

        def crash(*a, **k):
            calls[0] += 1
            if calls[0] == args.crash_at:
                raise SystemExit(3)
            return real(*a, **k)

        heal_mod._step = crash
    cfg = HealConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                     teacher_cache_mb=0, parallel=args.parallel)
    model, state = heal(student, teacher, data, cfg, args.out / "work", resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        layers = model.model.layers
        torch.save(model.state_dict(), args.out / "weights.pt")
        save_folded(model, args.out / "folded")
        (args.out / "state.json").write_text(json.dumps({
            "step": state.step, "processes": state.processes, "parallel": state.parallel,
            "shared": all(layers[0].get_parameter(n) is layers[1].get_parameter(n) for n, _ in layers[0].named_parameters()
                          if "layernorm" not in n)}))


if __name__ == "__main__":
    main()
