import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from zoa_lightning import files
from zoa_lightning.files import atomic_write, sha256_of


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_bytes_and_text_whole_and_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    assert atomic_write(path, b"\x00\x01old") == path
    assert path.read_bytes() == b"\x00\x01old"
    atomic_write(str(path), "naïve\r\nline\n")  # text: UTF-8, no newline translation
    assert path.read_bytes() == "naïve\r\nline\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    atomic_write(path, "old")

    def broken_replace(src: object, dst: object) -> None:
        assert Path(str(src)).exists()  # the temporary was written in full
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_an_interrupted_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npy", b"data")
    assert not any(tmp_path.iterdir())


def test_a_missing_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "x.txt", "x")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_follow_the_umask_like_ordinary_files(tmp_path: Path, umask_022: None) -> None:
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    written = atomic_write(tmp_path / "atomic.txt", "x")
    assert _mode(written) == 0o644 == _mode(ordinary)
    os.umask(0o077)
    assert _mode(atomic_write(tmp_path / "private.txt", "x")) == 0o600
    os.umask(0o002)
    assert _mode(atomic_write(tmp_path / "atomic.txt", "y")) == 0o664  # a replaced file gets the new mode too


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_explicit_mode_wins_over_the_umask(tmp_path: Path, umask_022: None) -> None:
    os.umask(0o077)
    assert _mode(atomic_write(tmp_path / "shared.bin", b"x", mode=0o644)) == 0o644


def test_temporaries_are_unique_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        seen.append(Path(path).name)
        return real_open(path, flags, mode)

    monkeypatch.setattr(files.os, "open", recording_open)
    atomic_write(tmp_path / "c.pt", b"1")
    atomic_write(tmp_path / "c.pt", b"2")
    assert len(set(seen)) == 2
    assert all(name.startswith(f".c.pt.{os.getpid()}.") and name.endswith(".tmp") for name in seen)


def test_sha256_of_bytes_and_arrays() -> None:
    assert sha256_of(b"abc") == hashlib.sha256(b"abc").hexdigest()
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert sha256_of(array.data) == hashlib.sha256(array.tobytes()).hexdigest()
    assert sha256_of(memoryview(b"abc")) == sha256_of(b"abc")
