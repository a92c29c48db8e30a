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
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    *,
    resume: bool = False,
    jobs: int = 1,
    log_to_files: bool = False,
) -> list[dict[str, Any]]:
    """Run every method on the stream of ``configs`` and write the comparison into ``out``.

    Args:
        configs: base config files (data, network, trainer), composed in order.
        methods: method names; ``configs/methods/<name>.yaml`` must exist.
        out: output folder; each method runs with ``default_root_dir = out/<method>``.
        extra: further ``zoa test`` arguments applied to every method.
        method_dir: where the method configs live.
        resume: reuse a method's ``results.json`` already under ``out/<method>`` instead of running it again (the
            caller vouches that it came from the same configs).
        jobs: methods run at once; with more than one, each process gets ``cpu_count // jobs`` threads.
        log_to_files: send each run's output to ``out/<method>/log.txt`` instead of the terminal (always so when
            ``jobs > 1``); the comparison table then goes to stderr.

    Returns:
        One summary dict per method (from its ``results.json``), in the order of ``methods``.

    Raises:
        FileNotFoundError: for an unknown method or config.
        RuntimeError: if a method's run fails (its command and log are in the message).
        ValueError: for ``jobs < 1``.
    """
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file not found: {config}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    overlays = [_method_config(m, method_dir) for m in methods]
    out.mkdir(parents=True, exist_ok=True)
    log_to_files = log_to_files or jobs > 1
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def run(method: str, overlay: Path) -> None:
        run_dir = out / method
        if resume and _results_file(run_dir) is not None:
            log.info("reusing %s", _results_file(run_dir))
            return
        command = [sys.executable, "-m", "cli", "test", *(a for c in configs for a in ("-c", c)), "-c", str(overlay)]
        # The method config's name labels the run everywhere (its table, folder and CSV rows), ablations included.
        command += ["--model.init_args.name", method, "--trainer.default_root_dir", str(run_dir), *(extra or [])]
        log.info("running %s: %s", method, " ".join(command))
        Console(stderr=log_to_files).print(f"[bold]zoa compare[/bold]: {method}")
        if log_to_files:
            run_dir.mkdir(parents=True, exist_ok=True)
            with (run_dir / "log.txt").open("w") as handle:
                result = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT, env=env)
        else:
            result = subprocess.run(command, check=False, env=env)
        if result.returncode != 0:
            where = f" (log: {run_dir / 'log.txt'})" if log_to_files else ""
            raise RuntimeError(f"method {method!r} failed (exit {result.returncode}){where}: {' '.join(command)}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run, m, o) for m, o in zip(methods, overlays, strict=True)]:
            future.result()
    summaries, rows_by_method = [], {}
    for method in methods:
        found = _results_file(out / method)
        if found is None:
            raise RuntimeError(f"method {method!r} wrote no results.json under {out / method} (is ResultsCallback on?)")
        data = json.loads(found.read_text())
        summaries.append({**data["summary"], "method": method})
        rows_by_method[method] = data["domains"]
    _write(summaries, rows_by_method, out, Console(stderr=log_to_files))  # stdout stays free for the caller
    return summaries


def _results_file(run_dir: Path) -> Path | None:
    """The newest ``results.json`` under ``run_dir`` (ResultsCallback writes ``<run_dir>/<run name>/``)."""
    found = sorted(run_dir.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _write(
    summaries: list[dict[str, Any]], rows_by_method: dict[str, list[dict[str, Any]]], out: Path, console: Console
) -> None:
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
    console.print(table)
    console.print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")


def main(argv: list[str]) -> None:
    """Parse ``zoa compare`` arguments and run the comparison."""
    parser = argparse.ArgumentParser(prog="zoa compare", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="base config file (repeatable)")
    parser.add_argument("--methods", nargs="+", default=["zoa", "no_adapt"], help="method config names")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    parser.add_argument("--resume", action="store_true", help="reuse results already under --out")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once (threads split between them)")
    args, extra = parser.parse_known_args(argv)
    compare(args.config, args.methods, Path(args.out), extra, resume=args.resume, jobs=args.jobs)
