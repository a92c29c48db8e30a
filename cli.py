"""The ``zoa`` command: LightningCLI over the stream modules, data modules and callbacks of zoa-lightning.

``zoa test -c configs/demo.yaml`` runs the embedded demo, ``zoa compare -c configs/demo.yaml --methods zoa no_adapt``
compares methods on one stream; configs compose (``-c configs/demo.yaml -c
configs/methods/no_adapt.yaml``) and flags override them (``--model.init_args.lr 0.001``). ``zoa test --help``
documents every argument; ``--print_config`` prints the resolved YAML. From Python, ``make_cli(args=[...], run=False)``
returns the CLI object with ``model``, ``datamodule`` and ``trainer`` built but not run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files only; never wait on a model hub

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from zoa_lightning.module import StreamModule

__all__ = ["ZOACLI", "main", "make_cli"]

_TEST_DEFAULTS = Path(__file__).resolve().parent / "zoa_lightning" / "test_defaults.yaml"


class ZOACLI(LightningCLI):
    """LightningCLI with the class count linked from the data module to the model."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``zoa`` console script; ``zoa compare ...`` runs :mod:`zoa_lightning.compare`.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["compare"]:
        from zoa_lightning.compare import main as compare_main

        compare_main(argv[1:])
        return
    make_cli(args)


def make_cli(args: list[str] | None = None, run: bool = True) -> ZOACLI:
    """Build the CLI; with ``run=False`` only parse and instantiate (then there is no subcommand level).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand.

    Returns:
        The CLI object with ``model``, ``datamodule`` and ``trainer``.
    """
    return ZOACLI(
        StreamModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"test": {"default_config_files": [str(_TEST_DEFAULTS)]}},
        auto_configure_optimizers=False,
        seed_everything_default=2020,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
