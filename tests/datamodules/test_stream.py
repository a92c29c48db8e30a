import logging
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datamodules.cache as cache_module
from datamodules import CORRUPTIONS, CorruptionStreamDataModule
from datamodules._common import GRADUAL_SCHEDULE

CHEAP = ["gaussian_noise", "contrast"]  # fast corruptions keep the cache builds short


def _make(cache_dir: Path, **kwargs: Any) -> CorruptionStreamDataModule:
    return CorruptionStreamDataModule(corruptions=CHEAP, cache_dir=str(cache_dir), **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> CorruptionStreamDataModule:
    dm = _make(tmp_path_factory.mktemp("cache"), rounds=2)
    dm.prepare_data()
    dm.setup("test")
    return dm


def _ds(loader: DataLoader) -> Any:
    return loader.dataset


def _first_batches(dm: CorruptionStreamDataModule) -> list[torch.Tensor]:
    return [next(iter(loader))[0] for loader in dm.test_dataloader().values()]


def test_defaults_and_domain_order(tmp_path: Path) -> None:
    dm = CorruptionStreamDataModule(cache_dir=str(tmp_path), rounds=2)
    assert dm.corruptions == CORRUPTIONS
    assert dm.num_classes == 10
    assert len(dm.domains) == 30
    assert dm.domains[:2] == ("r1/gaussian_noise", "r1/shot_noise")
    assert dm.domains[14:16] == ("r1/jpeg_compression", "r2/gaussian_noise")
    assert not any(tmp_path.iterdir())  # nothing is built before prepare_data/setup


def test_loaders_lengths_and_batches(built: CorruptionStreamDataModule) -> None:
    loaders = built.test_dataloader()
    assert isinstance(loaders, OrderedDict)
    assert list(loaders) == ["r1/gaussian_noise", "r1/contrast", "r2/gaussian_noise", "r2/contrast"]
    for loader in loaders.values():
        assert len(loader) == 16
        assert len(_ds(loader)) == 1000
        assert loader.drop_last is False
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    batches = list(loaders["r1/contrast"])
    assert [len(b[0]) for b in batches[-2:]] == [64, 40]
    images, labels = batches[0]
    assert images.shape == (64, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.min() >= -1.0
    assert images.max() <= 1.0


def test_orders_differ_per_round_and_corruption(built: CorruptionStreamDataModule) -> None:
    orders = [tuple(_ds(loader).order) for loader in built.test_dataloader().values()]
    assert len(set(orders)) == 4
    assert all(sorted(order) == list(range(1000)) for order in orders)
    # same corruption in two rounds: same images, another order
    r1, r2 = (_ds(built.test_dataloader()[f"r{r}/gaussian_noise"]) for r in (1, 2))
    assert np.array_equal(r1.images, r2.images)


def test_first_round_is_the_one_round_stream(built: CorruptionStreamDataModule) -> None:
    # benchmarks/accuracy.py reads 1-round results off the first round of a multi-round run: same images, same order.
    one = _make(built.cache_path.parent, rounds=1)
    one.setup("test")
    many = built.test_dataloader()
    for name, loader in one.test_dataloader().items():
        assert name.startswith("r1/")
        for (a, ya), (b, yb) in zip(loader, many[name], strict=True):
            assert torch.equal(a, b)
            assert torch.equal(ya, yb)


@pytest.mark.slow  # builds two more caches from scratch (test_cache_is_reused keeps the fast check of the same files)
def test_deterministic_across_instances(built: CorruptionStreamDataModule, tmp_path: Path) -> None:
    other = _make(tmp_path, rounds=2)  # separate cache: rebuilt from scratch
    other.prepare_data()
    for a, b in zip(_first_batches(built), _first_batches(other), strict=True):
        assert torch.equal(a, b)
    changed = CorruptionStreamDataModule(corruptions=["gaussian_noise"], cache_dir=str(tmp_path), seed=1)
    changed.setup("test")
    ours, theirs = (_ds(dm.test_dataloader()["r1/gaussian_noise"]) for dm in (built, changed))
    assert not np.array_equal(ours.images, theirs.images)  # other noise
    assert not np.array_equal(ours.order, theirs.order)  # other order


def test_cache_is_reused(built: CorruptionStreamDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    def _fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("corrupt_images must not run when the cache is complete")

    monkeypatch.setattr(cache_module, "corrupt_images", _fail)
    again = _make(built.cache_path.parent, rounds=2)
    again.prepare_data()
    again.setup("test")
    for a, b in zip(_first_batches(built), _first_batches(again), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "drop_checksum"])
def test_damaged_cache_is_rebuilt(
    built: CorruptionStreamDataModule, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(built.cache_path, tmp_path / "mnist")
    dm = CorruptionStreamDataModule(corruptions=["gaussian_noise"], cache_dir=str(tmp_path))
    path = dm.cache.path("gaussian_noise", dm.severity, dm.seed)
    reference = np.load(path).copy()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip_bytes":
        raw = bytearray(path.read_bytes())
        raw[-10:] = bytes(255 - b for b in raw[-10:])
        path.write_bytes(bytes(raw))
    else:
        path.with_suffix(".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="datamodules.cache"):
        dm.setup("test")
    assert any("damaged" in r.message and str(path) in r.message for r in caplog.records)
    assert np.array_equal(np.load(path), reference)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOA_CACHE_DIR", str(tmp_path))
    dm = CorruptionStreamDataModule(corruptions=["contrast"])
    assert dm.cache_path == tmp_path / "streams" / "mnist"
    monkeypatch.delenv("ZOA_CACHE_DIR")
    assert CorruptionStreamDataModule().cache_path == Path.home() / ".cache" / "zoa_lightning" / "streams" / "mnist"


def test_source_calibration_val(built: CorruptionStreamDataModule, tmp_path: Path) -> None:
    source = built.source_dataloader()
    assert len(_ds(source)) == 4000
    assert isinstance(source.sampler, torch.utils.data.SequentialSampler)
    limited = _make(tmp_path, num_source_images=100)
    assert len(_ds(limited.source_dataloader())) == 100
    assert set(_ds(limited.source_dataloader()).order) <= set(_ds(source).order)
    calib = built.calibration_images()
    assert calib.shape == (32, 3, 32, 32)
    assert torch.equal(calib, built.calibration_images(32))
    assert torch.equal(calib[:4], built.calibration_images(4))
    with pytest.raises(ValueError, match=r"1\.\.4000"):
        built.calibration_images(0)
    with pytest.raises(ValueError, match=r"asked for 5000 clean images and 4000 are available: set .calib_images."):
        built.calibration_images(5000)  # the error names the option to lower
    assert len(_ds(built.val_dataloader())) == 1000
    with pytest.raises(ValueError, match="num_source_images=5000"):
        _make(tmp_path, num_source_images=5000).source_dataloader()


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corruption 'snowy'"):
        CorruptionStreamDataModule(corruptions=["snowy"])
    with pytest.raises(ValueError, match="severity"):
        CorruptionStreamDataModule(severity=0)
    with pytest.raises(ValueError, match="batch_size"):
        CorruptionStreamDataModule(batch_size=0)
    with pytest.raises(ValueError, match="std values must be positive"):
        CorruptionStreamDataModule(std=(0.5, 0.0, 0.5))
    with pytest.raises(FileNotFoundError, match="neither 'mnist' nor an existing folder"):
        CorruptionStreamDataModule(dataset=str(tmp_path / "nope"), cache_dir=str(tmp_path)).prepare_data()


def test_folder_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    dm = CorruptionStreamDataModule(
        dataset=str(root), corruptions=["contrast"], image_size=24, batch_size=2, cache_dir=str(tmp_path / "c")
    )
    assert dm.num_classes == 3
    dm.setup("test")
    loader = dm.test_dataloader()["r1/contrast"]
    assert len(_ds(loader)) == 2  # 20 % of 12 images
    images, _ = next(iter(loader))
    assert images.shape == (2, 3, 24, 24)
    assert dm.cache_path.name == "folder-shapes"
    (root / "a" / "0.png").write_bytes(b"not an image")
    broken = CorruptionStreamDataModule(dataset=str(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(OSError, match=r"cannot decode image file .*0\.png"):
        broken.setup("fit")


def test_signature_parses_for_lightning_cli() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CorruptionStreamDataModule, "data")
    cfg = parser.parse_args(["--data.corruptions=[fog,snow]", "--data.mean=[0.1,0.2,0.3]", "--data.rounds=3"])
    assert cfg.data.corruptions == ["fog", "snow"]
    assert tuple(cfg.data.mean) == (0.1, 0.2, 0.3)
    assert cfg.data.severity == 5
    assert "corruption severity, 1 to 5" in parser.format_help()


def _tiny_folder(root: Path, classes: int = 2, per_class: int = 5, size: int = 20) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _lightning_lines() -> tuple[logging.Handler, list[str]]:
    """A handler on the `lightning.pytorch` logger, whose lines the `zoa` command shows."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    return Collect(level=logging.INFO), lines


def test_cache_build_is_reported_in_lines_the_cli_shows(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "folder")
    dm = CorruptionStreamDataModule(dataset=str(root), corruptions=["contrast"], cache_dir=str(tmp_path / "c"))
    handler, lines = _lightning_lines()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        dm.prepare_data()  # stderr is not a terminal under pytest: no bar, so lines
        dm.prepare_data()  # cached: silent
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 2, lines
    assert lines[0].startswith("building the corruption cache for 1 corruption(s) of 2 images in ")
    assert str(dm.cache_path) in lines[0]
    assert "few minutes once" in lines[0]
    assert lines[1].startswith("corruption cache: contrast done (1/1, ")


def test_cache_build_on_a_terminal_prints_above_the_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stderr as a terminal
    messages: list[str] = []
    monkeypatch.setattr(cache_module, "rank_zero_info", messages.append)
    root = _tiny_folder(tmp_path / "folder")
    CorruptionStreamDataModule(dataset=str(root), corruptions=["contrast"], cache_dir=str(tmp_path / "c")).setup()
    err = capsys.readouterr().err
    assert "building the corruption cache" in err
    assert "contrast done (1/1" in err
    assert messages == []


def test_too_many_source_images_says_how_to_set_the_option(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "folder")  # 10 images: 8 training, 2 test
    dm = CorruptionStreamDataModule(dataset=str(root), num_source_images=2048, cache_dir=str(tmp_path / "c"))
    message = r"num_source_images=2048, but only 8 clean source images are available \(the training part of dataset"
    with pytest.raises(ValueError, match=message) as info:
        dm.prepare_data()
    assert "--data.init_args.num_source_images 8" in str(info.value)
    assert "`null` to use all of them" in str(info.value)
    assert not (tmp_path / "c").exists()  # refused before building anything
    with pytest.raises(ValueError, match="num_source_images=2048"):
        dm.setup("test")


def test_small_set_is_corrupted_without_a_process_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pool(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a process pool takes tens of seconds to start; a few images do not need one")

    monkeypatch.setattr(cache_module, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(cache_module.os, "cpu_count", lambda: 4)
    root = _tiny_folder(tmp_path / "folder")
    dm = CorruptionStreamDataModule(dataset=str(root), corruptions=CHEAP, cache_dir=str(tmp_path / "c"))
    dm.setup("test")
    assert list(dm.test_dataloader()) == ["r1/gaussian_noise", "r1/contrast"]


@pytest.mark.slow  # builds two more corruption caches
def test_long_domains_are_independent_corruption_draws_one_after_the_other(
    built: CorruptionStreamDataModule, tmp_path: Path
) -> None:
    cache = Path(built.cache_path).parent
    long = _make(cache, rounds=2, domain_repeats=2)  # draw 0 reuses the plain stream's cache files
    long.setup("test")
    plain_loaders, long_loaders = built.test_dataloader(), long.test_dataloader()
    assert list(long_loaders) == list(plain_loaders)
    for domain, loader in long_loaders.items():
        plain = plain_loaders[domain]
        assert len(loader.dataset) == 2 * len(plain.dataset)
        assert len(loader) == -(-2 * len(plain.dataset) // long.batch_size)
        n = len(plain.dataset)
        first = torch.stack([loader.dataset[i][0] for i in range(n)])
        torch.testing.assert_close(first, torch.stack([plain.dataset[i][0] for i in range(n)]), rtol=0, atol=0)
        second = torch.stack([loader.dataset[n + i][0] for i in range(8)])
        assert not torch.equal(second, first[:8])  # another noise draw, another order
    assert long.stream_fingerprint()["domain_repeats"] == 2
    assert "domain_repeats" not in built.stream_fingerprint()  # plain streams keep their old fingerprints
    with pytest.raises(ValueError, match="domain_repeats"):
        _make(tmp_path, domain_repeats=0)


def test_dirichlet_order_is_a_seeded_permutation_whose_batches_hold_few_classes() -> None:
    from datamodules._common import dirichlet_order, stream_order

    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)

    def classes_per_batch(order: np.ndarray) -> float:  # mean number of distinct classes in a batch of 64
        seq = labels[order]
        return float(np.mean([len(set(seq[i : i + 64].tolist())) for i in range(0, len(seq) - 63, 64)]))

    orders = {g: dirichlet_order(labels, g, 2020, 1, "fog") for g in (0.01, 0.1, 100.0)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(len(labels)))  # every image once
    np.testing.assert_array_equal(orders[0.1], dirichlet_order(labels, 0.1, 2020, 1, "fog"))  # seeded
    assert not np.array_equal(orders[0.1], dirichlet_order(labels, 0.1, 2020, 2, "fog"))  # per round
    assert classes_per_batch(stream_order(2020, 1, "fog", len(labels))) == 10  # shuffled: every class in a batch
    assert classes_per_batch(orders[100.0]) > 9  # a large concentration approaches the shuffled order
    assert classes_per_batch(orders[0.1]) < 7  # the literature's setting: a batch sees about half the classes
    assert classes_per_batch(orders[0.01]) <= classes_per_batch(orders[0.1])


def test_label_shifted_stream_keeps_the_images_and_changes_the_order(
    built: CorruptionStreamDataModule, tmp_path: Path
) -> None:
    shifted = _make(Path(built.cache_path).parent, rounds=2, label_dirichlet=0.1)  # reuses the built cache
    shifted.setup("test")
    for domain, loader in shifted.test_dataloader().items():
        plain = built.test_dataloader()[domain]
        labels = torch.cat([y for _, y in loader])
        plain_labels = torch.cat([y for _, y in plain])
        assert torch.equal(labels.sort().values, plain_labels.sort().values)  # the same images
        assert not torch.equal(labels, plain_labels)
        batch = shifted.batch_size
        few = np.mean([len(set(labels[i : i + batch].tolist())) for i in range(0, len(labels) - batch + 1, batch)])
        assert few < 7  # label shift: a batch holds about half the classes (the shuffled stream: all ten)
    assert shifted.stream_fingerprint()["label_dirichlet"] == 0.1
    assert "label_dirichlet" not in built.stream_fingerprint()
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="label_dirichlet"):
            _make(tmp_path, label_dirichlet=bad)


def test_mixed_domains_shuffle_every_corruption_of_a_round_together(built: CorruptionStreamDataModule) -> None:
    mixed = _make(Path(built.cache_path).parent, rounds=2, mixed_domains=True)  # reuses the built cache
    mixed.setup("test")
    assert mixed.domains == ("r1/mixed", "r2/mixed")
    loaders = mixed.test_dataloader()
    plain = built.test_dataloader()
    dataset = loaders["r1/mixed"].dataset
    assert len(dataset) == sum(len(plain[f"r1/{c}"].dataset) for c in CHEAP)
    # Every image of every corruption once: the mixed domain's images are the plain domains' images, reordered.
    got = torch.stack([dataset[i][0] for i in range(len(dataset))])
    want = torch.cat([torch.stack([plain[f"r1/{c}"].dataset[i][0] for i in range(len(plain[f"r1/{c}"].dataset))])
                      for c in CHEAP])  # fmt: skip
    assert torch.equal(got.flatten(1).sum(1).sort().values, want.flatten(1).sum(1).sort().values)
    # Shuffled together: the first batch already holds images of more than one corruption.
    n = len(plain[f"r1/{CHEAP[0]}"].dataset)
    first = [int(i) for i in dataset.order[: mixed.batch_size]]
    assert len({i // n for i in first}) == len(CHEAP)
    assert not np.array_equal(dataset.order, loaders["r2/mixed"].dataset.order)  # another order each round
    assert mixed.stream_fingerprint()["mixed_domains"] is True
    assert "mixed_domains" not in built.stream_fingerprint()
    with pytest.raises(ValueError, match="mixed_domains"):
        _make(Path(built.cache_path).parent, mixed_domains="yes")


@pytest.mark.slow  # builds the cache at severities 1-4 too
def test_gradual_severity_rises_and_falls_within_each_domain(built: CorruptionStreamDataModule) -> None:
    gradual = _make(Path(built.cache_path).parent, rounds=2, gradual=True)
    gradual.setup("test")
    plain = built.test_dataloader()
    for domain, loader in gradual.test_dataloader().items():
        parts = loader.dataset.datasets
        assert len(parts) == len(GRADUAL_SCHEDULE) == 9
        order = np.concatenate([part.order for part in parts])
        np.testing.assert_array_equal(order, plain[domain].dataset.order)  # the plain domain's images and order
        corruption = domain.split("/")[1]
        for severity, part in zip(GRADUAL_SCHEDULE, parts, strict=True):
            assert np.array_equal(part.images, gradual._corrupted_array(corruption, 0, severity))
        # The middle part is the plain stream's severity-5 images; the first, severity 1, is less corrupted.
        middle = parts[4]
        i = int(middle.order[0])
        assert np.array_equal(middle.images[i], plain[domain].dataset.images[i])
        j = int(parts[0].order[0])
        clean = gradual._clean_split()[2][j].astype(float)
        assert np.abs(parts[0].images[j] - clean).mean() < np.abs(plain[domain].dataset.images[j] - clean).mean()
    assert gradual.stream_fingerprint()["gradual"] is True
    assert "gradual" not in built.stream_fingerprint()
