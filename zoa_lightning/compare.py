"""``zoa compare``: run several methods on one stream config and report them side by side.

Each method runs as its own ``zoa test`` process (``-c <stream configs> -c configs/methods/<method>.yaml``), so its
peak memory is its own; each writes ``<out>/<method>/<method>/results.json`` through ``ResultsCallback``. The
comparison then writes ``<out>/comparison.md`` (markdown table), ``comparison.csv`` and ``comparison.png`` (per-domain
top-1 lines, one per method, the mean in each legend label) through :func:`zoa_lightning.reporting.write_comparison`
and prints the table.

Example::

    zoa compare -c configs/demo.yaml --methods zoa no_adapt norm_adapt t3a foa tent --out runs/compare
    zoa compare -c configs/demo.yaml --methods zoa no_adapt --model.init_args.lr 0.001   # flags for every zoa test
    zoa compare -c configs/demo.yaml --methods zoa no_adapt --print_config > compare.yaml
    zoa compare -c compare.yaml --jobs 2                                               # the same comparison again
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
from rich.console import Console

from zoa_lightning.method_configs import method_config, method_names
from zoa_lightning.processes import ChildProcesses
from zoa_lightning.reporting import write_comparison
from zoa_lightning.resume import fingerprint_differences, run_precision, stored_fingerprint

__all__ = [
    "COMPARE_SETTINGS",
    "ChildProcesses",
    "build_parser",
    "compare",
    "main",
    "parse_args",
    "results_file",
    "run_fingerprint",
]

log = logging.getLogger(__name__)

COMPARE_SETTINGS: tuple[str, ...] = ("test_configs", "methods", "out", "resume", "jobs", "log_to_files", "test_args")
"""The keys of a ``zoa compare`` settings file (what ``--print_config`` writes and ``-c`` reads back)."""

#: Options of ``zoa compare`` with how many values follow them: 1, 0 (a switch) or "+" (one or more).
_OPTIONS: dict[str, int | str] = {
    "-c": 1,
    "--config": 1,
    "--test_configs": 1,
    "--test_configs+": 1,
    "--methods": "+",
    "--methods+": "+",
    "--out": 1,
    "--jobs": 1,
    "--resume": 0,
    "--no_resume": 0,
    "--log_to_files": 0,
    "--no_log_to_files": 0,
    "-h": 0,
    "--help": 0,
    "--print_config": 0,
}
_CONFIG_OPTIONS = ("-c", "--config")


def results_file(run_dir: Path) -> Path | None:
    """The newest ``results.json`` under ``run_dir`` (``ResultsCallback`` writes ``<run_dir>/<run name>/``).

    Args:
        run_dir: the folder a method ran in (``<out>/<method>``).

    Returns:
        The file, or ``None`` if the run wrote none.
    """
    found = sorted(run_dir.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def compare(
    configs: Sequence[str],
    methods: Sequence[str],
    out: Path,
    extra: Sequence[str] | None = None,
    method_dir: Path | None = None,
    *,
    resume: bool = False,
    jobs: int = 1,
    log_to_files: bool = False,
) -> list[dict[str, Any]]:
    """Run every method on the stream of ``configs`` and write the comparison into ``out``.

    Args:
        configs: stream config files (data, network, trainer), composed in order as ``zoa test -c`` composes them.
        methods: method names (:func:`zoa_lightning.method_configs.method_names`).
        out: output folder; each method runs with ``default_root_dir = out/<method>``, and a logger of the configs
            with a ``save_dir`` logs there too.
        extra: further ``zoa test`` arguments applied to every method (e.g. ``["--model.init_args.lr", "0.01"]``).
        method_dir: where the method configs live (default :func:`zoa_lightning.method_configs.default_method_dir`).
        resume: reuse a method's ``results.json`` already under ``out/<method>`` if it is this setting's (its stream,
            method settings and precision, as recorded in the file, equal those of the configs and flags now), and
            continue a method's unfinished stream checkpoint of this setting instead of starting it again; anything
            else under ``out/<method>`` is run again (the fresh run names what it replaces).
        jobs: methods run at once; with more than one, each process gets ``cpu_count // jobs`` threads.
        log_to_files: send each run's output to ``out/<method>/log.txt`` instead of the terminal (always so when
            ``jobs > 1``); the comparison table then goes to stderr.

    Returns:
        One summary dict per method (from its ``results.json``), in the order of ``methods``.

    Raises:
        FileNotFoundError: for an unknown method or a missing config file.
        RuntimeError: if a method's run fails (its command and log are in the message).
        ValueError: for ``jobs < 1`` or no config or method.
    """
    if not configs:
        raise ValueError("no stream config given: pass at least one `zoa test` config, e.g. -c configs/demo.yaml")
    if not methods:
        raise ValueError("no method given: pass --methods with at least one name, e.g. --methods zoa no_adapt")
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file not found: {config}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}; pass --jobs 1 to run the methods one after the other")
    overlays = [method_config(m, method_dir) for m in methods]
    out.mkdir(parents=True, exist_ok=True)
    log_to_files = log_to_files or jobs > 1
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    logger_dir = _logger_save_dir_flag(configs)

    def run(method: str, overlay: Path) -> None:
        run_dir = out / method
        args = [*(a for c in configs for a in ("-c", c)), "-c", str(overlay)]
        # The method config's name labels the run everywhere (its table, folder and CSV rows), ablations included.
        args += ["--model.init_args.name", method, "--trainer.default_root_dir", str(run_dir)]
        args += [logger_dir, str(run_dir)] if logger_dir else []
        args += list(extra or [])
        if resume:
            decision = _resume_decision(method, run_dir, args)
            if decision is None:
                return
            args += decision
        command = [sys.executable, "-m", "cli", "test", *args]
        log.info("running %s: %s", method, " ".join(command))
        Console(stderr=log_to_files).print(f"[bold]zoa compare[/bold]: {method}")
        if log_to_files:
            run_dir.mkdir(parents=True, exist_ok=True)
            with (run_dir / "log.txt").open("w") as handle:
                code = children.run(command, stdout=handle, env=env)
        else:
            code = children.run(command, env=env)
        if code != 0:
            where = f" (log: {run_dir / 'log.txt'})" if log_to_files else ""
            raise RuntimeError(f"method {method!r} failed (exit {code}){where}: {' '.join(command)}")

    children = ChildProcesses()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, m, o) for m, o in zip(methods, overlays, strict=True)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # Interrupted (Ctrl-C) or a method failed: no `zoa test` is left running (nor writing results later), and
            # none starts; the pool then only waits for threads whose child is already ending.
            children.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    summaries, rows_by_method = [], {}
    for method in methods:
        found = results_file(out / method)
        if found is None:
            raise RuntimeError(f"method {method!r} wrote no results.json under {out / method} (is ResultsCallback on?)")
        data = json.loads(found.read_text())
        summaries.append({**data["summary"], "method": method})
        rows_by_method[method] = data["domains"]
    write_comparison(summaries, rows_by_method, out, Console(stderr=log_to_files))  # stdout stays free for the caller
    return summaries


def _resume_decision(method: str, run_dir: Path, args: Sequence[str]) -> list[str] | None:
    """What ``--resume`` does for one method: ``None`` to reuse its results, else the extra ``zoa test`` arguments.

    Results are reused only if ``results.json`` records this setting's fingerprint (stream, method settings,
    precision); an unfinished stream checkpoint of this setting is continued (``--ckpt_path``); anything else runs
    afresh.
    """
    expected = run_fingerprint(args)
    found = results_file(run_dir)
    if found is not None:
        stored = json.loads(found.read_text()).get("fingerprint")
        differences = fingerprint_differences(stored or {}, expected) if stored else ["no fingerprint recorded"]
        if not differences:
            log.info("reusing %s", found)
            Console(stderr=True).print(f"[bold]zoa compare[/bold]: {method}: reusing {found}")
            return None
        Console(stderr=True).print(
            f"[bold]zoa compare[/bold]: {method}: {found} is not this setting's ({'; '.join(differences[:3])}): "
            "running it again"
        )
    for checkpoint in sorted(run_dir.glob("*/stream-last.ckpt")):
        try:
            stored_checkpoint = stored_fingerprint(checkpoint)
        except (ValueError, OSError) as error:
            Console(stderr=True).print(f"[bold]zoa compare[/bold]: {method}: not continuing {checkpoint} ({error})")
            continue
        if stored_checkpoint is not None and not fingerprint_differences(stored_checkpoint, expected):
            Console(stderr=True).print(f"[bold]zoa compare[/bold]: {method}: continuing {checkpoint}")
            return ["--ckpt_path", str(checkpoint)]
    return []


def run_fingerprint(args: Sequence[str]) -> dict[str, Any]:
    """The fingerprint a ``zoa test`` run with ``args`` records (stream, method settings, precision), without running.

    Builds the run's module, data module and callbacks as ``zoa test`` does (the network included, no data loaded)
    and asks the module (:meth:`~zoa_lightning.methods.base.StreamModule.stream_fingerprint`).
    """
    from cli import make_cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        cli = make_cli(list(args), run=False)
    precision = run_precision(cli.trainer.callbacks)  # type: ignore[attr-defined]
    return cli.model.stream_fingerprint(cli.datamodule, precision)


def _logger_save_dir_flag(configs: Sequence[str]) -> str | None:
    """The flag that moves the configs' logger into a method's run folder, if the configs set one with a folder.

    The logger is read from the configs composed as ``zoa test`` composes them (:func:`cli.resolved_config`: a config
    may take its logger from a config it includes); a logger with ``init_args.save_dir`` (e.g.
    ``lightning.pytorch.loggers.CSVLogger``) is moved, anything else is left alone.
    """
    from cli import resolved_config  # the zoa test parser; compare runs `python -m cli test` anyway

    logger: Any = resolved_config([a for c in configs for a in ("-c", c)]).get("trainer", {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        return "--trainer.logger.init_args.save_dir"
    return None


# ---------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> ArgumentParser:
    """The ``zoa compare`` parser: jsonargparse, with ``--help``, ``-c/--config`` and ``--print_config``.

    Returns:
        The parser of the compare settings (:data:`COMPARE_SETTINGS`); :func:`parse_args` sorts the command line
        into it and the ``zoa test`` flags passed through.
    """
    try:
        known = f" Known: {', '.join(method_names())}."
    except FileNotFoundError:
        known = ""
    parser = ArgumentParser(
        prog="zoa compare",
        description=(
            "Run several methods on one stream, each as its own `zoa test` process, and write comparison.md, "
            "comparison.csv and comparison.png into --out. Every argument that is not an option below (e.g. "
            "`--model.init_args.lr 0.01`, `--data.init_args.rounds 2`) is passed to every `zoa test` run."
        ),
        exit_on_error=False,
    )
    parser.add_argument(
        "-c",
        "--config",
        action=ActionConfigFile,
        help=(
            "A `zoa test` config of the stream (data, network, trainer), or a compare settings file as "
            "--print_config writes it. Repeatable; stream configs are composed in order, as `zoa test -c` does."
        ),
    )
    parser.add_argument("--test_configs", type=list[str], default=[], help="The stream configs (what -c collects).")
    parser.add_argument(
        "--methods",
        type=str,
        nargs="+",
        default=["zoa", "no_adapt"],
        help=f"Method names, one config each in configs/methods/.{known}",
    )
    parser.add_argument("--out", type=str, default="runs/compare", help="Output folder; one sub-folder per method.")
    parser.add_argument(
        "--resume",
        action=ActionYesNo,
        default=False,
        help=(
            "Reuse a method's results under --out if they are this setting's; continue its unfinished stream "
            "checkpoint of this setting."
        ),
    )
    parser.add_argument("--jobs", type=int, default=1, help="Methods run at once (the CPU threads are split).")
    parser.add_argument(
        "--log_to_files",
        action=ActionYesNo,
        default=False,
        help="Write each run's output to <out>/<method>/log.txt (always so with --jobs > 1).",
    )
    parser.add_argument(
        "--test_args",
        type=list[str],
        default=[],
        help="Arguments for every `zoa test` run (the pass-through flags of the command line are appended).",
    )
    return parser


def parse_args(argv: Sequence[str]) -> tuple[Namespace, bool]:
    """Parse a ``zoa compare`` command line.

    The options of :func:`build_parser` are parsed by jsonargparse; everything else is a ``zoa test`` argument and is
    appended to ``test_args``. A ``-c`` file whose keys are compare settings (:data:`COMPARE_SETTINGS`) is read as
    settings; any other ``-c`` file is a stream config and joins ``test_configs``.

    Args:
        argv: the arguments after ``zoa compare``.

    Returns:
        The settings, and whether ``--print_config`` asked to print them instead of running.

    Raises:
        jsonargparse.ArgumentError: for a bad option value or a settings file with unknown keys.
    """
    own: list[str] = []
    passed: list[str] = []
    print_config = False
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value, value = token.partition("=")
        if name not in _OPTIONS:
            passed.append(token)
            i += 1
            while i < len(argv) and _is_value(argv[i]) and not has_value:
                passed.append(argv[i])
                i += 1
            continue
        count = _OPTIONS[name]
        values: list[str] = [value] if has_value else []
        i += 1
        if not has_value and count == 1 and i < len(argv):
            values, i = [argv[i]], i + 1
        elif not has_value and count == "+":
            while i < len(argv) and _is_value(argv[i]):
                values.append(argv[i])
                i += 1
        if name == "--print_config":
            print_config = True
        elif name in _CONFIG_OPTIONS and values and not _is_settings_file(values[0]):
            own += ["--test_configs+", values[0]]
        else:
            own += [name, *values]
    settings = build_parser().parse_args(own)
    settings.test_args = [*settings.test_args, *passed]
    return settings, print_config


def _is_value(token: str) -> bool:
    """Whether ``token`` is a value rather than an option (negative numbers are values)."""
    return not token.startswith("-") or token[1:2].isdigit() or token[1:2] == "."


def _is_settings_file(path: str) -> bool:
    """Whether the YAML file at ``path`` holds compare settings (only :data:`COMPARE_SETTINGS` keys)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # a stream config: zoa test reports what is wrong with it
    return isinstance(data, dict) and bool(data) and set(data) <= set(COMPARE_SETTINGS)


def main(argv: Sequence[str]) -> None:
    """Parse ``zoa compare`` arguments and run the comparison (or print its settings with ``--print_config``).

    A bad option is reported as one line, ``zoa compare: error: ...``, with exit status 2.

    Args:
        argv: the arguments after ``zoa compare``.
    """
    from jsonargparse import ArgumentError

    try:
        settings, print_config = parse_args(argv)
    except ArgumentError as error:
        message = " ".join(str(error).split())
        sys.stderr.write(f"zoa compare: error: {message} (run `zoa compare --help` for every option)\n")
        sys.exit(2)
    if print_config:
        sys.stdout.write(build_parser().dump(settings))
        return
    compare(
        settings.test_configs,
        settings.methods,
        Path(settings.out),
        settings.test_args,
        resume=settings.resume,
        jobs=settings.jobs,
        log_to_files=settings.log_to_files,
    )
