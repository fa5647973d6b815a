"""The cure under several processes (DDP over gloo, on the CPU), against one process on the
same global batch: same weights, sharing kept, and a resume under another process count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def cure(out: Path, processes: int, batch: int, steps: int, *extra: str, expect: int = 0) -> dict:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
           str(ROOT / "tests" / "heal_job.py"), str(out), str(batch), str(steps), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (run.returncode != 0 if expect else run.returncode == 0), run.stderr[-3000:]
    if expect:
        return {}
    return {"state": json.loads((out / "state.json").read_text()), "weights": torch.load(out / "weights.pt")}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_two_process_ddp_cure_equals_one_process_on_the_same_global_batch(tmp_path):
    one = cure(tmp_path / "one", 1, 4, 3)
    two = cure(tmp_path / "two", 2, 2, 3)
    assert two["state"] == {"step": 3, "processes": 2, "shared": True} and one["state"]["processes"] == 1
    assert_same_weights(one["weights"], two["weights"])
    assert not (tmp_path / "two" / "work" / "checkpoint.tmp").exists()  # swapped in once, by the main process


def test_an_interrupted_two_process_cure_resumes_on_one_process(tmp_path):
    cure(tmp_path / "run", 2, 2, 4, "--crash-at", "3", expect=1)  # dies in step 3, after the step-2 checkpoint
    assert json.loads((tmp_path / "run" / "work" / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed = cure(tmp_path / "run", 1, 4, 4, "--resume")
    whole = cure(tmp_path / "whole", 1, 4, 4)
    assert resumed["state"]["step"] == 4
    assert_same_weights(whole["weights"], resumed["weights"])
