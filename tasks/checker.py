"""The fresh Python process in which export loads its files back, and how it is started ahead of time.

The process has only torch: `python -I` (no user site, no PYTHONPATH), run from the file system
root, so the project's model code cannot be imported and the files must stand on their own. Its
imports (torch, then torch.export's loader, which brings in torch._dynamo) take about 3 s, which
the export would otherwise wait for. So `start_ahead()` starts it early: the stage process does it
before its own imports (`python -m tasks export`), the pipeline flow when its first step runs,
while this machine's other core is idle. The process imports, then waits for its inputs on stdin;
`run()` takes it (once) or starts one if none is waiting, sends the files' paths and the check's
tensors, and reads the result. An unused one is stopped by `stop_ahead()` or at exit.

Light on purpose: nothing here imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

# Runs in the fresh process. It imports first, then reads (from stdin, no temp file) the two paths,
# the inputs and the eager model's outputs; nothing on stdin (its parent went away) ends it quietly.
SCRIPT = """
import io, json, os, sys, warnings
import torch
# What torch.export.load imports on its first call (its archive reader; functorch's autograd, which
# brings sympy and networkx: 0.3 s), imported here while the parent works.
for name in ("torch.export.pt2_archive._package", "torch._functorch.aot_autograd"):
    try:
        __import__(name)
    except ImportError:
        pass
warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript deprecation
data = sys.stdin.buffer.read()
if not data:
    sys.exit(0)
ts, pt2, x, expected = torch.load(io.BytesIO(data), weights_only=True).values()
models = {"torchscript": torch.jit.load(ts), "torch_export": torch.export.load(pt2).module()}
out = {}
with torch.no_grad():
    for name, model in models.items():
        out[name] = (model(x) - expected).abs().max().item()
print(json.dumps(out))
# Exit at once: nothing here needs cleaning up, and torch's shutdown takes longer than the check.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

_ahead: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-I", "-c", SCRIPT],
        cwd=os.sep,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def start_ahead() -> None:
    """Start the checking process now, unless one is already waiting; `run()` will use it."""
    global _ahead
    if _ahead is None or _ahead.poll() is not None:
        _ahead = _start()


def stop_ahead() -> None:
    """Stop a checking process that was started ahead and not used (the export did not run, or failed before)."""
    global _ahead
    proc, _ahead = _ahead, None
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.communicate()


atexit.register(stop_ahead)


def run(data: bytes, timeout: float) -> subprocess.CompletedProcess:
    """Send `data` (torch.save of ts, pt2, x, expected) to a fresh process; its exit code, stdout and stderr.

    Raises `subprocess.TimeoutExpired` (the process killed) when it takes over `timeout` seconds.
    """
    global _ahead
    proc, _ahead = _ahead, None
    if proc is None or proc.poll() is not None:
        proc = _start()
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
