"""zoa compare's child processes: stopped with the comparison, and dead with it when it is killed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zoa_lightning import processes
from zoa_lightning.processes import ChildProcesses

# The killed parent loads processes.py alone (standard library only): importing the package costs seconds.
_LOAD = (
    "import importlib.util; "
    f"spec = importlib.util.spec_from_file_location('processes', {str(Path(processes.__file__))!r}); "
    "processes = importlib.util.module_from_spec(spec); spec.loader.exec_module(processes); "
)


def test_a_stopped_runner_starts_no_other_child() -> None:
    children = ChildProcesses()
    children.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        children.run([sys.executable, "-c", "pass"])


def test_children_are_stopped_with_the_comparison_and_die_with_it(tmp_path: Path) -> None:
    children = ChildProcesses()
    marker = tmp_path / "written"
    sleeper = [sys.executable, "-c", f"import time, pathlib; time.sleep(30); pathlib.Path({str(marker)!r}).touch()"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(children.run(sleeper)))
    thread.start()
    time.sleep(1.0)
    children.stop()  # an interrupted comparison
    thread.join(timeout=15)
    assert codes, "the child should have been stopped"
    assert codes[0] != 0
    # The parent killed outright (SIGKILL, no clean-up): its child dies with it instead of writing results later.
    parent = subprocess.Popen(
        [sys.executable, "-c", _LOAD + f"print('started', flush=True); processes.ChildProcesses().run({sleeper!r})"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    assert parent.stdout.readline().strip() == "started"
    time.sleep(1.0)
    parent.kill()
    parent.wait()
    time.sleep(1.0)
    alive = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True, check=False).stdout.split()
    assert not alive, "the child outlived its killed parent"
    assert not marker.exists()
