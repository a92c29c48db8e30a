"""AdaptationMonitor and StreamCheckpoint: events, metrics through the trainer's loggers, checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader

from callbacks import AdaptationMonitor, StreamCheckpoint
from cli import resolved_config
from tests.helpers import make_stream, make_trainer, make_vit
from zoa_lightning import ZOAModule

BATCHES = 3  # per domain, two domains


class FakeStream(BoringModel):
    """Two domains of three batches; an event after batches 1 and 5 (the last of the stream); a growing bank."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: tuple[float, ...] = ()
        self.start_domain = 0
        self.run_name = "fake"
        self._seen = 0
        self._events: list[dict[str, Any]] = []

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._seen += 1
        self.losses = (1.0 / self._seen, 2.0 / self._seen)
        if self._seen in (2, 6):
            self._events.append({"event": "shift", "batch": self._seen, "entries": 2, "scale_factor": 1.0,
                                 "alpha_new": 0.5, "evicted": self._seen == 6})  # fmt: skip

    def test_dataloader(self) -> dict[str, DataLoader]:
        return {name: DataLoader(torch.randn(BATCHES * 2, 32), batch_size=2) for name in ("r1/a", "r1/b")}

    def pop_adaptation_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def mixing_weights(self) -> Tensor:
        entries = 1 + sum(1 for _ in range(self._seen // 2))
        return torch.full((entries,), 1.0 / entries)

    def skipped_batches(self) -> int:
        return self._seen // 4

    def stream_results(self) -> list[dict[str, Any]]:
        return []

    def run_info(self) -> dict[str, Any]:
        return {"method": "fake", "model": "boring", "bits": "float"}

    def last_losses(self) -> tuple[float, ...]:
        return self.losses


def _trainer(root: Path, callbacks: list[Any], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "inference_mode": False,
        "default_root_dir": root,
        "callbacks": callbacks,
    }
    return Trainer(**{**options, **kwargs})


def _metrics_csv(logger: CSVLogger) -> list[dict[str, str]]:
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_land_in_a_csv_logger_with_the_stream_batch_as_step(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    monitor = AdaptationMonitor(verbose=False)
    _trainer(tmp_path, [monitor], logger=logger).test(FakeStream())
    rows = [r for r in _metrics_csv(logger) if r.get("bank/entries")]
    assert [int(r["step"]) for r in rows] == list(range(2 * BATCHES))
    assert [float(r["stream/domain"]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [float(r["bank/entries"]) for r in rows] == [0, 1, 1, 2, 2, 3]
    assert [float(r["bank/shifts"]) for r in rows] == [0, 1, 1, 1, 1, 2]
    assert [float(r["bank/evictions"]) for r in rows] == [0, 0, 0, 0, 0, 1]
    assert [float(r["adapt/skipped_batches"]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert float(rows[3]["adapt/loss_0"]) == pytest.approx(0.25)
    assert float(rows[3]["adapt/loss_1"]) == pytest.approx(0.5)
    assert float(rows[1]["bank/largest_weight"]) == pytest.approx(0.5)
    assert float(rows[1]["bank/mixing_entropy"]) == pytest.approx(0.6931, abs=1e-4)


def test_log_metrics_off_and_no_logger_log_nothing(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    _trainer(tmp_path, [AdaptationMonitor(log_metrics=False, verbose=False)], logger=logger).test(FakeStream())
    assert not (Path(logger.log_dir) / "metrics.csv").exists()
    monitor = AdaptationMonitor(verbose=False)
    _trainer(tmp_path, [monitor]).test(FakeStream())  # logger=False: the history still fills
    assert len(monitor.history) == 2


@pytest.mark.parametrize("monitor_first", [True, False])
def test_the_checkpoint_holds_the_last_batchs_events_whatever_the_order(tmp_path: Path, monitor_first: bool) -> None:
    monitor, checkpoint = AdaptationMonitor(verbose=False), StreamCheckpoint(dirpath=str(tmp_path))
    _trainer(tmp_path, [monitor, checkpoint] if monitor_first else [checkpoint, monitor]).test(FakeStream())
    saved = torch.load(tmp_path / "stream-last.ckpt", weights_only=True)["callbacks"]["AdaptationMonitor"]
    assert [e["batch"] for e in saved["history"]] == [2, 6]
    assert [e["domain_index"] for e in saved["history"]] == [0, 1]
    assert len(monitor.history) == 2, "collected once, even when the checkpoint asked first"


def test_stream_checkpoint_defaults_to_the_run_folder_and_checks_its_arguments(tmp_path: Path) -> None:
    _trainer(tmp_path, [StreamCheckpoint()]).test(FakeStream())
    assert (tmp_path / "fake" / "stream-last.ckpt").is_file()
    with pytest.raises(ValueError, match=r"filename must end with \.ckpt, got 'x\.pt'"):
        StreamCheckpoint(filename="x.pt")
    assert StreamCheckpoint("a").state_key != StreamCheckpoint("b").state_key
    with pytest.raises(TypeError, match=r"StreamCheckpoint needs a stream module.*BoringModel lacks"):
        _trainer(tmp_path, [StreamCheckpoint()]).test(BoringModel())
    with pytest.raises(TypeError, match=r"AdaptationMonitor needs a stream module"):
        _trainer(tmp_path, [AdaptationMonitor()]).test(BoringModel())


def test_zoa_stream_logs_bank_metrics_and_resumes_the_step(cache_dir: Path, tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs", version=0)
    monitor, checkpoint = AdaptationMonitor(verbose=False), StreamCheckpoint(dirpath=str(tmp_path))
    module = ZOAModule(network=make_vit(0), source_batches=1, detector_min_batch=16, domain_t=0.05)
    make_trainer([monitor, checkpoint], batches=2, logger=logger).test(
        module, datamodule=make_stream(cache_dir, batch_size=32, stop_domain=2)
    )
    rows = [r for r in _metrics_csv(logger) if r.get("bank/entries")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["bank/stores"]) == len([e for e in monitor.history if "entries" in e])
    assert float(rows[-1]["bank/entries"]) >= 1
    assert all(r["adapt/loss_0"] and r["adapt/loss_1"] for r in rows)  # ZOA's (L0, L+) of the batch

    resumed_logger = CSVLogger(tmp_path, name="logs", version=1)
    resumed = ZOAModule(network=make_vit(0), source_batches=1, detector_min_batch=16, domain_t=0.05)
    make_trainer([AdaptationMonitor(verbose=False)], batches=2, logger=resumed_logger).test(
        resumed, datamodule=make_stream(cache_dir, batch_size=32), ckpt_path=str(tmp_path / "stream-last.ckpt")
    )
    assert [int(r["step"]) for r in _metrics_csv(resumed_logger) if r.get("bank/entries")] == [4, 5]


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
BASE_CONFIGS = [c for c in CONFIGS if set(yaml.safe_load(c.read_text())) != {"model"}]  # not overlays (demo_tuned)


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: p.name)
def test_configs_list_the_monitor_before_the_checkpoint_and_demo_configs_log_to_csv(
    config: Path,
) -> None:
    trainer = resolved_config(["-c", str(config)])["trainer"]  # as composed from its parts
    names = [c["class_path"] for c in trainer["callbacks"]]
    assert names.index("callbacks.AdaptationMonitor") < names.index("callbacks.StreamCheckpoint")
    if config.name.startswith("demo"):
        logger = trainer["logger"]
        assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
        assert logger["init_args"]["save_dir"] == trainer["default_root_dir"]


def test_a_model_seed_other_than_the_streams_runs_with_a_logger(cache_dir: Path, tmp_path: Path) -> None:
    # ZOAModule's seed (its perturbation generator) and the data module's seed (the stream) are different settings:
    # Lightning's hparams merge must not refuse them.
    logger = CSVLogger(tmp_path, name="logs", version=0)
    module = ZOAModule(network=make_vit(0), source_batches=1, detector_min_batch=16, seed=7)
    data = make_stream(cache_dir, batch_size=32, stop_domain=1)
    assert data.seed != 7
    make_trainer([AdaptationMonitor(verbose=False)], batches=1, logger=logger).test(module, datamodule=data)
    assert module.adapter is not None
    assert module.adapter.config.seed == 7
