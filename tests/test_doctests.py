"""The docstring examples of every module of the packages run and print what they show (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("zoa_lightning", "callbacks", "datamodules")


def _modules() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, f"{package_name}.", onerror=_raise)]
    return names


def _raise(name: str) -> None:
    raise ImportError(f"walking the packages could not import {name}")


MODULES = _modules()


def test_every_package_is_walked() -> None:
    assert {"zoa_lightning.core.zoa", "zoa_lightning.core.stats", "callbacks.results", "datamodules.cache"} <= set(
        MODULES
    )
    assert len(MODULES) == len(set(MODULES))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)  # a module that cannot be imported fails here
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
