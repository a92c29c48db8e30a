"""A run's output folder: checked writable before any work, held by one run at a time, an earlier run's files named.

Results, the stream checkpoint and the logger's version folder of one run must never mix with another run's. Before a
run does any work (quantization, corruption caches, the stream), :func:`claim_run_folder` creates its folder, checks
that it can write there and locks it for the process (an advisory ``flock`` on ``.zoa-run.lock``: the operating system
releases it when the process ends, so a killed run leaves nothing stuck); a second run into the same folder stops at
once, naming the process that holds it. :func:`describe_earlier_run` says what an earlier run left in the folder (its
results, a finished or resumable stream checkpoint), so a fresh run names it before anything of it is replaced.
:func:`claim_logger_version` gives concurrent runs that share a logger folder distinct version folders.

Pure Python (no Lightning, no torch at import).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

try:  # POSIX; elsewhere folders are checked but not locked
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RunFolderBusy",
    "RunFolderError",
    "RunFolderWriter",
    "claim_logger_version",
    "claim_run_folder",
    "describe_earlier_run",
    "release_run_folder",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".zoa-run.lock"
"""The lock file a run holds in its folder while it runs."""

_HELD: dict[str, list[int]] = {}  # resolved folder -> [file descriptor, claims] of this process


@runtime_checkable
class RunFolderWriter(Protocol):
    """A callback that writes into a run folder (results, the stream checkpoint) and says which."""

    def run_folder(self, trainer: Any, pl_module: Any) -> Path:
        """The folder it writes into for this trainer and module."""
        ...


class RunFolderError(OSError):
    """A run folder that cannot be created or written to."""


class RunFolderBusy(RuntimeError):
    """A run folder another running process holds."""


def claim_run_folder(path: str | os.PathLike[str], flag: str = "--trainer.default_root_dir") -> Path:
    """Create ``path`` if needed, check it is writable and hold it for this process until :func:`release_run_folder`.

    Claims are counted per process: the callbacks of one run that write into the same folder claim it once each.

    Args:
        path: the folder.
        flag: the setting that moves it, named in the messages.

    Returns:
        The folder.

    Raises:
        RunFolderError: if the folder cannot be created or written to (read-only, a file in the way, no permission).
        RunFolderBusy: if another running process holds it (the message names that process).
    """
    folder = Path(path).expanduser()
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return folder
    handle = _open_lock(folder, "run folder", flag)
    if not os.access(folder, os.W_OK | os.X_OK):
        os.close(handle)
        raise RunFolderError(f"the run folder {folder} is not writable: pass {flag} <a writable folder>")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "?"
            os.close(handle)
            raise RunFolderBusy(
                f"the run folder {folder} is in use by another run (process {holder}): two runs writing into one "
                f"folder would mix their results, checkpoints and logs. Wait for it to finish, or pass {flag} "
                "<another folder>"
            ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [handle, 1]
    return folder


def _open_lock(folder: Path, what: str, flag: str) -> int:
    """Create ``folder`` and open its lock file; a folder that cannot be made or written is named with the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise RunFolderError(
            f"cannot write the {what} {folder} ({error.strerror or error}): pass {flag} <a writable folder>"
        ) from error


def release_run_folder(path: str | os.PathLike[str]) -> None:
    """Give back one claim of :func:`claim_run_folder`; the last one unlocks the folder (unknown folders: no-op)."""
    key = str(Path(path).expanduser().resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor releases the flock


def describe_earlier_run(folder: str | os.PathLike[str], checkpoint_name: str = "stream-last.ckpt") -> str | None:
    """What an earlier run left in ``folder``, in words, or ``None`` if nothing.

    Names ``results.json`` (the domains and mean top-1 it holds) and the stream checkpoint (how many domains it
    finished: a checkpoint covering fewer domains than the results, or with no results at all, is a resumable run).
    """
    root = Path(folder)
    parts = []
    results = root / "results.json"
    if results.is_file():
        summary = _read_summary(results)
        parts.append(
            f"{results} ({summary['domains']} domains, mean top-1 {summary['mean_acc1']:.2f} %)"
            if summary
            else f"{results}"
        )
    checkpoint = root / checkpoint_name
    if checkpoint.is_file():
        parts.append(f"{checkpoint} (a stream checkpoint: resume it with --ckpt_path {checkpoint})")
    return " and ".join(parts) if parts else None


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())["summary"]
        return {"domains": int(summary["domains"]), "mean_acc1": float(summary["mean_acc1"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim_logger_version(root: str | os.PathLike[str], log_dir: Any) -> Path:
    """Create a logger's version folder while holding its root, so that concurrent runs never share one.

    A run that starts while another picks its version waits for it (a moment); the version is the next free one
    after the other's folder exists.

    Args:
        root: the logger's folder of versions (e.g. ``runs/demo/logs``).
        log_dir: a callable returning the run's version folder (it picks the next free version when first asked).

    Returns:
        The version folder, created.

    Raises:
        RunFolderError: if the logger's folder cannot be created or written to.
    """
    handle = _open_lock(Path(root).expanduser(), "logger folder", "--trainer.logger.init_args.save_dir")
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: held only while the version folder is made
        folder = Path(log_dir())
        folder.mkdir(parents=True, exist_ok=True)
    finally:
        os.close(handle)
    return folder
