"""Sweeps: the sweep file, and real sweeps of real trainings on Prefect's threads and on a Dask LocalCluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.errors import ConfigError
from tests.conftest import ROOT, one_line_error, prefect_rest, python, sh, start

GRID = """\
method: grid
params:
  train.epochs: 3
space:
  train.lr: [0.001, 0.003]
  train.batch_size: [32, 64]
"""


def write(project: Path, name: str, text: str) -> str:
    path = project / "sweeps" / name
    path.write_text(text)
    return f"sweeps/{name}"


def test_a_grid_runs_every_combination_and_random_draws_are_reproducible(tmp_path):
    from flows.sweep_plan import make_plan

    grid = make_plan(ROOT / "sweeps/lr.yaml", ROOT / "params.yaml")
    combos = [(t.values["train.lr"], t.values["train.batch_size"]) for t in grid.trials]
    assert sorted(combos) == [(0.001, 32), (0.001, 64), (0.003, 32), (0.003, 64)]
    assert len({t.folder for t in grid.trials}) == 4 and all(t.params.train.epochs == 10 for t in grid.trials)
    assert [t.params.train.lr for t in grid.trials] == [t.values["train.lr"] for t in grid.trials]

    random = make_plan(ROOT / "sweeps/random.yaml", ROOT / "params.yaml")
    draws = [t.values for t in random.trials]
    assert len(draws) == 8 and len({json.dumps(d, sort_keys=True) for d in draws}) == 8
    assert all(0.0003 <= d["train.lr"] <= 0.01 and d["build.dropout"] in (0.0, 0.1, 0.3) for d in draws)
    assert draws == [t.values for t in make_plan(ROOT / "sweeps/random.yaml", ROOT / "params.yaml").trials]
    other = tmp_path / "random.yaml"
    other.write_text((ROOT / "sweeps/random.yaml").read_text().replace("seed: 0", "seed: 1"))
    assert [t.values for t in make_plan(other, ROOT / "params.yaml").trials] != draws
    assert make_plan(other, ROOT / "params.yaml").folder != random.folder


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("space:\n  train.lrr: [0.1]\n", "trial 1 (train.lrr=0.1)"),
        ("space:\n  train.lr: [0.01, 20]\n", "trial 2 (train.lr=20)"),
        ("space:\n  train.lr: {log_uniform: [0.001, 0.1]}\n", "a grid takes lists of values; train.lr"),
        ("method: random\nspace:\n  train.lr: [0.1, 0.2]\n", "method: random needs trials"),
        ("method: random\ntrials: 2\nspace:\n  train.lr: {uniform: [0.1, 0.01]}\n", "low must be below high"),
        ("params:\n  train.lr: 0.1\nspace:\n  train.lr: [0.1]\n", "train.lr is both fixed (params) and swept"),
        ("space: {}\n", "space"),
        ("spaces:\n  train.lr: [0.1]\n", "spaces: not a sweep file key; the keys are name, method"),
        ("space: [\n", "is not valid YAML"),
        ("params:\n  train: {epochs: 3}\nspace:\n  train.lr: [0.1]\n", "'train' is a section; name each param"),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_the_key_or_trial(tmp_path, text, expected):
    from flows.sweep_plan import make_plan

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        make_plan(path, ROOT / "params.yaml")
    assert str(caught.value).startswith(f"sweep file {path}") and expected in str(caught.value)


def test_a_forked_trial_runs_the_sweep_command_module_again_without_importing_prefect():
    """multiprocessing runs the main module again in every trial process it forks (`__mp_main__`), as here.

    `python -m flows.sweep` is that module: what it imports at its top, every trial pays (Prefect's
    import took 0.7 s of a 2.3 s trial). The forkserver has imported torch, MLflow and pydantic already.
    """
    code = (
        "import multiprocessing.spawn, sys; multiprocessing.spawn.prepare({'init_main_from_name': 'flows.sweep'}); "
        "main = sys.modules['__mp_main__']; "
        "print(hasattr(main, 'parser'), sorted({'prefect', 'dask', 'distributed'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split(maxsplit=1) == ["True", "[]\n"]


def test_the_command_refuses_a_bad_sweep_file_in_one_line_before_anything_starts(project):
    proc = python("-m", "flows.sweep", write(project, "bad.yaml", "space:\n  train.lr: [0.01, 20]\n"), cwd=project)
    assert proc.returncode == ConfigError.exit_code
    assert one_line_error(proc) == (
        "error: sweep file sweeps/bad.yaml, trial 2 (train.lr=20): params.yaml: train.lr: got 20; input should be "
        "less than or equal to 10"
    )
    assert not (project / ".sweeps").exists() and not (project / ".prefect").exists()  # no server was started


def sweep_runs(parent: str) -> list:
    from tasks.tracking import client

    c = client()
    experiment = c.get_experiment_by_name("pipeline").experiment_id
    return c.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def results(project: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in project.glob(".sweeps/*/trial-*/result.json")}


@pytest.mark.slow
def test_a_sweep_on_dask_is_one_parent_run_with_a_nested_run_per_trial_and_a_restart_runs_only_the_rest(
    prefect_api, project
):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    spec = write(project, "grid.yaml", GRID)
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "sweep", cwd=project)
    params = (project / "params.yaml").read_bytes()

    # Two at once, on two Dask workers; stopped as a worker stops a cancelled run (SIGTERM) once two have a result.
    first = start("-m", "flows.sweep", spec, "--dask", "--parallel", "2", cwd=project, env=env)
    deadline = time.monotonic() + 300
    while len(results(project)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out
    done = results(project)
    assert 2 <= len(done) < 4, out
    assert out.strip().splitlines()[-1].startswith(f"error: sweep grid terminated (SIGTERM): {len(done)} of 4 trials")

    again = sh(sys.executable, "-m", "flows.sweep", spec, "--dask", "--parallel", "2", cwd=project, env=env)
    out = again.stdout + again.stderr
    assert f"{len(done)} have a result from before, {4 - len(done)} to run" in out
    started = {line.split("[trial ")[1].split("]")[0] for line in out.splitlines() if "] started in" in line}
    assert started == {"1", "2", "3", "4"} - {name.removeprefix("trial-") for name in done}
    after = results(project)
    assert {k: after[k] for k in done} == done  # the finished trials were not run again

    # MLflow: one parent, a nested run per trial, each FINISHED; the parent carries the best trial's metrics.
    (sweep_note,) = project.glob(".sweeps/grid-*/sweep.json")
    parent = json.loads(sweep_note.read_text())["run_id"]
    children = sweep_runs(parent)
    assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in after.values())
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.data.tags["sweep.trial"] for r in children) == ["1", "2", "3", "4"]
    assert len({r.info.run_name for r in children}) == 4
    best = max(after, key=lambda k: after[k]["metrics"]["val/accuracy"])
    from tasks.tracking import client

    top = client().get_run(parent)
    assert top.info.status == "FINISHED" and top.data.tags["sweep.best_trial"] == best.removeprefix("trial-")
    assert top.data.metrics["best/val_accuracy"] == pytest.approx(after[best]["metrics"]["val/accuracy"])
    for run in children:  # each trial's kept epoch, as the sweep's table shows it
        (mine,) = [r for r in after.values() if r["run_id"] == run.info.run_id]
        assert run.data.metrics["best/val_accuracy"] == pytest.approx(mine["metrics"]["val/accuracy"])
    number = best.removeprefix("trial-")
    lr = {"1": 0.001, "2": 0.003, "3": 0.001, "4": 0.003}[number]
    assert f"best: trial {number} (lr={lr:g}" in out
    batch = {"1": 32, "2": 32, "3": 64, "4": 64}[number]
    adopt = f"python -m flows.pipeline --set train.epochs=3 --set train.lr={lr} --set train.batch_size={batch}"
    assert adopt in out

    # The Prefect artifact says the same; the checkout's params and files are as they were.
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        (artifact,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-best"])))[-1:]
    assert f"best: trial {number}" in artifact.data and parent in artifact.data
    assert (project / "params.yaml").read_bytes() == params
    assert sh("git", "status", "--porcelain", cwd=project).stdout == ""
    assert not (project / "models").exists() and not (project / "dvc.lock").exists()


def sweep_processes(project: Path) -> list[str]:
    """The processes working in the project's sweeps (the trials, however started), and a forkserver left there."""
    found = []
    project = project.resolve()
    for proc in Path("/proc").iterdir():
        try:
            cwd = (proc / "cwd").resolve(strict=True)
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not a process
            continue
        if cwd.is_relative_to(project / ".sweeps") or (cwd == project and "multiprocessing.forkserver" in args):
            found.append(f"{proc.name} in {cwd}: {args[:100]}")
    return found


def wait_until_gone(project: Path, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := sweep_processes(project)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_a_killed_or_interrupted_sweep_leaves_no_trial_running_and_its_runs_killed(prefect_api, project, how):
    """SIGKILL gives the sweep no chance to stop its trials: each trial sees its parent go, and stops itself.
    A terminal's Ctrl-C reaches the sweep and its trials at once, and then the sweep's SIGTERM reaches each
    trial: the trial stops cleanly on the first and ignores the second (which had left its run FAILED)."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    spec = write(project, "long.yaml", "params:\n  train.epochs: 100\nspace:\n  train.lr: [0.001, 0.003]\n")
    sweep = start("-m", "flows.sweep", spec, "--parallel", "2", cwd=project, env=env, session=True)
    deadline = time.monotonic() + 300
    while len(list(project.glob(".sweeps/long-*/trial-*/models/train/checkpoints/*.pt"))) < 2:
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
        time.sleep(0.2)
    running = sweep_processes(project)
    assert sum("trial-" in p for p in running) == 2, running
    if how == "SIGKILL":
        sweep.kill()
    else:
        os.killpg(sweep.pid, signal.SIGINT)  # as a terminal does: the whole process group
    out, _ = sweep.communicate(timeout=120)
    if how == "Ctrl-C":
        assert sweep.returncode == 130 and "error: sweep long interrupted (Ctrl-C)" in out, out
    assert wait_until_gone(project, 20) == []
    (note,) = project.glob(".sweeps/long-*/sweep.json")
    parent = json.loads(note.read_text())["run_id"]
    trials = sweep_runs(parent)
    assert len(trials) == 2 and {r.info.status for r in trials} == {"KILLED"}
    assert not list(project.glob(".sweeps/long-*/trial-*/result.json"))  # stopped from outside: no result, runs again

    # The sweep's Prefect flow run: Prefect ends it on Ctrl-C; after a SIGKILL, the next flow run in
    # the checkout (here a sweep of one short trial) marks it Crashed, as the pipeline does its own.
    from tasks.tracking import client

    flow_run_id = client().get_run(parent).data.tags["prefect.flow_run_id"]
    state = prefect_rest(prefect_api, f"flow_runs/{flow_run_id}")["state_type"]
    assert state == ("RUNNING" if how == "SIGKILL" else "CRASHED")
    short = write(project, "short.yaml", "params:\n  train.epochs: 1\nspace:\n  train.lr: [0.01]\n")
    done = sh(sys.executable, "-m", "flows.sweep", short, cwd=project, env=env)
    out = done.stdout + done.stderr
    assert (f"marked Prefect flow run 'sweep {spec}' Crashed: its process ({sweep.pid}) was killed" in out) == (
        how == "SIGKILL"
    ), out
    assert prefect_rest(prefect_api, f"flow_runs/{flow_run_id}")["state_type"] == "CRASHED"


@pytest.mark.slow
def test_a_stopped_sweep_stops_its_trials_resumes_them_and_keeps_a_failed_trial_as_its_result(prefect_api, project):
    from tasks.tracking import client

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    spec = write(project, "lr.yaml", "params:\n  train.epochs: 100\nspace:\n  train.lr: [0.003, 10]\n")
    first = start("-m", "flows.sweep", spec, "--parallel", "2", cwd=project, env=env)  # on Prefect's threads
    deadline = time.monotonic() + 300
    # Stopped once trial 1 has checkpoints, and trial 2 (lr=10) has diverged.
    while len(list(project.glob(".sweeps/lr-*/trial-1/models/train/checkpoints/*.pt"))) < 2 or not list(
        project.glob(".sweeps/lr-*/trial-2/result.json")
    ):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.2)
    assert any("trial-1" in p for p in sweep_processes(project))  # training
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out
    assert wait_until_gone(project, 10) == []  # no training goes on without the sweep
    (note,) = project.glob(".sweeps/lr-*/sweep.json")
    parent = json.loads(note.read_text())["run_id"]
    before = {r.data.tags["sweep.trial"]: r for r in sweep_runs(parent)}
    assert before["1"].info.status == "KILLED" and client().get_run(parent).info.status == "KILLED"
    assert before["2"].info.status == "FAILED"  # lr=10 diverged at once: that is its result

    again = sh(sys.executable, "-m", "flows.sweep", spec, "--parallel", "2", cwd=project, env=env)
    out = again.stdout + again.stderr
    assert "1 have a result from before, 1 to run" in out and "] started in" in out
    assert "train: resuming MLflow run" in next(project.glob(".sweeps/lr-*/trial-1/trial.log")).read_text()
    after = {r.data.tags["sweep.trial"]: r for r in sweep_runs(parent)}
    assert after["1"].info.run_id == before["1"].info.run_id and after["1"].info.status == "FINISHED"
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "best" in rows["1"] and "failed" in rows["2"] and "trial 2: train: training diverged" in out
    assert "best: trial 1 (lr=0.003)" in out
    assert client().get_run(parent).info.status == "FINISHED"

    # Every trial failing: one line, non-zero, and the same again (the failures are results).
    only = write(project, "diverge.yaml", "params:\n  train.epochs: 3\nspace:\n  train.lr: [10]\n")
    for _ in range(2):
        proc = sh(sys.executable, "-m", "flows.sweep", only, cwd=project, env=env, check=False)
        assert proc.returncode == 1
        assert one_line_error(proc).startswith("error: no trial of sweep diverge finished; the first error: train: ")
