"""Make an MLflow run again from its id, and compare: `python -m tasks.reproduce RUN_ID`.

    python -m tasks.reproduce 1f2e3d...               # reproduce it, compare, remove the worktree
    python -m tasks.reproduce 1f2e3d... --keep DIR    # keep the reproduction's checkout in DIR

It restores what made the run, each from where it is kept:

- the code: a git worktree at the run's commit (`mlflow.source.git.commit`), beside this checkout;
- the params: the run's own `params/params.yaml` artifact, overrides included;
- the data: the DVC-tracked inputs at that commit (`*.dvc` files), from this checkout's DVC cache
  or else its default remote, and the run's `dvc.lock` (its `lineage/dvc.lock` artifact);

then runs every stage but promote there (`dvc repro --force evaluate export`: promote would
register the copy), into the same MLflow store and experiment. The new run is named like
the first with "(reproduction)" and tagged `reproduction.of` (the first run's id) and
`reproduction.result`. Last it prints a comparison: the params hash, each data set's DVC hash, each
stage's dependencies, every metric, the weights' hash and every output `dvc.lock` records, each
identical or with both values.

Exit code 0 when everything is identical and the run was made from a clean checkout; 11 when
something differs, or when the run was made with uncommitted changes (then the commit cannot be
exactly what ran: the run is "not exactly reproducible"); the usual codes (tasks/errors.py) when
it cannot be reproduced at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.cli import stop_on_sigterm, user_errors
from tasks.errors import InputError, NotReproducedError, PipelineError

RUN_NOTE = "models/train/run.json"  # where the worktree's train step notes its MLflow run (tasks.paths.RUN_NOTE)
# What a reproduction runs, with every stage before them: all but promote, which would register the copy.
TARGETS = ("evaluate", "export")


@dataclass
class Check:
    """One line of the comparison."""

    what: str
    same: bool
    detail: str


def _git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _dvc(*args: str, cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=capture, text=True)


def absolute_uri(uri: str) -> str:
    """The tracking URI as seen from any folder: a relative SQLite path made absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def the_run(run_id: str) -> tuple[Any, str]:
    """The run, and its experiment's name."""
    from tasks import tracking

    run = tracking.get_run(run_id)
    with tracking.store():
        return run, tracking.client().get_experiment(run.info.experiment_id).name


def artifact_text(run_id: str, path: str, why: str) -> str:
    from tasks import tracking

    c = tracking.client()
    with tracking.store(), tempfile.TemporaryDirectory() as tmp:
        folder = path.rsplit("/", 1)[0]
        if not any(a.path == path for a in c.list_artifacts(run_id, folder)):
            raise InputError(f"run {run_id} has no artifact {path}: {why}")
        return Path(c.download_artifacts(run_id, path, tmp)).read_text()


def dirty_reason(tags: dict[str, str]) -> str | None:
    """Why the commit is not exactly what ran, or None when it is."""
    uncommitted = tags.get("git.uncommitted")
    if uncommitted:  # "" when only params.yaml differed: the run logged those, and they are restored
        return f"it was made with uncommitted changes to {uncommitted}"
    if uncommitted is None and tags.get("git.dirty") != "false":  # older runs: git.dirty alone
        return f"its checkout differed from its commit (git.dirty {tags.get('git.dirty', 'missing')})"
    return None


def prepare_worktree(run: Any, dest: Path) -> str:
    """A worktree at the run's commit in `dest`, with its params and dvc.lock, sharing this checkout's DVC cache;
    returns the run's dvc.lock."""
    from tasks.lineage import _cache

    run_id = run.info.run_id
    commit = run.data.tags.get("mlflow.source.git.commit", "unknown")
    if commit == "unknown":
        raise InputError(f"run {run_id} has no commit (it was not made in a git checkout): nothing to restore")
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise InputError(
            f"commit {commit[:12]} of run {run_id} is not in this clone: `git fetch` the branch it is on "
            "(or push it from where the run was made), then run again"
        )
    params = artifact_text(run_id, "params/params.yaml", "it was not made by the train step")
    lock = artifact_text(run_id, "lineage/dvc.lock", "its promote step did not run (`dvc repro promote`)")
    _git("worktree", "prune")  # those of reproductions that were killed
    made = _git("worktree", "add", "--detach", str(dest), commit)
    if made.returncode != 0:
        raise InputError(f"git worktree add {dest} {commit[:12]} failed: {made.stderr.strip()}")
    (dest / "params.yaml").write_text(params)
    (dest / "dvc.lock").write_text(lock)
    # The data and models are content-addressed: one cache serves both checkouts, and what the
    # reproduction makes is there for `tasks.lineage --restore` after its worktree is gone.
    steps = [("config", "--local", "cache.dir", str(Path(_cache().path).resolve()))]
    from dvc.repo import Repo

    with Repo(".") as repo:
        name = repo.config["core"].get("remote")
        if name:  # where the data is now, which may not be where it was at the commit
            url = repo.config["remote"][name]["url"]
            steps.append(("remote", "add", "--local", "--force", "--default", name, url))
    for step in steps:
        done = _dvc(*step, cwd=dest)
        if done.returncode != 0:
            raise InputError(f"dvc {' '.join(step)} in {dest} failed: {done.stderr.strip()}")
    return lock


def pull_inputs(dest: Path) -> list[str]:
    """`dvc pull` the DVC-tracked inputs of the commit (its `*.dvc` files); the files pulled."""
    tracked = [p for p in _git("ls-files", "*.dvc", cwd=dest).stdout.splitlines() if p]
    if not tracked:
        return []
    pulled = _dvc("pull", *tracked, cwd=dest)
    if pulled.returncode != 0:
        reason = " ".join(pulled.stderr.split())[-400:]
        raise InputError(
            f"the run's data ({', '.join(tracked)}) could not be restored from the DVC cache or remote: {reason}; "
            "`dvc push` it from a checkout that has it"
        )
    return tracked


def run_pipeline(dest: Path, uri: str, experiment: str) -> None:
    """Every stage up to export, in the worktree, logging to the same store and experiment."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    print(f"reproduce: dvc repro --force {' '.join(TARGETS)} in {dest}", flush=True)
    # In a session of its own, so that a Ctrl-C or SIGTERM here reaches every process of it, once.
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--force", *TARGETS], cwd=dest, env=env, start_new_session=True
    )
    try:
        code = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the step marks its MLflow run KILLED
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # and the stage's own process, which outlives dvc by a moment
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        raise
    if code != 0:
        raise PipelineError(f"the reproduction's `dvc repro` failed (exit {code}); see its output above")


def compare(first: Any, second: Any, old_lock: str, new_lock: str) -> list[Check]:
    """The first run against its reproduction: params, data, stages' dependencies, metrics, weights, outputs."""
    from tasks.lineage import lock_hashes

    checks = []
    a, b = first.data.tags, second.data.tags
    key = "lineage.params_sha256"
    checks.append(Check("params", a.get(key) == b.get(key), f"sha256 {_pair(a.get(key), b.get(key))}"))

    def datasets(run: Any) -> dict[str, str]:
        return {d.dataset.name: d.dataset.digest for d in (run.inputs.dataset_inputs if run.inputs else [])}

    da, db = datasets(first), datasets(second)
    for name in [*da, *(n for n in db if n not in da)]:
        if name not in da:  # an older run's step did not log it: nothing to compare with
            checks.append(Check(f"data {name}", True, f"md5 {db[name][:12]} (the run did not record it)"))
        else:
            checks.append(Check(f"data {name}", da[name] == db.get(name), f"md5 {_pair(da[name], db.get(name))}"))
    old, new = lock_hashes(old_lock), lock_hashes(new_lock)
    for stage in [s for s in old if s != "promote"]:  # promote is not reproduced: it would register the copy
        deps = [k for k in old[stage].keys() | new.get(stage, {}).keys() if k.startswith("deps:")]
        differ = sorted(k[5:] for k in deps if old[stage].get(k) != new.get(stage, {}).get(k))
        detail = (
            f"{len(deps)} files and folders"
            if not differ
            else "differ: "
            + ", ".join(
                f"{p} {_pair(old[stage].get('deps:' + p), new.get(stage, {}).get('deps:' + p))}" for p in differ
            )
        )
        checks.append(Check(f"{stage} inputs", not differ, detail))
    ma, mb = first.data.metrics, second.data.metrics
    keys = sorted(ma)  # those the run has; a newer commit's extra metrics are no difference
    differ = [k for k in keys if ma.get(k) != mb.get(k)]
    shown = ", ".join(f"{k} {ma[k]:.4f}" for k in ("test/accuracy", "test/f1_macro") if k in ma)
    detail = (
        f"{len(keys)} of {len(keys)}, {shown}"
        if not differ
        else "differ: "
        + ", ".join(f"{k} {_pair(ma.get(k), mb.get(k))}" for k in differ[:8])
        + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    )
    checks.append(Check("metrics", not differ, detail))
    key = "train.best_sha256"
    checks.append(Check("weights", a.get(key) == b.get(key), f"sha256 {_pair(a.get(key), b.get(key))}"))
    outs = sorted(
        {k for s in old if s != "promote" for k in old[s] if k.startswith("outs:")}
        | {k for s in new for k in new[s] if k.startswith("outs:")}
    )
    flat_old = {k: v for s in old.values() for k, v in s.items()}
    flat_new = {k: v for s in new.values() for k, v in s.items()}
    differ = [k[5:] for k in outs if flat_old.get(k) != flat_new.get(k)]
    detail = (
        f"{len(outs)} of {len(outs)} (dvc.lock's md5)"
        if not differ
        else "differ: "
        + ", ".join(f"{p} {_pair(flat_old.get('outs:' + p), flat_new.get('outs:' + p))}" for p in differ)
    )
    checks.append(Check("outputs", not differ, detail))
    return checks


def _pair(a: Any, b: Any) -> str:
    """One value when both are equal; else `<first> (run) / <second> (reproduction)`."""

    def short(v: Any) -> str:
        if v is None:
            return "none"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)[:12]

    return short(a) if a == b else f"{short(a)} (run) / {short(b)} (reproduction)"


def reproduce(run_id: str, keep: Path | None) -> tuple[list[Check], str | None, str]:
    """Reproduce the run; (the comparison, why it is not exactly reproducible or None, the new run's id)."""
    from tasks import tracking

    first, experiment = the_run(run_id)
    if original := first.data.tags.get("reproduction.of"):
        raise InputError(f"run {run_id} is itself a reproduction, of run {original}: reproduce that one")
    dirty = dirty_reason(first.data.tags)
    commit = first.data.tags.get("mlflow.source.git.commit", "unknown")
    print(f"reproduce: run {run_id} '{first.info.run_name}', commit {commit[:12]}", flush=True)
    if dirty:
        print(f"reproduce: not exactly reproducible: {dirty}; the commit runs as committed", flush=True)
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise InputError(f"--keep {keep}: the folder is not empty; name a new or empty one")
    if keep is not None and keep.resolve().is_relative_to(Path.cwd().resolve()):
        raise InputError(f"--keep {keep}: the folder is inside this checkout; name one outside it")
    dest = keep.resolve() if keep is not None else Path(tempfile.mkdtemp(prefix=f"reproduce-{run_id[:8]}-"))
    if keep is None:
        dest.rmdir()  # git worktree add makes it
    look = False  # whether a failure leaves something in the worktree worth a look
    try:
        lock = prepare_worktree(first, dest)
        if pulled := pull_inputs(dest):
            print(f"reproduce: data restored: {', '.join(pulled)}", flush=True)
        try:
            run_pipeline(dest, absolute_uri(tracking.tracking_uri()), experiment)
        except PipelineError:
            look = True
            raise
        second_id = json.loads((dest / RUN_NOTE).read_text())["run_id"]
        second, _ = the_run(second_id)
        checks = compare(first, second, lock, (dest / "dvc.lock").read_text())
        same = all(c.same for c in checks)
        result = "identical" if same and not dirty else "differs" if not same else "not exactly reproducible"
        tracking.set_tags(
            second_id,
            {
                "reproduction.of": run_id,
                "reproduction.result": result,
                "mlflow.runName": f"{first.info.run_name} (reproduction)",
                # a link within the UI (the description is Markdown)
                "mlflow.note.content": f"A reproduction of run [{run_id}](#/experiments/{first.info.experiment_id}"
                f"/runs/{run_id}) ({first.info.run_name}) at commit {commit[:12]}: {result}.",
            },
        )
        return checks, dirty, second_id
    finally:
        if keep is None and look:  # a stage failed there: its files, to look into
            print(f"reproduce: the worktree is kept at {dest} (`git worktree remove --force {dest}`)", flush=True)
        elif keep is None and dest.exists():
            _git("worktree", "remove", "--force", str(dest))


def show(checks: list[Check], dirty: str | None, run_id: str, second_id: str) -> str:
    from tasks import tracking

    lines = [f"reproduction {second_id} of run {run_id}:"]
    lines += [f"  {c.what:<24} {'identical' if c.same else 'DIFFERS':<10} {c.detail}" for c in checks]
    differ = [c.what for c in checks if not c.same]
    if differ:
        lines.append(f"result: differs ({', '.join(differ)})")
    elif dirty:
        lines.append(f"result: identical to the run, but not exactly reproducible: {dirty}")
    else:
        lines.append("result: identical")
    with contextlib.suppress(PipelineError):  # a link is not worth an error
        lines.append(f"MLflow: {tracking.run_url(second_id)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("run_id", help="the MLflow run id (the run page's URL and `python -m tasks.lineage` show it)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="make the worktree in DIR and keep it (default: removed)")
    args = p.parse_args(argv)
    stop_on_sigterm()
    with user_errors("reproduce: "):
        if _git("rev-parse", "--show-toplevel").returncode != 0 or not Path("dvc.yaml").is_file():
            raise InputError(f"{Path.cwd()} is not the project's git checkout: run this from the project's root")
        checks, dirty, second_id = reproduce(args.run_id, args.keep)
        print(show(checks, dirty, args.run_id, second_id))
        if dirty or not all(c.same for c in checks):
            raise NotReproducedError("the reproduction is not identical to the run (see above)")


if __name__ == "__main__":
    shutil.which("git") or sys.exit("error: git is not installed; reproduce needs it for the worktree")
    main()
