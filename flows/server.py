"""The Prefect server a flow run talks to: the one in PREFECT_API_URL, or the project's local one.

    python -m flows.server           # start the local server if it is not up; print its URL
    python -m flows.server --stop    # stop it

Without PREFECT_API_URL, `python -m flows.pipeline` uses a long-lived local server (state in
`.prefect/`, UI on http://127.0.0.1:4200), starting it in the background the first time. Prefect's
alternative, a temporary server per process, costs 9-14 s on every run, keeps no history for the
UI, and outlives a flow process that is killed; one reused server has none of these problems.

Light on purpose: this runs before Prefect is imported, so PREFECT_API_URL is set in time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.errors import ServerError
from tasks.files import pid_alive

STARTUP_SECONDS = 120


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


def _prefect(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=STARTUP_SECONDS)


def ensure_server() -> str:
    """The API URL to use, with PREFECT_API_URL (and PREFECT_HOME) set for this process."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not healthy(url):
            raise ServerError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer; start it, or unset "
                "PREFECT_API_URL to use the project's local server"
            )
        return url
    home, url = local_home(), local_url()
    os.environ["PREFECT_HOME"], os.environ["PREFECT_API_URL"] = str(home), url
    if healthy(url):
        return url
    port = url.rsplit(":", 1)[1].split("/")[0]
    print(f"starting a local Prefect server on http://127.0.0.1:{port} (state in {home})", file=sys.stderr)
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "server.pid"
    stale = pid_file.read_text().strip() if pid_file.exists() else ""
    if stale and not (stale.isdigit() and pid_alive(int(stale))):
        pid_file.unlink(missing_ok=True)  # left by a server that was killed; Prefect would refuse to start
    started = _prefect(
        "server", "start", "--host", "127.0.0.1", "--port", port, "--analytics-off", "--background", home=home
    )
    said = (started.stderr.strip() or started.stdout.strip()).splitlines()
    if started.returncode != 0 and not any("already running" in line for line in said):
        raise ServerError(f"cannot start a local Prefect server on port {port}: {said[-1] if said else 'no output'}")
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if healthy(url):
            return url
        time.sleep(0.5)
    raise ServerError(f"the local Prefect server did not answer on {url} within {STARTUP_SECONDS} s; see {home}")


def stop_server() -> None:
    home = local_home()
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
