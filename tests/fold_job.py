"""The fold's own training (block gates, local healing of a tiny fold, Streamline's replacement)
under torch.distributed.run, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node N tests/fold_job.py OUT [--gate-batch B] [--local-minutes M]

Batches are global (each process trains on its rows). Every process writes OUT/rankR.pt: the
gate logits' trajectory, the closed blocks, the locally healed weights and the steps taken, and
Streamline's trained replacement block.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from compress.blocks import remove_blocks, share_blocks
from compress.importance import GateConfig, learn_gates
from compress.local_heal import LocalHealConfig, local_heal
from compress.parallel import world
from compress.streamline import StreamlineConfig, train_replacement
from tests.conftest import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--gate-batch", type=int, default=4)
    ap.add_argument("--local-minutes", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    dense = tiny_model(layers=6, hidden=64)
    data = torch.randint(3, 99, (24, 16), generator=torch.Generator().manual_seed(1))
    gates = learn_gates(copy.deepcopy(dense), data, GateConfig(num_remove=2, steps=6, batch_size=args.gate_batch))
    fold = share_blocks(remove_blocks(copy.deepcopy(dense), [1, 4]), [0, 1, 2, 2])  # a cut (after depth 0) and a shared pair
    cfg = LocalHealConfig(max_minutes=args.local_minutes, max_steps=None if args.local_minutes else 5, pool=16,
                          batch_size=4, lr=3e-3)
    fold, report = local_heal(fold, dense, data, cfg)
    block, _ = train_replacement(dense, data, 2, StreamlineConfig(span=2, train_steps=4, batch_size=4, lr=1e-3))
    rank, _ = world()
    torch.save({"trajectory": gates.trajectory, "closed": gates.closed, "weights": fold.state_dict(), "replacement": block.state_dict(),
                "steps": [u["steps"] for u in report.groups + report.cuts],
                "shared": fold.model.layers[2].mlp.up_proj.weight is fold.model.layers[3].mlp.up_proj.weight},
               args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
