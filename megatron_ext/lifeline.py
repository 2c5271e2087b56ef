"""Helper processes that die with the process that started them.

dist_checkpointing's writer helper (a multiprocessing Manager, see
`checkpointing._start_writer_helper_shielded`) is started with SIGTERM and SIGUSR1 blocked, so
that a Slurm signal to the whole job step cannot kill the save it asks for. The price: when the
trainer itself dies without running its exit handlers (kill -9, the OOM killer, a segfault)
the helper is re-parented to PID 1 and ignores the SIGTERM an operator sends it. Linux's
PR_SET_PDEATHSIG makes the kernel send the helper SIGKILL (which no mask blocks) the moment
its parent goes; elsewhere a daemon thread polls the parent's PID. The worker processes the
writer forks during a save get the same (a worker whose parent was killed mid-save otherwise
waits forever on a lock the parent held). multiprocessing's resource tracker needs nothing of
its own: it exits when the last process holding its pipe (the trainer and these) is gone.

Only the standard library is imported here: a spawned helper imports this module before it
serves, so it must be cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def die_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Run in a child (e.g. as a Manager's `initializer`): end this process when `parent_pid`,
    its parent, ends. The death signal follows the parent *thread* that started the child, so
    start helpers from the main thread."""
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True,
                         name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
