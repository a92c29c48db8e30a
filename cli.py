"""The ``zoa`` command: LightningCLI over the stream modules, data modules and callbacks of zoa-lightning.

``zoa test -c configs/demo.yaml`` runs the embedded demo, ``zoa compare -c configs/demo.yaml --methods zoa no_adapt``
compares methods on one stream, ``zoa export -c configs/demo.yaml --out graphs`` writes the ONNX graphs the ONNX
Runtime backend runs (docs/runtime.md); configs compose (``-c configs/demo.yaml -c
configs/methods/no_adapt.yaml``) and flags override them (``--model.init_args.lr 0.001``). ``zoa test --help``
documents every argument; ``--print_config`` prints the resolved YAML. From Python, ``make_cli(args=[...], run=False)``
returns the CLI object with ``model``, ``datamodule`` and ``trainer`` built but not run, and
``resolved_config([...])`` the config that ``zoa test`` arguments resolve to (the configs include parts of
``configs/parts/`` and each other, see the README's "Configs").
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files only; never wait on a model hub

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from zoa_lightning.methods import StreamModule
from zoa_lightning.resume import check_same_stream, run_precision, stored_fingerprint, verify_stream_checkpoint
from zoa_lightning.run_folder import (
    RunFolderError,
    RunFolderWriter,
    claim_logger_version,
    claim_run_folder,
    describe_earlier_run,
)

__all__ = ["ZOACLI", "ConfigError", "export_graphs", "main", "make_cli", "resolved_config"]

_TEST_DEFAULTS = Path(__file__).resolve().parent / "zoa_lightning" / "test_defaults.yaml"


class ZOACLI(LightningCLI):
    """LightningCLI with the class count linked from the data module to the model.

    ``test --ckpt_path`` resumes a stream with the model settings stored in the checkpoint: Lightning loads them over
    the model section of the configs and flags. A command asking for other model settings is refused with an error
    naming each one, instead of having them silently replaced.
    """

    _requested_model: dict[str, Any] | None = None
    _named: set[Path]

    @override
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._named = set()
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:  # before Lightning reads the checkpoint's hyperparameters: it must be whole
            try:
                verify_stream_checkpoint(ckpt_path)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(str(error)) from error
        self._requested_model = _resumed_model_section(self.config)  # before the checkpoint's settings replace it

    @override
    def before_instantiate_classes(self) -> None:
        _refuse_replaced_model_settings(self.config, self._requested_model)

    def before_test(self) -> None:
        """Before any work of ``zoa test``: check a resumed checkpoint, claim the run folders, name an earlier run.

        A resumed checkpoint must be of this very stream, method and precision (checked here, before the corruption
        cache is built or the network quantized, and again when it is loaded).

        Every folder a callback writes into is created, checked writable and held by this run (a second run into it
        stops here, naming this one); a fresh run names the results and stream checkpoint an earlier run left there
        (nothing of them is touched until this run writes its own); each logger's version folder is made while its
        folder is held, so concurrent runs never share one. Only the first process of a run does this.
        """
        if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            return  # a DDP child process: the launching process claimed the folders
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:  # the whole fingerprint (stream, method, precision), before any data or quantization work
            precision = run_precision(self.trainer.callbacks)  # type: ignore[attr-defined]
            current = self.model.stream_fingerprint(self.datamodule, precision)
            try:
                check_same_stream(stored_fingerprint(ckpt_path), current, str(ckpt_path))
            except ValueError as error:  # another stream, method or precision than the flags ask for: exit status 2
                raise ConfigError(str(error)) from error
        fresh = not ckpt_path
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, RunFolderWriter):
                try:
                    folder = claim_run_folder(callback.run_folder(self.trainer, self.model))
                except RunFolderError as error:  # a folder the flags point at cannot be written: exit status 2
                    raise ConfigError(str(error)) from error
                earlier = describe_earlier_run(folder) if fresh else None
                if earlier is not None and folder not in self._named:
                    self._named.add(folder)
                    rank_zero_info(
                        f"{folder} holds an earlier run's {earlier}. This fresh run replaces its results when it "
                        "writes its own (at its end) and keeps its stream checkpoint as stream-last.previous.ckpt; "
                        "pass --trainer.default_root_dir <another folder> to keep the runs apart"
                    )
        for logger in self.trainer.loggers:
            if logger.root_dir is not None:
                claim_logger_version(logger.root_dir, lambda logger=logger: logger.log_dir)

    @override
    def instantiate_classes(self) -> None:
        """Build the classes; a value a constructor refuses is a bad argument (:class:`ConfigError`, exit status 2)."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise ConfigError(error_message(error)) from error


class ConfigError(ValueError):
    """A config value or argument that a class refused when it was built: reported like a parser error (exit 2)."""


def _resumed_model_section(config: Any) -> dict[str, Any] | None:
    """The model section (a plain dict) of a ``<subcommand> --ckpt_path`` command, else ``None``."""
    subcommand = config.get("subcommand")
    if not subcommand or not config[subcommand].get("ckpt_path"):
        return None
    model = config[subcommand].get("model")
    return model.as_dict() if isinstance(model, Namespace) else None


def _refuse_replaced_model_settings(config: Any, requested: dict[str, Any] | None) -> None:
    """Raise if the checkpoint's hyperparameters replaced model settings that the command asked for.

    Args:
        config: the CLI's config after Lightning applied the checkpoint's hyperparameters.
        requested: the model section as the configs and flags gave it (:func:`_resumed_model_section`).

    Raises:
        ValueError: naming every replaced setting with the checkpoint's and the command's value. ``num_classes`` is
            not compared: it is linked from the data module, and the stream checkpoint checks the data itself.
    """
    applied = _resumed_model_section(config)
    if requested is None or applied is None:
        return
    replaced = []
    class_paths = applied.get("class_path"), requested.get("class_path")
    if class_paths[0] != class_paths[1]:
        replaced.append(f"model.class_path: checkpoint {class_paths[0]}, command {class_paths[1]}")
    wanted, stored = requested.get("init_args") or {}, applied.get("init_args") or {}
    for key, value in wanted.items():
        if key != "num_classes" and key in stored and stored[key] != value:
            replaced.append(f"model.init_args.{key}: checkpoint {stored[key]!r}, command {value!r}")
    if replaced:
        path = config[config["subcommand"]]["ckpt_path"]
        raise ValueError(
            f"--ckpt_path {path} resumes a stream with the model settings stored in that checkpoint, which Lightning "
            "loads over the model config, but this command asks for others that would be silently ignored: "
            + "; ".join(replaced)
            + ". Resume with the same configs and flags as the run that wrote the checkpoint, or start a fresh run "
            "without --ckpt_path to use the new settings"
        )


DEBUG_ENV_VAR = "ZOA_DEBUG"
"""Set to ``1`` to see the full traceback of an error instead of its message alone."""

_NOISE = (
    "💡 Tip: For seamless cloud logging",  # Lightning's LitLogger advertisement, printed by every Trainer
    "Seed set to ",  # the seed is in the config (seed_everything) and in the saved config.yaml
)
# Lightning 2.6 calls a deprecated torch pytree API on every test run; nothing a user can act on.
_LEAFSPEC_WARNING = r".*isinstance\(treespec, LeafSpec\).*"
# Lines of jsonargparse's union-type errors that repeat what the line above says or show its internals.
_ARGPARSE_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|^\s*Subtypes:|^\s*Errors:|Expected a <class 'NoneType'>"
    r"|^\s*Given value( type)?:|^\s*- Problem with given class_path|^\s*Not a valid subclass of"
    r"|^\s*Subclass types expect one of:|^\s*a class path \(str\)$|^\s*a dict (with|without) "
)
_PARSER_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":\s*(.*)$')


class _DropNoise(logging.Filter):
    """Drop the log records listed in :data:`_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(noise) for noise in _NOISE)


def quiet_lightning() -> None:
    """Silence Lightning's per-run advertisement, the seed line and a deprecation warning from its own internals."""
    loggers = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    )
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING)
    warnings.formatwarning = warning_line  # a warning is one line for a user: no source line of the code behind it
    # A resumed stream that is already finished serves no domain (the module says so); Lightning's remark is noise.
    warnings.filterwarnings("ignore", message=r"Total length of `OrderedDict` across ranks is zero")


def warning_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """How ``zoa`` prints a warning: its kind and message on one line (``warnings.formatwarning``'s signature)."""
    return f"{category.__name__}: {message}\n"


def error_message(error: BaseException) -> str:
    """The user-facing text of an error, on one line where possible.

    jsonargparse nests its messages (``Parser key "model":`` / ``Parser key "lr":`` / the problem) and lists the
    union types it tried; this keeps the problem, prefixed with the dotted key path (``model.lr: ...``).
    """
    text = str(error).strip() or type(error).__name__
    keys: list[str] = []
    messages: list[str] = []
    for line in text.splitlines():
        match = _PARSER_KEY.match(line)
        if match:
            keys.append(match.group(1))
            line = match.group(2)
        if line.strip() and not _ARGPARSE_NOISE.search(line):
            messages.append(line.strip().removeprefix("- "))
    if not messages:
        return text
    message = "\n".join(messages)
    return f"{'.'.join(keys)}: {message}" if keys else message


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``zoa`` console script (``zoa compare`` and ``zoa export`` are dispatched here).

    ``zoa compare ...`` runs :mod:`zoa_lightning.compare`, ``zoa export ...`` :func:`export_graphs`.

    An error (a bad config value, a missing file, a diverged run) is printed as its message alone, first and last
    line, with exit status 2 for arguments and 1 otherwise; ``ZOA_DEBUG=1`` shows the full traceback instead.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
    """
    from jsonargparse import ArgumentError

    argv = sys.argv[1:] if args is None else args
    quiet_lightning()
    debug = os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0")
    try:
        if argv[:1] == ["compare"]:
            from zoa_lightning.compare import main as compare_main

            compare_main(argv[1:])
            return
        if argv[:1] == ["export"]:
            export_graphs(argv[1:])
            return
        make_cli(args, exit_on_error=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        if debug:
            raise
        usage = isinstance(error, ArgumentError | ConfigError)
        message = error_message(error)
        hint = "run `zoa test --help` for every option" if usage else f"set {DEBUG_ENV_VAR}=1 for the traceback"
        kind = "" if usage or isinstance(error, ValueError | FileNotFoundError) else f"{type(error).__name__}: "
        sys.stderr.write(f"zoa: error: {kind}{message} ({hint})\n")
        logging.getLogger(__name__).debug("".join(traceback.format_exception(error)))
        sys.exit(2 if usage else 1)


def make_cli(args: list[str] | None = None, run: bool = True, *, exit_on_error: bool = True) -> ZOACLI:
    """Build the CLI; with ``run=False`` only parse and instantiate (then there is no subcommand level).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand.
        exit_on_error: print usage and exit on a bad argument (jsonargparse's default); ``False`` raises
            ``jsonargparse.ArgumentError`` instead (what :func:`main` uses to print the message alone).

    Returns:
        The CLI object with ``model``, ``datamodule`` and ``trainer``.
    """
    return ZOACLI(
        StreamModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "exit_on_error": exit_on_error,
            "test": {"default_config_files": [str(_TEST_DEFAULTS)], "exit_on_error": exit_on_error},
        },
        auto_configure_optimizers=False,
        seed_everything_default=2020,
        args=args,
        run=run,
    )


EXPORT_USAGE = (
    "zoa export -c <config.yaml> [-c <method.yaml>] [--out FOLDER] [zoa test flags]: write the float and INT8 ONNX "
    "graphs of the config's network for its method, and a JSON sidecar (docs/runtime.md)"
)


def export_graphs(args: list[str]) -> dict[str, Path]:
    """``zoa export``: the float and INT8 graphs that ``callbacks.OnnxRuntimeCallback`` would run for these configs.

    The configs and flags are those of ``zoa test``; the network and the method's adapted layers come from the model
    section, the calibration images from the data section (the count from the config's ``OnnxRuntimeCallback`` or
    ``QuantizationCallback``, else 32). Writes ``<out>/<network>-<method>.float.onnx``, ``.int8.onnx`` and ``.json``
    (``--out`` defaults to ``graphs``).

    Args:
        args: the arguments after ``zoa export``.

    Returns:
        ``{"float": path, "int8": path}``.

    Raises:
        ValueError: without arguments, or for a method that cannot run on ONNX Runtime.
    """
    import torch

    from callbacks.onnx_runtime import OnnxRuntimeCallback
    from zoa_lightning.core.protocols import RuntimeModule
    from zoa_lightning.core.runtime.graphs import write_graphs

    out, rest, i = Path("graphs"), [], 0
    while i < len(args):
        if args[i] == "--out" and i + 1 < len(args):
            out, i = Path(args[i + 1]), i + 2
        elif args[i].startswith("--out="):
            out, i = Path(args[i].split("=", 1)[1]), i + 1
        elif args[i] in ("-h", "--help"):
            print(EXPORT_USAGE)
            return {}
        else:
            rest.append(args[i])
            i += 1
    if not rest:
        raise ValueError(f"zoa export needs a config: {EXPORT_USAGE}")
    cli = make_cli(rest, run=False, exit_on_error=False)
    module, data = cli.model, cli.datamodule
    if not isinstance(module, RuntimeModule) or not isinstance(module, StreamModule):
        raise ValueError(f"{type(module).__name__} cannot run on ONNX Runtime: export no_adapt or a ZOA configuration")
    callbacks = cli.trainer.callbacks  # type: ignore[attr-defined]  # a Trainer property mypy does not see
    runtime = next((c for c in callbacks if isinstance(c, OnnxRuntimeCallback)), OnnxRuntimeCallback())
    network = module.get_network()
    layout = module.runtime_layout(network)
    data.prepare_data()
    images = data.calibration_images(runtime.calibration_count(callbacks)).cpu()
    stem = f"{module.network_name}-{module.run_name}"
    with torch.no_grad():
        paths = write_graphs(network, layout, images, out, stem)
    for path in (*paths.values(), out / f"{stem}.json"):
        print(f"wrote {path}")
    print(f"run one with: --trainer.callbacks+=callbacks.OnnxRuntimeCallback --trainer.callbacks.graph {paths['int8']}")
    return paths


def resolved_config(args: Sequence[str]) -> dict[str, Any]:
    """The config that ``zoa test`` arguments resolve to: what ``zoa test ARGS --print_config`` prints, as YAML data.

    A config in ``configs/`` names its parts and may include another config (``config: vit_b16_w8a8.yaml``,
    ``model: parts/model/...``), so its own YAML does not hold every value; code that needs one (``zoa compare``,
    the tests) reads it from here, composed exactly as ``zoa test`` composes it. Nothing is instantiated or run.

    Args:
        args: ``zoa test`` arguments, e.g. ``["-c", "configs/demo.yaml", "--model.init_args.lr", "0.001"]``.

    Returns:
        Every section (``seed_everything``, ``trainer``, ``model``, ``data``, ``ckpt_path``, ...), defaults filled in.

    Raises:
        jsonargparse.ArgumentError: for arguments ``zoa test`` refuses (a missing file, an unknown key, a bad value).
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            # Called inside another command (zoa compare ...): Lightning warns that sys.argv is not what it parses.
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
            make_cli(["test", *args, "--print_config"], exit_on_error=False)
    except SystemExit as done:  # --print_config prints, then exits with status 0
        if done.code not in (0, None):
            raise
    data = yaml.safe_load(printed.getvalue())
    if not isinstance(data, dict):
        raise RuntimeError(f"zoa test {' '.join(args)} --print_config printed no config: {printed.getvalue()[:200]!r}")
    return data


if __name__ == "__main__":
    main()
