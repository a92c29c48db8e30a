"""Every method config builds through the `zoa` CLI and runs; CONTRIBUTING.md's worked example works as written."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from benchmarks._measure import SourceData, build_method, step
from cli import make_cli
from tests.helpers import make_stream, make_trainer, make_vit
from zoa_lightning.method_configs import method_config, method_names
from zoa_lightning.methods import StreamModule

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def _run(module: StreamModule, cache_dir: Path) -> list[dict]:
    """One batch of 16 images per domain of the three-domain test stream."""
    make_trainer(batches=1).test(module, datamodule=make_stream(cache_dir, batch_size=16))
    return module.stream_results()


def test_the_method_list_is_the_config_folder() -> None:
    assert method_names() == sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    assert {"no_adapt", "norm_adapt", "t3a", "foa", "tent", "zoa"} <= set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_every_method_config_builds_through_the_cli_and_runs(method: str, cache_dir: Path) -> None:
    path = method_config(method)
    cli = make_cli(["-c", str(DEMO), "-c", str(path)], run=False)
    module = cli.model
    own = yaml.safe_load(path.read_text())["model"]
    assert f"{type(module).__module__}.{type(module).__name__}".endswith(own["class_path"].rsplit(".", 1)[-1])
    for key, value in (own.get("init_args") or {}).items():
        assert module.hparams[key] == value, key
    rows = _run(module, cache_dir)
    assert len(rows) == 3
    assert module.adapter is not None
    per_batch = module.adapter.passes_per_batch  # what the method says a batch costs with this config
    assert [(r["batches"], r["forward_passes"]) for r in rows] == [(1, per_batch)] * 3
    assert module.run_info()["method"] == method
    assert {key.split(".")[0] for key in module.state_dict()} == {"adapter"}


# ------------------------------------------------------------------------------------ CONTRIBUTING's example
def _contributing_blocks() -> dict[str, str]:
    """The worked example's code blocks of CONTRIBUTING.md, by language: ``python`` (adapter, module) and ``yaml``."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    example = text[text.index("### Worked example") :]
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", example, re.S)
    python = [code for lang, code in blocks if lang == "python"]
    yamls = [code for lang, code in blocks if lang == "yaml"]
    assert len(python) == 2, "CONTRIBUTING.md's worked example should have two python blocks (adapter, module)"
    assert len(yamls) == 1, "CONTRIBUTING.md's worked example should have one yaml block (the method config)"
    return {"adapter": python[0], "module": python[1], "config": yamls[0]}


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_the_contributing_example_builds_from_its_yaml_and_runs(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = _contributing_blocks()
    (tmp_path / "flip_average.py").write_text(blocks["adapter"])
    (tmp_path / "flip_average_module.py").write_text(blocks["module"])
    method_dir = tmp_path / "configs" / "methods"
    method_dir.mkdir(parents=True)
    (method_dir / "flip_average.yaml").write_text(blocks["config"])
    # As if the files were in place: the adapter as zoa_lightning.core.methods.flip_average, the LightningModule as
    # zoa_lightning.methods.flip_average (where the config's class_path looks for it).
    adapter_file = _load("zoa_lightning.core.methods.flip_average", tmp_path / "flip_average.py", monkeypatch)
    glue = _load("zoa_lightning.methods.flip_average", tmp_path / "flip_average_module.py", monkeypatch)

    assert method_names(method_dir) == ["flip_average"]
    cli = make_cli(["-c", str(DEMO), "-c", str(method_config("flip_average", method_dir))], run=False)
    module = cli.model
    assert isinstance(module, glue.FlipAverageModule)
    rows = _run(module, cache_dir)
    assert [r["forward_passes"] for r in rows] == [2, 2, 2]
    assert module.run_info()["flip_weight"] == 0.5
    assert isinstance(module.adapter, adapter_file.FlipAverage)
    assert module.adapter.passes_per_batch == 2
    assert "adapter.counters.forward_passes" in module.state_dict()
    with pytest.raises(ValueError, match="flip_weight must be in"):
        make_cli(["-c", str(DEMO), "-c", str(method_dir / "flip_average.yaml"), "--model.flip_weight", "2"], run=False)

    # The benchmarks build it from the same config.
    g = torch.Generator().manual_seed(0)
    bench = build_method(
        "flip_average", make_vit(0), 10, SourceData([torch.rand(4, 3, 32, 32, generator=g)]), method_dir
    )
    images = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        net = make_vit(0)
        want = 0.5 * (net(images) + net(images.flip(-1)))
    torch.testing.assert_close(step(bench, images), want)
    assert bench.forward_passes() == 2
