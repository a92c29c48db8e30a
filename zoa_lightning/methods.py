"""The stream methods a user can run: one YAML overlay each in ``configs/methods/`` (the single list of methods).

``zoa compare`` and the benchmarks take their method lists from here, so adding ``configs/methods/<name>.yaml`` makes
``<name>`` available everywhere; nothing else keeps a list of methods.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_method_dir", "method_config", "method_names"]

_REPO_METHOD_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


def default_method_dir() -> Path:
    """``configs/methods`` under the working directory if it exists, else the one of this checkout."""
    local = Path("configs") / "methods"
    return local if local.is_dir() else _REPO_METHOD_DIR


def method_names(method_dir: Path | None = None) -> list[str]:
    """Every method with a config in ``method_dir`` (default :func:`default_method_dir`), sorted by name.

    Raises:
        FileNotFoundError: if the folder does not exist.
    """
    folder = method_dir or default_method_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no method configs folder {folder}; run from the repository root or pass its path")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def method_config(name: str, method_dir: Path | None = None) -> Path:
    """The config file of method ``name``.

    Raises:
        FileNotFoundError: for an unknown method; the message lists the known ones.
    """
    folder = method_dir or default_method_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no method config {path}; known methods: {', '.join(method_names(folder))}")
    return path
