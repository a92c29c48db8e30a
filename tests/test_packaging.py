"""The distribution: every package of the tree is listed in pyproject.toml, and a wheel ships the method configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
METHOD_YAML = "zoa_lightning.method_yaml"
DATA_FOLDERS = {METHOD_YAML, "zoa_lightning.demo.weights"}  # listed as packages so that their files ship


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_listed_and_nothing_else() -> None:
    found = set(find_packages(str(ROOT), include=["zoa_lightning*", "callbacks*", "datamodules*"]))
    listed = set(_setuptools()["packages"])
    assert listed - DATA_FOLDERS == found, "update [tool.setuptools] packages in pyproject.toml"
    assert _setuptools()["package-dir"][METHOD_YAML] == "configs/methods"


@pytest.mark.slow
def test_a_wheel_ships_the_method_configs_where_the_installed_package_reads_them(tmp_path: Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    build = tmp_path / "src"
    for name in tracked:  # the working tree's tracked files, nothing built or cached
        if (ROOT / name).is_file():
            (build / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, build / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=build,
        check=True,
    )
    (wheel,) = tmp_path.glob("zoa_lightning-*.whl")
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    want = sorted(p.name for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    assert sorted(p.name for p in (installed / "zoa_lightning" / "method_yaml").glob("*.yaml")) == want
    for weights in ("demo_vit", "demo_cnn"):
        assert (installed / "zoa_lightning" / "demo" / "weights" / f"{weights}.safetensors").is_file()
    # The installed package, run from a folder without configs/, finds its own copy and lists every method.
    code = (
        f"import sys; sys.path.insert(0, {str(installed)!r}); "
        "from zoa_lightning.method_configs import default_method_dir, method_names; "
        "print(default_method_dir()); print(','.join(method_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    folder, names = out.stdout.split()
    assert Path(folder) == installed / "zoa_lightning" / "method_yaml"
    assert names.split(",") == [Path(n).stem for n in want]
