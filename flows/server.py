"""The Prefect server a flow run talks to: the configured one, or the project's local one.

    python -m flows.server           # start the local server if it is not up; print its URL
    python -m flows.server --stop    # stop it

A server is configured by PREFECT_API_URL, in the environment or in the active Prefect profile
(`prefect config set PREFECT_API_URL=...`). Without one, `python -m flows.pipeline` uses a
long-lived local server (state in `.prefect/`, its output in `.prefect/server.log`, UI on
http://127.0.0.1:4200, `PREFECT_PORT` to change), started in the background the first time, in
a session of its own so that Ctrl-C on the flow or a closed terminal does not stop it.
Prefect's alternative, a temporary server per process, costs 9-14 s on every run, keeps no
history for the UI, and outlives a flow process that is killed; one reused server has none of
these problems.

Light on purpose: this runs before Prefect is imported, so PREFECT_API_URL is set in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import ServerError
from tasks.files import process_alive

STARTUP_SECONDS = 120
LOG = "server.log"  # the local server's output, in PREFECT_HOME


def healthy(api_url: str) -> bool:
    try:
        urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=2).close()
    except OSError:
        return False
    return True


def local_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path(".prefect").resolve())


def local_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('PREFECT_PORT', '4200')}/api"


def configured_url() -> str | None:
    """PREFECT_API_URL from the environment, or else from the active Prefect profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return url if isinstance(url, str) and url else None


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    # Where the UI in the browser finds the API: on PREFECT_PORT, not Prefect's default port 4200.
    env.setdefault("PREFECT_UI_API_URL", local_url())
    return env


def _prefect(*args: str, home: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            env=_env(home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STARTUP_SECONDS,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"`prefect {' '.join(args)}` did not return within {STARTUP_SECONDS} s; see {home}") from None


def _start(port: str, home: Path, pid_file: Path) -> subprocess.Popen:
    """`prefect server start` in a session of its own, its output appended to `home`/server.log.

    Not `prefect server start --background`: that gives the server pipes for its output which
    nobody reads once the starting command has exited, so whatever the server says later (a
    warning, an error before it stops) is lost, or fails to be written. The pid file is the one
    `prefect server stop` reads.
    """
    with open(home / LOG, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--analytics-off",
            ],
            env=_env(home),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server must not share the flow's Ctrl-C or terminal
        )
    pid_file.write_text(str(proc.pid))
    return proc


def _stale_pid_file(pid_file: Path) -> bool:
    """A pid file whose server is gone: its process died (or its pid now belongs to something else)."""
    try:
        text = pid_file.read_text().strip()
        age = time.time() - pid_file.stat().st_mtime
    except OSError:
        return False
    if not text:
        return age > 10  # the starter (ensure_server) writes the pid right after creating the file
    if not text.isdigit() or not process_alive(text):
        return True
    try:
        return b"prefect" not in Path(f"/proc/{text}/cmdline").read_bytes()
    except OSError:
        return False


def ensure_server() -> str:
    """The API URL to use, with PREFECT_API_URL (and, for the local server, PREFECT_HOME) set for this process."""
    url = configured_url()
    if url:
        if not healthy(url):
            raise ServerError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer; start it, or unset PREFECT_API_URL "
                "(environment or Prefect profile) to use the project's local server"
            )
        os.environ["PREFECT_API_URL"] = url
        return url
    home, url = local_home(), local_url()
    os.environ["PREFECT_HOME"], os.environ["PREFECT_API_URL"] = str(home), url
    if healthy(url):
        return url
    port = url.rsplit(":", 1)[1].split("/")[0]
    print(f"starting a local Prefect server on http://127.0.0.1:{port} (state in {home})", file=sys.stderr)
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "server.pid"
    if _stale_pid_file(pid_file):
        pid_file.unlink(missing_ok=True)  # left by a server that was killed; Prefect would refuse to start
    try:
        pid_file.touch(exist_ok=False)  # one starter at a time: another process may be starting it now
    except FileExistsError:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if healthy(url):
                return url
            time.sleep(0.5)
        raise ServerError(
            f"a Prefect server is starting or running from {home} (pid file {pid_file}), but none answers on "
            f"{url}: stop it with `python -m flows.server --stop`, or remove {pid_file}, and run again"
        ) from None
    mark = (home / LOG).stat().st_size if (home / LOG).exists() else 0
    proc = _start(port, home, pid_file)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if healthy(url):
            return url
        if proc.poll() is not None:  # it stopped: the port was taken, or Prefect could not start
            pid_file.unlink(missing_ok=True)
            with open(home / LOG, "rb") as f:
                f.seek(mark)
                said = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
            if any("already in use" in line or "already running on port" in line for line in said):
                raise ServerError(
                    f"port {port} is taken by another program; choose a free one with PREFECT_PORT=<port>"
                )
            raise ServerError(
                f"cannot start a local Prefect server on port {port}: {said[-1] if said else 'no output'} "
                f"(see {home / LOG})"
            )
        time.sleep(0.5)
    raise ServerError(f"the local Prefect server did not answer on {url} within {STARTUP_SECONDS} s; see {home / LOG}")


@contextlib.contextmanager
def without_heartbeats() -> Iterator[None]:
    """A flow run started from the command line sends no Prefect heartbeats, unless they are configured.

    Prefect's flow run sends one every 180 s from a thread that sleeps in steps of 1 s, and the flow
    run's end waits for that sleep: 0.5 s on average, up to 1 s, at the end of every run. Heartbeats
    only let an automation (none on the local server) mark Crashed a flow run whose process died; the
    pipeline and the sweep close those themselves (`close_crashed_flow_runs`: the next flow run in the
    checkout, by process id). PREFECT_FLOWS_HEARTBEAT_FREQUENCY, in the environment or the Prefect
    profile, turns them on. A deployment's runs, which a worker starts, keep Prefect's setting.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def close_crashed_flow_runs() -> None:
    """Mark Crashed the flow runs of this checkout that a kill left RUNNING: no process is left to end them.

    Called by the pipeline and the sweep flow as they start. Each flow run is tagged with its
    checkout (a hash of host and path) and its process id; a RUNNING one, pipeline or sweep, whose
    process is gone was killed (SIGKILL, out of memory, power). A live process's run is never touched.
    """
    import hashlib

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    from tasks.tracking import process_tags

    ident = process_tags()  # the same host, checkout and process identity as the MLflow run's tags
    where = f"{ident['pipeline.host']}:{ident['pipeline.checkout']}"
    checkout = "checkout:" + hashlib.sha256(where.encode()).hexdigest()[:12]
    with get_client(sync_client=True) as client:
        me = client.read_flow_run(flow_run.id)
        client.update_flow_run(me.id, tags=sorted({*me.tags, checkout, f"pid:{ident['pipeline.pid']}"}))
        running = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[checkout]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            )
        )
        for run in running:
            pid = next((t.removeprefix("pid:") for t in run.tags if t.startswith("pid:")), "")
            if run.id == me.id or (pid and process_alive(pid)):
                continue
            message = "its process was killed; closed by the next flow run in this checkout"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            print(f"marked Prefect flow run '{run.name}' Crashed: its process ({pid.split('-')[0]}) was killed")


def stop_server() -> None:
    home = local_home()
    pid_file = home / "server.pid"
    if _stale_pid_file(pid_file):  # never signal a process that merely inherited the pid
        pid_file.unlink(missing_ok=True)
    proc = _prefect("server", "stop", home=home)
    said = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    print(said[-1] if said else f"stopped the Prefect server of {home}")


def main() -> None:
    from tasks.cli import user_errors

    p = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--stop", action="store_true", help="stop the project's local Prefect server")
    args = p.parse_args()
    with user_errors():
        if args.stop:
            stop_server()
        else:
            print(ensure_server().removesuffix("/api"))


if __name__ == "__main__":
    main()
