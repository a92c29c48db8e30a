"""Run folders: made and checked writable before any work, one run at a time, an earlier run named, logger versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoa_lightning import run_folder
from zoa_lightning.run_folder import (
    LOCK_NAME,
    RunFolderBusy,
    RunFolderError,
    claim_logger_version,
    claim_run_folder,
    describe_earlier_run,
    release_run_folder,
)

# Other processes load run_folder.py alone (standard library only): importing the package costs seconds per process.
_LOAD = (
    "import importlib.util, sys; "
    f"spec = importlib.util.spec_from_file_location('run_folder', {str(Path(run_folder.__file__))!r}); "
    "run_folder = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_folder)\n"
)
_HOLDER = (
    _LOAD
    + """
import time
run_folder.claim_run_folder(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""
)


def _hold_in_another_process(folder: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_held_folder_stops_at_once_and_a_killed_run_leaves_nothing_stuck(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "zoa"
    other = _hold_in_another_process(folder)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another run \(process {other.pid}\).*default_root_dir"):
            claim_run_folder(folder)
    finally:
        other.send_signal(signal.SIGKILL)  # a killed run: the operating system releases its lock
        other.wait()
    assert claim_run_folder(folder) == folder
    release_run_folder(folder)


def test_claims_in_one_process_are_counted(tmp_path: Path) -> None:
    claim_run_folder(tmp_path)
    claim_run_folder(tmp_path)  # the results callback and the stream checkpoint of one run
    release_run_folder(tmp_path)
    check = subprocess.run(
        [sys.executable, "-c", _LOAD + "run_folder.claim_run_folder(sys.argv[1])", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode != 0, "still held by the second claim"
    release_run_folder(tmp_path)
    assert subprocess.run(check.args, check=False).returncode == 0
    release_run_folder(tmp_path / "never-claimed")  # no-op


def test_a_folder_that_cannot_be_made_is_named_up_front(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(
        RunFolderError, match=rf"cannot write the run folder {blocker}/zoa .*--trainer.default_root_dir"
    ):
        claim_run_folder(blocker / "zoa")
    with pytest.raises(RunFolderError, match="cannot write the logger folder"):
        claim_logger_version(blocker / "logs", lambda: str(blocker / "logs" / "version_0"))


def test_an_earlier_run_is_described_with_its_results_and_checkpoint(tmp_path: Path) -> None:
    assert describe_earlier_run(tmp_path) is None
    (tmp_path / LOCK_NAME).write_text("1\n")  # a lock file alone is no earlier run
    assert describe_earlier_run(tmp_path) is None
    (tmp_path / "results.json").write_text(json.dumps({"summary": {"domains": 15, "mean_acc1": 64.07}}))
    (tmp_path / "stream-last.ckpt").write_bytes(b"x")
    text = describe_earlier_run(tmp_path)
    assert text is not None
    assert "15 domains, mean top-1 64.07 %" in text
    assert f"--ckpt_path {tmp_path / 'stream-last.ckpt'}" in text


def test_logger_versions_are_made_while_the_logger_folder_is_held(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    first, second = CSVLogger(tmp_path, name="logs"), CSVLogger(tmp_path, name="logs")
    made = claim_logger_version(first.root_dir, lambda: first.log_dir)
    assert made.is_dir()
    # Before, a run's version folder appeared only when it first wrote; a run starting meanwhile took the same one.
    assert claim_logger_version(second.root_dir, lambda: second.log_dir) != made


def test_a_process_killed_while_it_holds_the_logger_folder_does_not_block_others(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "h = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    assert claim_logger_version(tmp_path, lambda: str(tmp_path / "version_0")).is_dir()
    assert time.monotonic() - start < 5
