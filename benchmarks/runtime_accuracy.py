"""Accuracy on the demo stream, ONNX Runtime INT8 beside PyTorch fake-quant W8A8: does each method gain as much?

Run ``python benchmarks/runtime_accuracy.py [--methods no_adapt zoa_shift_only zoa zoa_per_sample] [--out FOLDER]``.

Both backends run ``zoa compare`` on the demo stream (15 corruptions at severity 5, one round): PyTorch W8A8 with
``-c configs/demo.yaml`` (the fake quantizer), ONNX Runtime INT8 with ``-c configs/demo_onnx.yaml`` (ONNX Runtime's
static quantizer on the same 32 calibration images; the graph ``no_adapt`` runs is the plain one), each method then
composed with ``-c configs/methods/<method>.yaml``. The report gives every method's mean top-1, its gain over its own
backend's ``no_adapt``, and how far the ONNX Runtime gain is from the PyTorch one (target: within 0.5 point).
Results land in ``<out>/torch_w8a8/`` and ``<out>/ort_int8/`` (each method's ``results.json``, the comparison) and in
``<out>/runtime_accuracy.json`` and ``.md``; ``--resume`` (default on) reuses methods that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoa_lightning.compare import compare

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"torch_w8a8": ROOT / "configs" / "demo.yaml", "ort_int8": ROOT / "configs" / "demo_onnx.yaml"}
TARGET_GAP = 0.5


def report(means: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Gains over each backend's ``no_adapt`` and the gap between the backends' gains, per method."""
    rows = {}
    for method in means["torch_w8a8"]:
        gains = {b: means[b][method] - means[b]["no_adapt"] for b in BACKENDS}
        gap = gains["ort_int8"] - gains["torch_w8a8"]
        rows[method] = {
            **{f"{b}_acc1": means[b][method] for b in BACKENDS},
            **{f"{b}_gain": gains[b] for b in BACKENDS},
            "gain_gap": gap,
            "within_target": abs(gap) <= TARGET_GAP,
        }
    return rows


def markdown(rows: dict[str, Any]) -> str:
    """One row per method."""
    lines = [
        "| method | PyTorch W8A8 top-1 | gain | ORT INT8 top-1 | gain | gain gap (ORT − PyTorch) | within 0.5 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for method, r in rows.items():
        lines.append(
            f"| {method} | {r['torch_w8a8_acc1']:.2f} | {r['torch_w8a8_gain']:+.2f} | {r['ort_int8_acc1']:.2f} | "
            f"{r['ort_int8_gain']:+.2f} | {r['gain_gap']:+.2f} | {'yes' if r['within_target'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both backends (or reuse their results), write and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["no_adapt", "zoa_shift_only", "zoa", "zoa_per_sample"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "runtime_accuracy")
    parser.add_argument("--jobs", type=int, default=1, help="method processes at once")
    parser.add_argument("--no-resume", action="store_true", help="rerun methods that already have results")
    args = parser.parse_args(argv)
    methods = ["no_adapt", *(m for m in args.methods if m != "no_adapt")]
    os.chdir(ROOT)  # configs and `python -m cli` resolve from the repository root
    means: dict[str, dict[str, float]] = {}
    for backend, config in BACKENDS.items():
        summaries = compare([str(config)], methods, args.out / backend, resume=not args.no_resume, jobs=args.jobs,
                            log_to_files=True)  # fmt: skip
        means[backend] = {s["method"]: float(s["mean_acc1"]) for s in summaries}
    rows = report(means)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "runtime_accuracy.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
