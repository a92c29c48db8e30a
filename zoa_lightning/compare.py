"""``zoa compare``: run several methods on one stream config and report them side by side.

Each method runs as its own ``zoa test`` process (``-c <base configs> -c configs/methods/<method>.yaml``), so its
peak memory is its own; each writes ``<out>/<method>/results.json`` through ``ResultsCallback``. The comparison then
writes ``<out>/comparison.md`` (markdown table), ``comparison.csv`` and ``comparison.png`` (per-domain top-1 lines,
one per method, the mean in each legend label) and prints the table.

Example::

    zoa compare -c configs/demo.yaml --methods zoa no_adapt norm_adapt t3a foa tent --out runs/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from callbacks.results import plot_accuracy

__all__ = ["compare", "main"]

log = logging.getLogger(__name__)

_METHOD_DIR = Path("configs") / "methods"
_COLUMNS = (
    "method",
    "mean_acc1",
    "mean_acc5",
    "forward_passes_per_batch",
    "seconds_per_batch",
    "peak_memory_mb",
    "bits",
    "model",
)


def _method_config(method: str, method_dir: Path) -> Path:
    path = method_dir / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in method_dir.glob("*.yaml"))
        raise FileNotFoundError(f"no method config {path}; known methods: {', '.join(known)}")
    return path


def compare(
    configs: list[str],
    methods: list[str],
    out: Path,
    extra: list[str] | None = None,
    method_dir: Path = _METHOD_DIR,
) -> list[dict[str, Any]]:
    """Run every method on the stream of ``configs`` and write the comparison into ``out``.

    Args:
        configs: base config files (data, network, trainer), composed in order.
        methods: method names; ``configs/methods/<name>.yaml`` must exist.
        out: output folder; each method runs with ``default_root_dir = out/<method>``.
        extra: further ``zoa test`` arguments applied to every method.
        method_dir: where the method configs live.

    Returns:
        One summary dict per method (from its ``results.json``).

    Raises:
        FileNotFoundError: for an unknown method or config.
        RuntimeError: if a method's run fails (its command is in the message).
    """
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file not found: {config}")
    overlays = [_method_config(m, method_dir) for m in methods]
    out.mkdir(parents=True, exist_ok=True)
    summaries, rows_by_method = [], {}
    for method, overlay in zip(methods, overlays, strict=True):
        run_dir = out / method
        command = [sys.executable, "-m", "cli", "test", *(a for c in configs for a in ("-c", c)), "-c", str(overlay)]
        command += ["--trainer.default_root_dir", str(run_dir), *(extra or [])]
        log.info("running %s: %s", method, " ".join(command))
        Console().print(f"[bold]zoa compare[/bold]: {method}")
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"method {method!r} failed (exit {result.returncode}): {' '.join(command)}")
        # ResultsCallback writes into <default_root_dir>/<method_name>/ (ablations share the name "zoa").
        found = sorted(run_dir.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise RuntimeError(f"method {method!r} wrote no results.json under {run_dir} (is ResultsCallback on?)")
        data = json.loads(found[-1].read_text())
        summary = {**data["summary"], "method": method}
        summaries.append(summary)
        rows_by_method[f"{method}"] = data["domains"]
    _write(summaries, rows_by_method, out)
    return summaries


def _write(summaries: list[dict[str, Any]], rows_by_method: dict[str, list[dict[str, Any]]], out: Path) -> None:
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summaries)
    header = "| method | mean top-1 % | mean top-5 % | passes/batch | s/batch | peak MB | bits |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {s['mean_acc1']:.2f} | {s['mean_acc5']:.2f} | {s['forward_passes_per_batch']:.1f} | "
            f"{s['seconds_per_batch']:.3f} | {s['peak_memory_mb']:.0f} | {s['bits']} |"
        )
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    first = summaries[0]
    plot_accuracy(rows_by_method, out / "comparison.png", title=f"{first['model']} · {first['bits']}")
    table = Table(title=f"zoa compare · {first['model']} · {first['bits']}")
    for column in ("method", "mean top-1 %", "mean top-5 %", "passes/batch", "s/batch", "peak MB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        table.add_row(
            s["method"],
            f"{s['mean_acc1']:.2f}",
            f"{s['mean_acc5']:.2f}",
            f"{s['forward_passes_per_batch']:.1f}",
            f"{s['seconds_per_batch']:.3f}",
            f"{s['peak_memory_mb']:.0f}",
        )
    Console().print(table)
    Console().print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")


def main(argv: list[str]) -> None:
    """Parse ``zoa compare`` arguments and run the comparison."""
    parser = argparse.ArgumentParser(prog="zoa compare", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="base config file (repeatable)")
    parser.add_argument("--methods", nargs="+", default=["zoa", "no_adapt"], help="method config names")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    args, extra = parser.parse_known_args(argv)
    compare(args.config, args.methods, Path(args.out), extra)
