"""Worker processes that a Ctrl-C in the terminal does not reach.

Decoding (`sources.decode_folder`) and `DataLoader` workers run in processes started by
multiprocessing's forkserver, not by a plain fork: the parent holds torch's thread pools and, in
the Prefect flow, threads of its own, which a fork would copy in an unknown state. A Ctrl-C goes
to every process of the terminal's group; workers caught mid-start by it die with a traceback
each, and the pool that loses them can fail with a second one. So the forkserver is started
with SIGINT ignored, which every worker it forks inherits: the parent alone gets the Ctrl-C, and
stops its workers cleanly.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing import forkserver


def forkserver_context() -> multiprocessing.context.BaseContext:
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return multiprocessing.get_context("forkserver")
