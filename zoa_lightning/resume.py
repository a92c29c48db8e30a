"""Resuming a stream: what a stream checkpoint records of its run and the check that a resumed run is the same one.

Pure Python (no Lightning): :class:`~zoa_lightning.methods.base.StreamModule` stores :func:`stream_fingerprint` in
every stream checkpoint and calls :func:`check_same_stream` when one is loaded. A resumed run must be the same stream
(the data module's identifying settings) with the same method (class and hyperparameters) at the same precision;
otherwise domains would be evaluated twice or skipped and one result would mix two settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zoa_lightning.files import DamagedFileError, verify_file

__all__ = [
    "STREAM_KEY",
    "check_same_stream",
    "fingerprint_differences",
    "plain_values",
    "run_precision",
    "stored_fingerprint",
    "stream_fingerprint",
    "verify_stream_checkpoint",
]

STREAM_KEY = "zoa_stream"
"""Key of a stream checkpoint under which the stream position, finished results and fingerprint live."""


def plain_values(value: Any) -> Any:
    """Return ``value`` with tuples as lists, recursively; anything but plain types becomes its ``repr``.

    Example:
        >>> plain_values({"a": (1, 2.0), "b": None, 3: object}) == {"a": [1, 2.0], "b": None, "3": repr(object)}
        True
    """
    if isinstance(value, dict):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_values(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def stream_fingerprint(
    data: Mapping[str, Any], method_class: str, hparams: Mapping[str, Any], precision: str
) -> dict[str, Any]:
    """What a stream checkpoint must match to be resumed, as plain values.

    Args:
        data: the data module's ``stream_fingerprint()``.
        method_class: the stream module's class name.
        hparams: the module's hyperparameters (keys starting with ``_`` are left out).
        precision: the network's precision tag (``"float"``, ``"W8A8"``, ...).

    Returns:
        ``{"data": {...}, "method": {"class": ..., <hparams>}, "precision": ...}``.
    """
    method = {"class": method_class, **{k: v for k, v in hparams.items() if not k.startswith("_")}}
    return {"data": plain_values(dict(data)), "method": plain_values(method), "precision": precision}


def fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How two stream fingerprints differ, one ``"<section>.<key>: checkpoint X, this run Y"`` per key.

    Every key of the ``data`` and ``method`` sections is compared (a key on one side only is a difference), and the
    precision.

    Example:
        >>> fingerprint_differences({"data": {"seed": 1}, "method": {}}, {"data": {"seed": 2}, "method": {}})
        ['data.seed: checkpoint 1, this run 2']
    """
    differences = []
    for section in ("data", "method"):
        old, new = stored.get(section) or {}, current.get(section) or {}
        for key in [*old, *(k for k in new if k not in old)]:
            before, after = old.get(key, "<not set>"), new.get(key, "<not set>")
            if plain_values(before) != plain_values(after):
                differences.append(f"{section}.{key}: checkpoint {before!r}, this run {after!r}")
    if stored.get("precision") != current.get("precision"):
        differences.append(f"precision: checkpoint {stored.get('precision')!r}, this run {current.get('precision')!r}")
    return differences


def check_same_stream(stored: Mapping[str, Any] | None, current: Mapping[str, Any], path: str) -> None:
    """Raise unless the checkpoint's fingerprint ``stored`` equals this run's ``current``.

    Args:
        stored: the fingerprint found in the checkpoint (``None``: it holds none).
        current: this run's :func:`stream_fingerprint`.
        path: the checkpoint, for the message.

    Raises:
        ValueError: naming every difference, or that the checkpoint is no stream checkpoint of this project.
    """
    if stored is None:
        raise ValueError(
            f"cannot resume from {path}: it holds no stream fingerprint, so it is not a stream checkpoint written by "
            "zoa-lightning's StreamCheckpoint. Start a fresh run (without ckpt_path), or pass the stream-last.ckpt of "
            "the run to continue"
        )
    differences = fingerprint_differences(stored, current)
    if differences:
        raise ValueError(
            f"cannot resume from {path}: this run differs from the run that wrote it in "
            + "; ".join(differences)
            + ". Continuing would evaluate some domains twice, skip others or mix two settings in one result. "
            "Resume with the same data and model configs (and flags) as that run, or start a fresh run without "
            "ckpt_path (`--ckpt_path` on the command line)"
        )


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of the checkpoints this process verified


def run_precision(callbacks: Iterable[Any]) -> str:
    """The precision tag a run's callbacks give its network: the first quantizer's (``"W8A8"``), else ``"float"``."""
    from zoa_lightning.core.protocols import PrecisionCallback

    return next((c.precision for c in callbacks if isinstance(c, PrecisionCallback)), "float")


def verify_stream_checkpoint(path: str | Path) -> Path:
    """Check a stream checkpoint against the checksum its writer put beside it, before anything reads it.

    A file this process already verified (same path, size and modification time) is not hashed again.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it has no checksum file or does not match it (damaged, or not written by ``StreamCheckpoint``).
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"cannot resume from {target}: no such file")
    stat = target.stat()
    key = (str(target.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return target
    try:
        verify_file(target)
        _VERIFIED.add(key)
        return target
    except DamagedFileError as error:
        raise ValueError(
            f"cannot resume from {path}: {error}. A stream checkpoint is written by StreamCheckpoint with its checksum "
            "beside it; resume from an undamaged copy, or start a fresh run without ckpt_path"
        ) from error


def stored_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint a (verified) stream checkpoint holds, or ``None`` if it holds none; reads it lazily.

    Raises:
        ValueError: as :func:`verify_stream_checkpoint`.
    """
    import torch  # here: the rest of this module is plain Python

    verify_stream_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    stream = checkpoint.get(STREAM_KEY) if isinstance(checkpoint, dict) else None
    fingerprint = stream.get("fingerprint") if isinstance(stream, dict) else None
    return dict(fingerprint) if isinstance(fingerprint, dict) else None
