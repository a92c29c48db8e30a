"""The ``zoa`` command: LightningCLI over the stream modules, data modules and callbacks of zoa-lightning.

``zoa test -c configs/demo.yaml`` runs the embedded demo; configs compose (``-c configs/demo.yaml -c
configs/methods/no_adapt.yaml``) and flags override them (``--model.init_args.lr 0.001``). ``zoa test --help``
documents every argument; ``--print_config`` prints the resolved YAML. From Python, ``main(args=[...], run=False)``
returns the CLI object with ``model``, ``datamodule`` and ``trainer`` built but not run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files only; never wait on a model hub

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from zoa_lightning.module import StreamModule

__all__ = ["ZOACLI", "main"]


class ZOACLI(LightningCLI):
    """LightningCLI with the class count linked from the data module to the model."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> ZOACLI:
    """Entry point of the ``zoa`` console script.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand; ``False`` only parses and instantiates (no subcommand level then).

    Returns:
        The CLI object.
    """
    return ZOACLI(
        StreamModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        seed_everything_default=2020,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
