"""`zoa compare`: several methods on one stream, one table, one CSV, one plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from zoa_lightning.compare import compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_runs_each_method_and_writes_the_report(tmp_path: Path, cache_dir: Path) -> None:
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "Quantization" not in c["class_path"]
    ]
    config["trainer"]["limit_test_batches"] = 2
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]
    ]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["network"] = "demo_cnn"
    config["data"]["init_args"].update(
        corruptions=["gaussian_noise", "brightness"], cache_dir=str(cache_dir), num_source_images=128
    )
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    os.chdir(ROOT)
    summaries = compare([str(path)], ["zoa", "no_adapt"], tmp_path / "out")
    assert [s["method"] for s in summaries] == ["zoa", "no_adapt"]
    assert summaries[0]["forward_passes_per_batch"] == pytest.approx(2.0)
    assert summaries[1]["forward_passes_per_batch"] == pytest.approx(1.0)
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["zoa", "no_adapt"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zoa |" in (tmp_path / "out" / "comparison.md").read_text()


def test_unknown_method_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_adapt"):
        compare([str(ROOT / "configs/demo.yaml")], ["nonsense"], tmp_path, method_dir=ROOT / "configs/methods")
