"""The stream methods a user can run: one YAML overlay each in ``configs/methods/`` (the single list of methods).

``zoa compare`` and the benchmarks take their method lists from here, so adding ``configs/methods/<name>.yaml`` makes
``<name>`` available everywhere; nothing else keeps a list of methods. The same files ship inside the installed
package (``zoa_lightning/method_yaml/``), so ``zoa compare`` works from an installed package too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["default_method_dir", "method_config", "method_names"]

_CHECKOUT_METHOD_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


def _installed_method_dir() -> Path | None:
    """The method configs installed with the package (a wheel ships them as ``zoa_lightning/method_yaml``)."""
    try:
        folder = Path(str(resources.files("zoa_lightning") / "method_yaml"))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - the package is always importable here
        return None
    return folder if folder.is_dir() else None


def default_method_dir() -> Path:
    """The folder of the method configs.

    ``configs/methods`` under the working directory if it exists, else the installed package's copy, else the
    checkout's ``configs/methods`` (an editable install).

    Raises:
        FileNotFoundError: if none of them exists.
    """
    for folder in (Path("configs") / "methods", _installed_method_dir(), _CHECKOUT_METHOD_DIR):
        if folder is not None and folder.is_dir():
            return folder
    raise FileNotFoundError(
        "no method configs found: neither ./configs/methods nor the installed package's method_yaml exist; "
        "reinstall zoa-lightning or pass the folder of the method configs"
    )


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
