"""Shared fixtures: a throwaway copy of the project in its own git repository.

Every test that writes works in such a copy (tasks read and write paths relative to the
project root), with its own MLflow store, so the real project folder is never touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks import STAGES, paths

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "tasks",
    "flows",
    "serve",
    "data/raw/README.md",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/offline-plots.html",
    ".dvcignore",
    ".gitignore",
    "prefect.yaml",
    "scripts",
    "sweeps",
    "requirements.lock",
]
REMOTE_URL = "~/.local/share/torch-pipeline/dvc-remote"  # .dvc/config's default remote
# Every file a stage writes: what a failure must leave byte-identical. The checkpoints are the one
# exception by design: a run writes them as it goes, so that the next run can resume from them.
OUTPUTS = [str(p) for stage in STAGES for p in paths.OUTPUTS[stage] if p != paths.CHECKPOINTS]

# Offline and isolated: no telemetry, no Prefect state in the user's home.
os.environ.update(
    {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-"),
    }
)
os.environ.pop("PREFECT_API_URL", None)


def sh(*cmd: str | Path, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit code, fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def set_param(project: Path, old: str, new: str) -> None:
    """Edit params.yaml as a user would: replace one line's text."""
    path = project / "params.yaml"
    text = path.read_text()
    assert old in text, f"{old!r} not in params.yaml"
    path.write_text(text.replace(old, new, 1))


def free_port() -> int:
    """A loopback port nobody listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(dest: Path, edits: dict[str, str] | None = None) -> Path:
    """Copy the project's code and config into `dest`, apply param edits, commit it all with git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for old, new in (edits or {}).items():
        set_param(dest, old, new)
    # The default DVC remote, in the user's home, becomes a folder beside the copy: changed where a
    # team would change it, in .dvc/config, and committed.
    config = dest / ".dvc/config"
    config.write_text(config.read_text().replace(REMOTE_URL, str(dest.parent / "dvc-remote")))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "project", cwd=dest)
    return dest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small, fast copy of the project (3 epochs), as the working directory."""
    path = make_project(tmp_path / "project", {"epochs: 30": "epochs: 3"})
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return path


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Each existing output's sha256, inode and modification time: unchanged means not rewritten at all."""
    out = {}
    for name in OUTPUTS:
        path = root / name
        if path.exists():
            st = path.stat()
            out[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


def leftovers(root: Path) -> list[str]:
    """Staging folders or temporary files left anywhere in the project."""
    skip = {".git", ".dvc", "mlruns"}
    found = []
    for path in root.rglob("*"):
        if skip & set(path.relative_to(root).parts):
            continue
        if path.name.endswith(".tmp") or ".tmp." in path.name:
            found.append(str(path.relative_to(root)))
    return found


def python(*args: str, cwd: Path, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS` with this interpreter, as a user runs an entry point."""
    return sh(sys.executable, *args, cwd=cwd, env=env, check=check)


def run_module(
    module: str, args: list[str], cwd: Path, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m MODULE ARGS`, and the top-level packages the process had imported when it exited.

    The names are written at exit to a file of their own, so the command's output is its own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        names = Path(tmp) / "imported"
        probe = (
            "import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(names)!r}, 'w').write('\\n'.join(sorted(sys.modules))))\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        )
        proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True)
        imported = {name.split(".")[0] for name in names.read_text().split()} if names.exists() else set()
    return proc, imported


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line an entry point prints for an expected failure (and nothing like a traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def start(*args: str, cwd: Path, env: dict | None = None, session: bool = False) -> subprocess.Popen:
    """Start `python ARGS` in the background, with Ctrl-C working even if this process ignores it.

    With `session`, in a process group of its own, as a terminal runs a command.
    """

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if session:
            os.setsid()

    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=prepare,
    )


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    """Read the process's output until a line contains `text`; return the lines read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    pytest.fail(f"{text!r} not seen; output:\n{''.join(seen)}")


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Make a file unwritable even for root (chattr +i); skip where the file system does not allow it."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def prefect_rest(url: str, path: str, body: dict | None = None):
    """A call to a Prefect server's REST API (GET, or POST with a JSON body); its JSON answer."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{url}/{path}", data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET",
    )  # fmt: skip
    # Prefect's server answers 503 while its SQLite database is busy (two workers and the scheduler
    # writing at once), and Prefect's own client retries it: so does this one.
    # On a loaded machine the database can stay busy for tens of seconds: up to about a minute here.
    attempts = 10
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == attempts - 1:
                raise
        except (ConnectionError, urllib.error.URLError):  # reset by the busy server: again, if only a read
            if attempt == attempts - 1 or not (body is None or path.endswith("/filter")):
                raise
        time.sleep(min(0.5 * 2**attempt, 8))


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect server for the whole session (each start costs 10-20 s on 2 cores)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project that has run every step once (3 epochs), with its MLflow store beside it."""
    from tasks import StepContext, run_stage
    from tasks.params import load

    tmp = tmp_path_factory.mktemp("trained")
    path = make_project(tmp / "project", {"epochs: 30": "epochs: 3"})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        params = load()
        for stage in STAGES:
            run_stage(stage, params, StepContext(tags={"orchestrator": "cli"}))
    return tmp


def clone(template: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of `template`/project (git, DVC cache, outputs) and `template`/mlflow.db, as the working directory."""
    shutil.copytree(template / "project", dest / "project", symlinks=True)
    shutil.copy2(template / "mlflow.db", dest / "mlflow.db")
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    note = dest / "project/models/train/run.json"  # the copy's note names the copy's store
    note.write_text(note.read_text().replace(f"sqlite:///{template / 'mlflow.db'}", uri))
    monkeypatch.chdir(dest / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return dest / "project"


@pytest.fixture
def trained(trained_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained project and its MLflow store, as the working directory."""
    return clone(trained_template, tmp_path, monkeypatch)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port; yields its URL without a database name.

    PostgreSQL refuses to run as root: under root the cluster belongs to `nobody`, in a folder of
    its own under /tmp (pytest's folders are closed to other users). Authentication is `trust`,
    which is safe on 127.0.0.1 of a test machine only.
    """
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="postgres-"))
    user = None
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("nobody").pw_uid
        os.chown(folder, user, -1)
    data, port = folder / "data", free_port()
    run = dict(capture_output=True, text=True, user=user, cwd=folder)
    try:
        made = subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], **run)
        assert made.returncode == 0, f"initdb failed: {made.stderr}"
        options = f"-h 127.0.0.1 -p {port} -k {folder}"
        started = subprocess.run(
            [pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"), "-o", options, "start"], **run
        )
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        assert started.returncode == 0, f"pg_ctl start failed: {started.stderr}{log}"
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
    finally:
        if data.is_dir():
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """A new, empty database in the cluster at `url` (as the `postgres` fixture yields it); its URL."""
    query(f"{url}/postgres", f'CREATE DATABASE "{name}"')
    return f"{url}/{name}"


def query(url: str, sql: str) -> list[tuple]:
    """Rows of one SQL statement against the database at `url` (none for a statement that returns none)."""
    import asyncio

    import asyncpg

    async def fetch() -> list[tuple]:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(fetch())
