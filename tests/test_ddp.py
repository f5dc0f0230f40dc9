"""Data-parallel training with the real `torchrun`: two processes on CPU (gloo), killed and resumed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tasks import build, paths, prepare
from tasks.files import sha256_file
from tasks.params import load
from tasks.tracking import client
from tests.conftest import python, set_param, start, wait_for

pytestmark = pytest.mark.slow

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tasks", "train")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def epoch_lines(out: str) -> int:
    return sum(line.startswith("epoch ") for line in out.splitlines())


def test_torchrun_trains_is_killed_resumes_exactly_and_its_export_predicts(project):
    set_param(project, "epochs: 3", "epochs: 6")
    params = load()
    prepare.run(params)
    build.run(params)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    whole = python(*TORCHRUN, cwd=project, env=env, check=True)
    assert epoch_lines(whole.stdout) == 6  # rank 0 alone prints
    uninterrupted = sha256_file(paths.BEST)

    proc = start(*TORCHRUN, cwd=project, env=env, session=True)
    wait_for(proc, "epoch   2/6")
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both workers (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    again = python(*TORCHRUN, cwd=project, env=env, check=True)
    assert "resuming MLflow run" in again.stdout and epoch_lines(again.stdout) < 6

    assert sha256_file(paths.BEST) == uninterrupted  # the same weights as the uninterrupted two-process run
    c = client()
    runs = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id], order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert sorted(m.step for m in c.get_metric_history(runs[-1].info.run_id, "val/accuracy")) == list(range(1, 7))

    python("-m", "tasks", "evaluate", cwd=project, check=True)
    python("-m", "tasks", "export", cwd=project, check=True)
    import numpy as np

    model = torch.jit.load(paths.TORCHSCRIPT)
    x = torch.from_numpy(np.load(paths.images("test"))).float()
    y = torch.from_numpy(np.load(paths.labels("test")))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85
