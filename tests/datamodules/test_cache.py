import hashlib
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import datamodules.cache as cache_module
from datamodules.cache import CorruptionCache, default_cache_dir
from datamodules.corruptions import corrupt_images


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_builds_saves_and_reads_back_without_a_data_module(tmp_path: Path, images: np.ndarray) -> None:
    cache = CorruptionCache(tmp_path / "mnist", images, image_size=16)
    built = cache.array("contrast", 3, 7)
    np.testing.assert_array_equal(built, corrupt_images(images, "contrast", 3, 7))
    path = cache.path("contrast", 3, 7)
    assert path.parent == tmp_path / "mnist"
    fingerprint = hashlib.sha256(images.tobytes()).hexdigest()[:12]  # of the clean images: the layout of older caches
    assert path.name == f"contrast-s3-px16-seed7-{fingerprint}-v1.npy"
    assert _files(tmp_path / "mnist") == [path.name, path.with_suffix(".sha256").name]  # no temporaries
    again = CorruptionCache(tmp_path / "mnist", images, image_size=16).read("contrast", 3, 7)
    assert again is not None
    np.testing.assert_array_equal(again, built)


def test_other_clean_images_use_other_files(tmp_path: Path, images: np.ndarray) -> None:
    a = CorruptionCache(tmp_path, images, image_size=16)
    b = CorruptionCache(tmp_path, images[::-1].copy(), image_size=16)
    assert a.path("fog", 5, 1) != b.path("fog", 5, 1)
    assert a.path("fog", 5, 1) != a.path("fog", 5, 2) != a.path("fog", 4, 1)


def test_load_builds_only_the_missing_arrays_in_one_go(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    CorruptionCache(tmp_path, images, 16).load([("contrast", 5, 1)])
    built: list[tuple[str, int, int]] = []

    def counting(x: np.ndarray, corruption: str, severity: int, seed: int, **kwargs: object) -> np.ndarray:
        built.append((corruption, severity, seed))
        return corrupt_images(x, corruption, severity, seed)

    monkeypatch.setattr(cache_module, "corrupt_images", counting)
    cache = CorruptionCache(tmp_path, images, 16)
    cache.load([("contrast", 5, 1), ("gaussian_noise", 5, 1), ("contrast", 5, 2)])
    assert built == [("gaussian_noise", 5, 1), ("contrast", 5, 2)]
    cache.array("gaussian_noise", 5, 1)  # kept in memory: nothing read or built again
    assert len(built) == 2


@pytest.mark.parametrize("damage", ["checksum", "shape", "missing_sidecar"])
def test_a_damaged_file_is_reported_and_rebuilt(
    tmp_path: Path, images: np.ndarray, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CorruptionCache(tmp_path, images, 16)
    path = cache.save("contrast", 5, 1, corrupt_images(images, "contrast", 5, 1))
    if damage == "checksum":
        path.with_suffix(".sha256").write_text("0" * 64)
    elif damage == "shape":
        cache.save("contrast", 5, 1, corrupt_images(images[:3], "contrast", 5, 1))
    else:
        path.with_suffix(".sha256").unlink()
    fresh = CorruptionCache(tmp_path, images, 16)
    with caplog.at_level(logging.WARNING, logger="datamodules.cache"):
        assert fresh.read("contrast", 5, 1) is None
        array = fresh.array("contrast", 5, 1)
    assert any("damaged" in r.message and str(path) in r.message for r in caplog.records)
    np.testing.assert_array_equal(array, corrupt_images(images, "contrast", 5, 1))
    assert fresh.read("contrast", 5, 1) is not None


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_cache_files_follow_the_umask(tmp_path: Path, images: np.ndarray) -> None:
    old = os.umask(0o022)
    try:
        path = CorruptionCache(tmp_path, images, 16).save("contrast", 5, 1, images)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".sha256").stat().st_mode) == 0o644


def test_unwritable_files_are_a_clear_error(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = CorruptionCache(tmp_path, images, 16)
    monkeypatch.setattr(CorruptionCache, "read", lambda self, *key: None)  # as if every write were lost
    with pytest.raises(RuntimeError, match=r"unreadable right after being written; check the free space"):
        cache.array("contrast", 5, 1)


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOA_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "streams"
    monkeypatch.delenv("ZOA_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "zoa_lightning" / "streams"
