"""What a short run costs besides its training: the flow and `dvc repro` against a bare script doing the same job.

Run from the repository root, in the project's environment:

    source scripts/env.sh
    python benchmarks/startup.py                  # 3 rounds
    python benchmarks/startup.py --rounds 5 --json out.json

In a fresh clone of this checkout (a temporary folder: nothing here changes), with its own local
Prefect server started and warmed up first (one flow run that is not counted), it alternates, round
by round:

- "bare": `benchmarks/seed_script.py`, the seed's whole job in one process (digits, split, the
  default CNN for 30 epochs with validation, test accuracy, `torch.save` and TorchScript);
- "flow": `python -m flows.pipeline --force`, the default params, every step;
- "repro": `dvc repro --force`, the same stages, one process each.

Then a no-op `dvc repro` (nothing changed: DVC only checks), and `--help` of every entry point.
Each run's CPU time is counted too: every process it started and waited for (the flow's export
check and git included), and for the flow the local Prefect server's share, read from /proc. On
a machine of N cores no run can finish in less than its CPU time / N, whatever runs side by side:
the report gives that floor as a ratio to the bare script, next to the measured one. The bare
script's and the flow's main thread are counted apart (read from /proc as the process exits): what
one thread does is serial, and threads of the same process cannot take Python work over from it
(the GIL), so on any number of cores that run takes at least its main thread's CPU time.

Each step's time is read from the output as it arrives (see `timed`): the flow's `[k/6 stage]`
lines, DVC's `Running stage` lines. "start" is the time before the first step (the flow's imports,
server check and flow start; DVC's start), "end" the flow's time after its last step (the push, the
results, the exit); under DVC the last stage runs to the exit. Medians of the rounds; the first flow run is the
warm-up. Targets (issue 12): the flow at most 1.6x the bare
script, a full `dvc repro` at most 4x, a no-op `dvc repro` under 1 s, every `--help` under 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "build", "train", "evaluate", "export", "promote")
ENTRY_POINTS = (
    "tasks",
    "tasks.reproduce",
    "tasks.lineage",
    "flows.pipeline",
    "flows.sweep",
    "flows.score",
    "flows.server",
    "serve.predict",
    "serve.http",
)
FLOW_LINE = re.compile(r"\[\d+/\d+ (\w+)\]")
DVC_LINE = re.compile(r"Running stage '(\w+)'")


class Timed(NamedTuple):
    wall: float  # seconds
    stages: dict  # seconds per step, and before and after them
    output: str
    cpu: float  # user and system seconds of the command and of every process it waited for
    main_cpu: float  # those of the command's main thread alone


def timed(command: list[str], cwd: Path, env: dict, pattern: re.Pattern | None = None) -> Timed:
    """Run `command`; its wall time, steps, output and CPU time.

    A step's lines are those `pattern` names it in. For the flow (steps that print only when they
    end) a step runs from the previous step's last line to its own last line, the first from the
    flow run's "Beginning flow run" line; for DVC (which names a stage as it starts it) from its
    first line to the next stage's.
    """
    cpu_before = children_cpu()
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    begun = None
    lines = []
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line)
            if begun is None and "Beginning flow run" in line:
                begun = now
            match = pattern.search(line) if pattern else None
            if match and match[1] in STAGES:
                first.setdefault(match[1], now)
                last[match[1]] = now
        if hasattr(os, "waitid"):  # Python 3.11 has none on macOS (nor /proc: the count is 0 there)
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its /proc stat stays
        main_cpu = thread_cpu(proc.pid)
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu_before
    output = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{output[-3000:]}")
    stages: dict[str, float] = {}
    order = [stage for stage in STAGES if stage in first]
    if not order:
        return Timed(wall, stages, output, cpu, main_cpu)
    if pattern is FLOW_LINE:
        edges = [begun if begun is not None else first[order[0]]] + [last[stage] for stage in order]
    else:
        edges = [first[stage] for stage in order] + [wall]
    stages["start"] = edges[0]
    for stage, (at, until) in zip(order, zip(edges, edges[1:], strict=False), strict=True):
        stages[stage] = until - at
    stages["end"] = wall - edges[-1]
    return Timed(wall, stages, output, cpu, main_cpu)


def children_cpu() -> float:
    """User and system seconds of this process's children (and theirs) that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid_file: Path) -> float:
    """User and system seconds so far of the process whose id `pid_file` holds (the local Prefect server), or 0."""
    try:
        return stat_cpu(Path(f"/proc/{int(pid_file.read_text())}/stat"))
    except (OSError, ValueError):
        return 0.0


def thread_cpu(pid: int) -> float:
    """User and system seconds of process `pid`'s main thread (the thread whose id is the process's), or 0."""
    return stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def stat_cpu(stat: Path) -> float:
    """User and system seconds from a /proc `stat` file, or 0 if it cannot be read."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in clock ticks
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_model() -> str:
    """`Intel(R) Xeon(R) Processor`, `AMD EPYC ...`: platform.processor() says only x86_64 on Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds (default 3)")
    parser.add_argument("--port", default="4299", help="the clone's local Prefect server port (default 4299)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    env = {**os.environ, "PREFECT_PORT": args.port, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    py = sys.executable
    runs = (
        *("bare", "flow", "repro", "flow_stages", "repro_stages"),
        *("bare_cpu", "flow_cpu", "server_cpu", "repro_cpu", "bare_main_cpu", "flow_main_cpu"),
    )
    results: dict = {key: [] for key in runs}
    server_pid = repo / ".prefect" / "server.pid"
    try:
        subprocess.run([py, "-m", "flows.server"], cwd=repo, env=env, check=True, capture_output=True)
        print("warm-up: a first flow run (not counted)", flush=True)
        timed([py, "-m", "flows.pipeline", "--force"], repo, env)
        for n in range(1, args.rounds + 1):
            bare = timed([py, str(ROOT / "benchmarks" / "seed_script.py"), str(tmp / "seed-out")], repo, env)
            server_before = process_cpu(server_pid)
            flow = timed([py, "-m", "flows.pipeline", "--force"], repo, env, FLOW_LINE)
            server = process_cpu(server_pid) - server_before
            flow_cpu = flow.cpu + server  # the flow's share of the server's work counts as the flow's
            repro = timed(["dvc", "repro", "--force"], repo, env, DVC_LINE)
            for key, value in (
                ("bare", bare.wall),
                ("flow", flow.wall),
                ("repro", repro.wall),
                ("flow_stages", flow.stages),
                ("repro_stages", repro.stages),
                ("bare_cpu", bare.cpu),
                ("flow_cpu", flow_cpu),
                ("server_cpu", server),
                ("repro_cpu", repro.cpu),
                ("bare_main_cpu", bare.main_cpu),
                ("flow_main_cpu", flow.main_cpu),
            ):
                results[key].append(value)
            print(
                f"round {n}: bare {bare.wall:.1f} s, flow {flow.wall:.1f} s ({flow.wall / bare.wall:.2f}x), "
                f"dvc repro {repro.wall:.1f} s ({repro.wall / bare.wall:.2f}x); CPU bare {bare.cpu:.1f} "
                f"(main thread {bare.main_cpu:.1f}), flow {flow_cpu:.1f} (main thread {flow.main_cpu:.1f}, "
                f"server {server:.1f}), dvc repro {repro.cpu:.1f} core-s",
                flush=True,
            )
        results["noop"] = [timed(["dvc", "repro"], repo, env).wall for _ in range(3)]
        results["help"] = {
            module: statistics.median(timed([py, "-m", module, "--help"], repo, env).wall for _ in range(3))
            for module in ENTRY_POINTS
        }
    finally:
        subprocess.run([py, "-m", "flows.server", "--stop"], cwd=repo, env=env, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    bare, flow, repro = (statistics.median(results[k]) for k in ("bare", "flow", "repro"))
    now = datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    print(f"\n{now}, {machine}, {cores} CPUs; medians of {args.rounds} rounds")
    print(f"bare script      {bare:6.1f} s")
    print(f"flow (--force)   {flow:6.1f} s   {flow / bare:.2f}x the bare script (target 1.6x)")
    print(f"dvc repro -f     {repro:6.1f} s   {repro / bare:.2f}x (target 4x)")
    print(f"no-op dvc repro  {statistics.median(results['noop']):6.2f} s   (target < 1 s)")
    print(f"\nCPU time, core-seconds, and the least wall time it allows on {cores} cores (CPU / {cores}):")
    for key, label in (("bare", "bare script"), ("flow", "flow (--force)"), ("repro", "dvc repro -f")):
        cpu = statistics.median(results[f"{key}_cpu"])
        extra = f" (Prefect server {statistics.median(results['server_cpu']):.1f})" if key == "flow" else ""
        floor = cpu / cores
        print(f"  {label:16} {cpu:6.1f}{extra:26} at least {floor:5.1f} s = {floor / bare:.2f}x the bare script")
    print("\nCPU time of the main thread alone, core-seconds: at least this long on any number of cores")
    for key, label in (("bare", "bare script"), ("flow", "flow (--force)")):
        serial = statistics.median(results[f"{key}_main_cpu"])
        print(f"  {label:16} {serial:6.1f}{'':26} at least {serial:5.1f} s = {serial / bare:.2f}x the bare script")
    print("\nper step, seconds   flow   dvc repro")
    for stage in ("start", *STAGES, "end"):
        cells = []
        for key in ("flow_stages", "repro_stages"):
            values = [r[stage] for r in results[key] if stage in r]
            cells.append(f"{statistics.median(values):6.1f}" if values else "     -")
        print(f"  {stage:16} {cells[0]}   {cells[1]}")
    print("\n--help, seconds (target < 0.3)")
    for module, seconds in results["help"].items():
        print(f"  python -m {module:16} {seconds:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"date": now, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
