"""Child processes that end with their parent: the ``zoa test`` runs of ``zoa compare``."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import threading
from typing import Any

__all__ = ["ChildProcesses"]


class ChildProcesses:
    """The ``zoa test`` processes a comparison started: each dies with it (Linux), and :meth:`stop` ends them all."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def run(self, command: list[str], stdout: Any = None, env: dict[str, str] | None = None) -> int:
        """Run ``command`` to its end (its output to ``stdout``, else the terminal); returns its exit status.

        Raises:
            RuntimeError: after :meth:`stop` (no new child starts).
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("the comparison was stopped: no further method runs")
            process = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout else None,
                env=env,
                preexec_fn=_die_with_parent,
            )
            self._running.add(process)
        try:
            return process.wait()
        finally:
            with self._lock:
                self._running.discard(process)

    def stop(self, grace: float = 10.0) -> None:
        """Terminate every running child, then kill those still alive after ``grace`` seconds; start no other."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Ask Linux to end this child when its parent (``zoa compare``) dies, even by SIGKILL (elsewhere: nothing)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
