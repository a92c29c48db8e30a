"""benchmarks/learning.py: per-round means, gaps to shift-only, travel and the gathered report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers import make_vit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import learning  # noqa: E402
from zoa_lightning.core import ZOA, ZOAConfig  # noqa: E402


def _result(accs: list[float], travel: float, resets: int | None) -> dict[str, object]:
    rows = [{"domain": f"r{i // 15 + 1}/d{i % 15}", "acc1": a, "n": 10, "travel": [travel, travel / 2]}
            for i, a in enumerate(accs)]  # fmt: skip
    guard = None if resets is None else {"checks": 3, "resets": resets}
    return {"domains": rows, "guard": guard, "seconds": 1.0, "weights": "the shipped demo weights"}


def test_summary_gives_per_round_means_and_travel() -> None:
    accs = [50.0] * 15 + [52.0] * 15 + [51.0] * 15
    s = learning.summary(_result(accs, 0.2, 4))
    assert s["rounds"] == [50.0, 52.0, 51.0]
    assert s["mean"] == 51.0
    assert s["travel_max"] == 0.2
    assert abs(s["travel_mean"] - 0.15) < 1e-12
    assert (s["resets"], s["checks"]) == (4, 3)
    assert learning.summary(_result(accs, 0.0, None))["resets"] == 0


def test_report_gathers_runs_with_their_gap_to_shift_only(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "short_w8a8__shift_only.json").write_text(json.dumps(_result([60.0] * 45, 0.0, 0)))
    (runs / "short_w8a8__per_sample.json").write_text(json.dumps(_result([60.5] * 15 + [59.0] * 30, 0.3, 2)))
    out = tmp_path / "learning.json"
    table = learning.report(tmp_path, out)
    row = next(line for line in table.splitlines() if "| per_sample |" in line)
    assert "+0.50 / -0.50 / +0.50 -1.00 -1.00" in row
    assert "0.300 / 0.225" in row
    assert "| 2 / 3 |" in row
    saved = json.loads(out.read_text())
    assert saved["short_w8a8"]["per_sample"]["rounds"] == [60.5, 59.0, 59.0]

    # Runs gathered from another directory add to the results: a trial is compared with the earlier shift-only run
    other = tmp_path / "seeds"
    (other / "runs").mkdir(parents=True)
    (other / "runs" / "short_w8a8__per_sampleseed1.json").write_text(json.dumps(_result([61.0] * 45, 0.3, 1)))
    table = learning.report(other, out)
    assert "| short_w8a8 | per_sampleseed1 | 61.00 | 61.00 | 61.00 → 61.00 → 61.00 | +1.00 / +1.00 /" in table
    saved = json.loads(out.read_text())
    assert sorted(saved["short_w8a8"]) == ["per_sample", "per_sampleseed1", "shift_only"]


def test_layer_travel_is_the_effective_change_per_layer() -> None:
    adapter = ZOA(make_vit(0), ZOAConfig(estimator="per_sample", normalize_step=True))
    bank = adapter.bank
    bank.theta.zero_()
    bank.theta[bank.offsets[1] : bank.offsets[1] + 2 * bank.widths[1]] = -0.5

    class Module:
        pass

    module = Module()
    module.adapter = adapter  # type: ignore[attr-defined]
    travel = learning.layer_travel(module)
    assert len(travel) == len(bank.widths)
    assert travel[1] == 0.5
    assert travel[0] == 0.0
    assert learning.layer_travel(object()) == []
    assert learning.shown(str(ROOT / "runs" / "w.safetensors")) == str(Path("runs") / "w.safetensors")


def test_results_never_name_an_absolute_path_outside_the_repository(tmp_path: Path) -> None:
    trained = tmp_path / "weights" / "sklearn_digits" / "demo_vit.safetensors"
    assert learning.shown(str(trained), tmp_path) == "<out>/weights/sklearn_digits/demo_vit.safetensors"
    assert learning.shown(str(trained)) == "demo_vit.safetensors"
    assert learning.shown("runs/w.safetensors") == "runs/w.safetensors"
    assert learning.shown(None) == "the shipped demo weights"
