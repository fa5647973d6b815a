"""Training under several processes (gloo, on the CPU) against one process on the same global
batch: the cure (DDP and FSDP2; same weights, sharing kept, a resume under another process count
and parallelism) and the fold's own training (block gates, local healing)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.test_compress import compress_args, tiny_dir  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int, *args: str, expect: int = 0) -> str:
    """`args` (a script, or -m module) under torch.distributed.run with `processes` CPU processes."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
           *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (run.returncode != 0 if expect else run.returncode == 0), run.stderr[-3000:]
    return run.stderr


def cure(out: Path, processes: int, batch: int, steps: int, *extra: str, expect: int = 0) -> dict:
    launch(processes, str(ROOT / "tests" / "heal_job.py"), str(out), str(batch), str(steps), *extra, expect=expect)
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
    assert two["state"] == {"step": 3, "processes": 2, "parallel": "ddp", "shared": True} and one["state"]["processes"] == 1
    assert_same_weights(one["weights"], two["weights"])
    assert not (tmp_path / "two" / "work" / "checkpoint.tmp").exists()  # swapped in once, by the main process


def test_an_interrupted_two_process_cure_resumes_on_one_process(tmp_path):
    cure(tmp_path / "run", 2, 2, 4, "--crash-at", "3", expect=1)  # dies in step 3, after the step-2 checkpoint
    assert json.loads((tmp_path / "run" / "work" / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed = cure(tmp_path / "run", 1, 4, 4, "--resume")
    whole = cure(tmp_path / "whole", 1, 4, 4)
    assert resumed["state"]["step"] == 4 and resumed["state"]["processes"] == 1
    assert_same_weights(whole["weights"], resumed["weights"])


def test_two_process_fsdp_cure_equals_one_process_and_keeps_blocks_shared(tmp_path):
    one = cure(tmp_path / "one", 1, 4, 3)
    two = cure(tmp_path / "two", 2, 2, 3, "--parallel", "fsdp")
    assert two["state"] == {"step": 3, "processes": 2, "parallel": "fsdp", "shared": True}
    assert_same_weights(one["weights"], two["weights"])
    with safe_open(tmp_path / "two" / "folded" / "model.safetensors", "pt") as f:  # the pair stored once
        names = list(f.keys())
    assert sum(n.endswith("mlp.down_proj.weight") for n in names) == 2, names  # schedule 0 0 1 1: two blocks


def test_an_interrupted_fsdp_cure_resumes_under_one_ddp_process(tmp_path):
    cure(tmp_path / "run", 2, 2, 4, "--crash-at", "3", "--parallel", "fsdp", expect=1)
    assert json.loads((tmp_path / "run" / "work" / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed = cure(tmp_path / "run", 1, 4, 4, "--resume")
    whole = cure(tmp_path / "whole", 1, 4, 4)
    assert resumed["state"]["step"] == 4 and resumed["state"]["processes"] == 1
    assert_same_weights(whole["weights"], resumed["weights"])


def test_two_process_compress_writes_once_what_one_process_writes(tmp_path, tiny_dir):
    """The whole recipe under 2 processes: the main one makes the text, gates and fold, both cure
    (FSDP), the main one writes OUT; the result equals one process on the same global batch."""
    from compress.format import load_folded

    def run(name, processes, *extra):
        launch(processes, "-m", "foldgpt.cli", *compress_args(tmp_path / name, tiny_dir, *extra))
        return load_folded(tmp_path / name / "folded")[0]

    tmp_path.joinpath("one").mkdir(), tmp_path.joinpath("two").mkdir()
    one = run("one", 1, "--batch-size", "4")
    two = run("two", 2, "--batch-size", "2", "--parallel", "fsdp")
    assert two.config.fold["schedule"] == one.config.fold["schedule"] == [0, 0, 1, 1]
    assert {k: two.config.fold["provenance"]["heal"][k] for k in ("steps", "processes", "parallel")} == \
        {"steps": 3, "processes": 2, "parallel": "fsdp"}
    assert_same_weights(one.state_dict(), two.state_dict())
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_more_processes_than_healing_windows_is_one_line(tmp_path):
    err = launch(2, str(ROOT / "tests" / "heal_job.py"), str(tmp_path), "2", "3", "--windows", "1", expect=1)
    assert "ValueError: 2 processes but only 1 healing windows: use fewer processes or more data\n" in err


def fold_training(out: Path, processes: int, *extra: str, expect: int = 0) -> list[dict] | str:
    """tests/fold_job.py under `processes` processes: each process's result, or stderr if it must fail."""
    out.mkdir()
    err = launch(processes, str(ROOT / "tests" / "fold_job.py"), str(out), *extra, expect=expect)
    return err if expect else [torch.load(out / f"rank{r}.pt") for r in range(processes)]


def test_two_process_gates_local_healing_and_streamline_equal_one_process_on_the_same_global_batch(tmp_path):
    (one,) = fold_training(tmp_path / "one", 1)
    two = fold_training(tmp_path / "two", 2)
    for r in two:  # every process holds the same result, and it is one process's
        torch.testing.assert_close(r["trajectory"], one["trajectory"], atol=1e-5, rtol=0)
        assert r["closed"] == one["closed"] and r["steps"] == one["steps"] == [5, 5] and r["shared"]
        assert_same_weights(one["weights"], r["weights"])
        assert_same_weights(one["replacement"], r["replacement"])
    # and the gates moved, so the equality says something
    assert max(abs(a - b) for a, b in zip(one["trajectory"][0], one["trajectory"][-1])) > 0.01


def test_a_local_healing_time_budget_ends_at_the_same_step_on_every_process(tmp_path):
    two = fold_training(tmp_path / "two", 2, "--local-minutes", "0.02")
    assert two[0]["steps"] == two[1]["steps"] and sum(two[0]["steps"]) > 0
    assert_same_weights(two[0]["weights"], two[1]["weights"], atol=0)


def test_a_gate_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    err = fold_training(tmp_path / "odd", 2, "--gate-batch", "3", expect=1)
    assert ("ValueError: gate learning's batch of 3 does not split evenly over 2 processes: "
            "use a batch that is a multiple of 2\n") in err
