"""Resuming a stream checkpoint: only the same stream with the same method settings, a finished stream says so."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

import zoa_lightning.methods.base as module_mod
from callbacks import AdaptationMonitor, ResultsCallback, StreamCheckpoint
from cli import make_cli
from datamodules import CorruptionStreamDataModule
from tests.helpers import STREAM_CORRUPTIONS, make_stream, make_trainer, make_vit, quick_zoa_config
from zoa_lightning import NoAdaptModule, ZOAModule
from zoa_lightning.files import write_verified
from zoa_lightning.resume import fingerprint_differences


def _first_domain(cache_dir: Path, tmp_path: Path, module: Any = None, **data: Any) -> Path:
    """Run the first domain of the three-domain stream (one batch) and return its stream checkpoint."""
    module = module if module is not None else NoAdaptModule(network=make_vit(0))
    bank = [AdaptationMonitor(verbose=False), StreamCheckpoint(dirpath=str(tmp_path / "first"))]
    make_trainer(bank, batches=1).test(module, datamodule=make_stream(cache_dir, stop_domain=1, **data))
    return tmp_path / "first" / "stream-last.ckpt"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"corruptions": STREAM_CORRUPTIONS[::-1]}, r"data\.corruptions: checkpoint \['gaussian_noise'"),
        ({"corruptions": STREAM_CORRUPTIONS[:2]}, r"data\.corruptions"),
        ({"rounds": 2}, r"data\.rounds: checkpoint 1, this run 2"),
        ({"batch_size": 32}, r"data\.batch_size: checkpoint 64, this run 32"),
    ],
)
def test_resume_refuses_a_different_stream(change: dict[str, Any], match: str, cache_dir: Path, tmp_path: Path) -> None:
    ckpt = _first_domain(cache_dir, tmp_path)
    data = {"corruptions": STREAM_CORRUPTIONS, "cache_dir": str(cache_dir), "num_source_images": 256, **change}
    with pytest.raises(ValueError, match=match) as info:
        make_trainer(batches=1).test(
            NoAdaptModule(network=make_vit(0)), datamodule=CorruptionStreamDataModule(**data), ckpt_path=str(ckpt)
        )
    assert str(ckpt) in str(info.value)
    assert "start a fresh run" in str(info.value)


def test_resume_refuses_other_method_settings(cache_dir: Path, tmp_path: Path) -> None:
    ckpt = _first_domain(cache_dir, tmp_path, ZOAModule(network=make_vit(0), lr=0.005, source_batches=1))
    with pytest.raises(ValueError, match=r"method\.lr: checkpoint 0\.005, this run 0\.01"):
        make_trainer(batches=1).test(
            ZOAModule(network=make_vit(0), lr=0.01, source_batches=1),
            datamodule=make_stream(cache_dir),
            ckpt_path=str(ckpt),
        )


def test_fingerprint_names_every_identifying_data_setting(cache_dir: Path) -> None:
    base: dict[str, Any] = {"corruptions": STREAM_CORRUPTIONS, "cache_dir": str(cache_dir)}
    reference = CorruptionStreamDataModule(**base).stream_fingerprint()
    changes: dict[str, Any] = {
        "severity": 3,
        "seed": 1,
        "image_size": 28,
        "mean": (0.4, 0.5, 0.5),
        "std": (0.5, 0.5, 0.6),
    }
    for key, value in changes.items():
        other = CorruptionStreamDataModule(**base, **{key: value}).stream_fingerprint()
        differences = fingerprint_differences({"data": reference}, {"data": other})
        assert any(d.startswith(f"data.{key}:") for d in differences), (key, differences)
    # Not part of the stream: where the cache lives, how it is read, which window runs, the source subset.
    same = CorruptionStreamDataModule(
        **{**base, "cache_dir": "/elsewhere"}, num_workers=1, stop_domain=2, num_source_images=10
    )
    assert same.stream_fingerprint() == reference


def test_fingerprint_identifies_a_folder_by_content(tmp_path: Path) -> None:
    from PIL import Image

    def folder(name: str, shade: int) -> str:
        for label in ("a", "b"):
            (tmp_path / name / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (shade + i, 10 * i, 0)).save(tmp_path / name / label / f"{i}.png")
        return str(tmp_path / name)

    one, copy, other = folder("one", 0), folder("copy", 0), folder("other", 100)
    fingerprint = CorruptionStreamDataModule(dataset=one, image_size=8).stream_fingerprint()
    assert fingerprint["dataset"] == "folder"
    assert CorruptionStreamDataModule(dataset=copy, image_size=8).stream_fingerprint() == fingerprint
    changed = CorruptionStreamDataModule(dataset=other, image_size=8).stream_fingerprint()
    assert fingerprint_differences({"data": fingerprint}, {"data": changed}) == [
        f"data.test_images: checkpoint {fingerprint['test_images']!r}, this run {changed['test_images']!r}"
    ]


def test_resuming_a_finished_stream_says_so_and_leaves_the_results(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "results"
    callbacks = [StreamCheckpoint(dirpath=str(tmp_path)), ResultsCallback(out_dir=out, plot=False)]
    make_trainer(callbacks, batches=1).test(NoAdaptModule(network=make_vit(0)), datamodule=make_stream(cache_dir))
    written = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.suffix != ".lock"}
    assert "results.json" in written

    messages: list[str] = []
    monkeypatch.setattr(module_mod, "rank_zero_info", messages.append)
    resumed = NoAdaptModule(network=make_vit(0))
    callbacks = [StreamCheckpoint(dirpath=str(tmp_path)), ResultsCallback(out_dir=out, plot=False)]
    results = make_trainer(callbacks, batches=1).test(
        resumed, datamodule=make_stream(cache_dir), ckpt_path=str(tmp_path / "stream-last.ckpt")
    )
    assert results == []
    assert any("already finished: 3 of 3 domains ran" in m for m in messages), messages
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.suffix != ".lock"} == written
    assert [r["domain"] for r in resumed.stream_results()] == [f"r1/{c}" for c in STREAM_CORRUPTIONS]


def test_a_checkpoint_without_fingerprint_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    ckpt = _first_domain(cache_dir, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["zoa_stream"].pop("fingerprint", None)  # not a stream checkpoint this project wrote
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_verified(ckpt, buffer.getvalue())  # whole, with its checksum: refused for what it holds
    resumed = NoAdaptModule(network=make_vit(0))
    with pytest.raises(ValueError, match="holds no stream fingerprint"):
        make_trainer(batches=1).test(resumed, datamodule=make_stream(cache_dir), ckpt_path=str(ckpt))


# ---------------------------------------------------------------------------------------------------------- the CLI
def test_cli_resume_refuses_model_flags_the_checkpoint_would_replace(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = quick_zoa_config(tmp_path, cache_dir, tmp_path / "ckpt", tmp_path / "results")
    make_cli(["test", "-c", str(config), "--data.init_args.stop_domain", "2"])
    ckpt = tmp_path / "ckpt" / "stream-last.ckpt"
    assert torch.load(ckpt, weights_only=True)["zoa_stream"]["next_domain"] == 2

    with pytest.raises(ValueError, match=r"model\.init_args\.lr: checkpoint 0\.0005, command 0\.01") as info:
        make_cli(["test", "-c", str(config), "--model.init_args.lr", "0.01", "--ckpt_path", str(ckpt)])
    assert "start a fresh run without --ckpt_path" in str(info.value)

    # The same configs resume (the linked num_classes is not a difference) and finish the stream ...
    cli = make_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt)])
    assert [r["domain"] for r in cli.model.stream_results()] == [f"r1/{c}" for c in STREAM_CORRUPTIONS]
    results = tmp_path / "results" / "results.json"
    written = results.read_bytes(), results.stat().st_mtime_ns

    # ... and resuming the finished stream says so, exits normally and leaves the results as they are.
    messages: list[str] = []
    monkeypatch.setattr(module_mod, "rank_zero_info", messages.append)
    make_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt)])
    assert any("already finished" in m for m in messages), messages
    assert (results.read_bytes(), results.stat().st_mtime_ns) == written
