"""The configs are composed from the parts in ``configs/parts/``; each of the paper's hyperparameters is written once.

A config includes at most one other config (``config: <file>``, its first key), names part files for whole sections
(``model: parts/model/vit_b16_w8a8.yaml``) and for the quantizer in its callback list, and changes single values with
dotted keys (``trainer.default_root_dir: runs/demo_w4a4``); jsonargparse resolves every path relative to the file that
names it. These tests pin what each config resolves to, that every part parses and is used, and the rules that keep
jsonargparse from silently dropping a value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli import resolved_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
PARTS = sorted((CONFIG_DIR / "parts").rglob("*.yaml"))
OWN_FILES = CONFIGS + PARTS  # the method overlays (configs/methods/) are plain files, checked in test_cli.py
PART_FLAGS = {  # part folder -> the zoa test flag that takes such a file (None: a partial config, given with -c)
    "model": "--model",
    "stream": "--data",
    "bits": "--trainer.callbacks",
    "trainer": None,
}

# The paper's ZOA hyperparameters (spec §6.5). No W4A4 ones are published (spec §11): the W4A4 configs keep the W6A6
# ones (ViT) and the W8A8 ones (ResNet-50).
VIT_W8A8 = {"lr": 0.0005, "spsa_c": 0.02, "lambda_bp": 30.0, "domain_t": 0.1}
VIT_W6A6 = {**VIT_W8A8, "lr": 0.0002}
RESNET50_W8A8 = {"lr": 0.0001, "spsa_c": 0.01, "lambda_bp": 1.0, "domain_t": 0.2, "source_batches": 25}
PAPER = {  # config -> network, ZOA hyperparameters, bits, quantizer, normalisation
    "vit_b16_w8a8": ("vit_base_patch16_224", VIT_W8A8, 8, "ptq4vit", "vit"),
    "vit_b16_w6a6": ("vit_base_patch16_224", VIT_W6A6, 6, "ptq4vit", "vit"),
    "vit_b16_w4a4": ("vit_base_patch16_224", VIT_W6A6, 4, "ptq4vit", "vit"),
    "resnet50_w8a8": ("torchvision:resnet50", RESNET50_W8A8, 8, "mqbench", "imagenet"),
    "resnet50_w4a4": ("torchvision:resnet50", RESNET50_W8A8, 4, "mqbench", "imagenet"),
}
DEMO = {"demo": 8, "demo_w6a6": 6, "demo_w4a4": 4, "demo_ddp": 8}  # the paper's ViT W8A8 hyperparameters, demo ViT
WRITTEN_IN = {  # where each published value is written (the only file under configs/ that holds it)
    "parts/model/vit_b16_w8a8.yaml": VIT_W8A8,
    "vit_b16_w6a6.yaml": {"lr": VIT_W6A6["lr"]},
    "parts/model/resnet50_w8a8.yaml": RESNET50_W8A8,
}


def _resolved(name: str, *args: str) -> dict[str, Any]:
    return resolved_config(["-c", str(CONFIG_DIR / f"{name}.yaml"), *args])


def _quantizer(resolved: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in resolved["trainer"]["callbacks"] if c["class_path"] == "callbacks.QuantizationCallback"]
    return dict(found["init_args"])


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every scalar in ``data`` (YAML keys may be dotted themselves)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        for n, value in enumerate(data):
            yield from _leaves(value, f"{prefix}{n}.")
    else:
        yield prefix.rstrip("."), data


def _named_files(path: Path) -> Iterator[Path]:
    """The files that ``path`` names (``config:``, section and callback paths), resolved relative to it."""
    for _, value in _leaves(yaml.safe_load(path.read_text())):
        if isinstance(value, str) and value.endswith(".yaml"):
            yield (path.parent / value).resolve()


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_configs_resolve_to_the_papers_values(name: str) -> None:
    network, hyperparameters, bits, method, norm = PAPER[name]
    resolved = _resolved(name)
    model = resolved["model"]
    assert model["class_path"] == "zoa_lightning.ZOAModule"
    assert model["init_args"]["network"] == network
    assert model["init_args"]["mode"] == "reference"
    assert {k: model["init_args"][k] for k in hyperparameters} == hyperparameters
    quantizer = _quantizer(resolved)
    assert (quantizer["bits"], quantizer["method"], quantizer["calib_images"]) == (bits, method, 32)
    data = resolved["data"]
    assert data["class_path"] == "datamodules.ImageNetCDataModule"
    stream = {k: data["init_args"][k] for k in ("norm", "severity", "rounds", "batch_size")}
    assert stream == {"norm": norm, "severity": 5, "rounds": 10, "batch_size": 64}
    assert resolved["seed_everything"] == 2020
    assert resolved["trainer"]["default_root_dir"] == f"runs/{name}"
    assert resolved["trainer"]["logger"] is False


@pytest.mark.parametrize("name", list(DEMO))
def test_demo_configs_run_the_papers_vit_w8a8_hyperparameters_on_the_demo_vit(name: str) -> None:
    resolved = _resolved(name)
    init_args = resolved["model"]["init_args"]
    assert init_args["network"] == "demo_vit"
    assert {k: init_args[k] for k in VIT_W8A8} == VIT_W8A8
    quantizer = _quantizer(resolved)
    assert (quantizer["bits"], quantizer["method"], quantizer["calib_images"]) == (DEMO[name], "auto", 32)
    assert resolved["data"]["init_args"]["dataset"] == "mnist"
    trainer = resolved["trainer"]
    assert trainer["accelerator"] == "cpu"
    assert trainer["default_root_dir"] == trainer["logger"]["init_args"]["save_dir"] == f"runs/{name}"
    assert (trainer["devices"], trainer["strategy"]) == ((2, "ddp") if name == "demo_ddp" else (1, "auto"))


def test_the_onnx_demo_is_the_demo_with_the_int8_graph_in_the_quantizer_s_place() -> None:
    resolved, demo = _resolved("demo_onnx"), _resolved("demo")
    assert resolved["model"] == demo["model"]
    assert resolved["data"] == demo["data"]
    classes = [c["class_path"] for c in demo["trainer"]["callbacks"]]
    assert classes[1] == "callbacks.QuantizationCallback"
    classes[1] = "callbacks.OnnxRuntimeCallback"
    assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == classes
    runtime = resolved["trainer"]["callbacks"][1]["init_args"]
    assert (runtime["precision"], runtime["calib_images"], runtime["intra_op_threads"]) == ("int8", 32, 1)
    trainer = resolved["trainer"]
    assert trainer["default_root_dir"] == trainer["logger"]["init_args"]["save_dir"] == "runs/demo_onnx"


def test_every_config_is_pinned_here() -> None:
    overlays = {"demo_tuned"}  # composed after a demo config; tests/integration/test_cli.py checks it
    assert {c.stem for c in CONFIGS} == set(PAPER) | set(DEMO) | {"demo_onnx"} | overlays


@pytest.mark.parametrize("part", PARTS, ids=lambda p: str(p.relative_to(CONFIG_DIR / "parts")))
def test_every_part_parses_into_its_section(part: Path) -> None:
    kind = part.parent.name
    assert kind in PART_FLAGS, f"{part}: a new kind of part; add its folder to PART_FLAGS"
    content = yaml.safe_load(part.read_text())
    flag = PART_FLAGS[kind]
    if flag is None:
        resolved = resolved_config(["-c", str(part)])
        for key, value in _leaves(content):
            found: Any = resolved
            for name in key.split("."):
                found = found[name]
            assert found == value, key
        return
    resolved = _resolved("vit_b16_w8a8", flag, f"[{part}]" if kind == "bits" else str(part))
    section = resolved["trainer"]["callbacks"][0] if kind == "bits" else resolved[flag.removeprefix("--")]
    assert section["class_path"] == content["class_path"]
    assert {k: section["init_args"][k] for k in content["init_args"]} == content["init_args"]


def test_every_part_is_used_by_a_config_and_no_two_parts_are_the_same() -> None:
    used: set[Path] = set()
    todo = list(CONFIGS)
    while todo:
        named = set(_named_files(todo.pop())) - used
        used |= named
        todo += [p for p in named if p.is_file()]
    assert not [p for p in PARTS if p.resolve() not in used], "parts that no config uses"
    assert not [p for p in used if not p.is_file()], "named files that do not exist"
    contents = [yaml.safe_load(p.read_text()) for p in PARTS]
    assert len({yaml.safe_dump(c, sort_keys=True) for c in contents}) == len(PARTS), "two parts hold the same values"


def test_each_published_hyperparameter_is_written_in_exactly_one_file() -> None:
    written: dict[tuple[str, float], list[str]] = {}
    for path in CONFIG_DIR.rglob("*.yaml"):
        for key, value in _leaves(yaml.safe_load(path.read_text())):
            if isinstance(value, int | float) and not isinstance(value, bool):
                written.setdefault((key.rsplit(".", 1)[-1], float(value)), []).append(str(path.relative_to(CONFIG_DIR)))
    for where, values in WRITTEN_IN.items():
        for key, value in values.items():
            found = written.get((key, float(value)))
            assert found == [where], f"{key}: {value} is written in {found}, expected only in {where}"


def test_includes_come_first_and_a_section_given_by_a_file_is_not_changed_beside_it() -> None:
    # jsonargparse reads a config's keys in order: values written before `config:` are replaced by the included file,
    # and a section given as a file (`model: parts/...`) replaces the dotted keys of that section in the same file
    # (and the other way round). Both would drop a value silently. `config:` takes one file: a list is ignored.
    for path in OWN_FILES:
        data = yaml.safe_load(path.read_text())
        if "config" in data:
            assert next(iter(data)) == "config", f"{path}: `config:` must be the first key"
            assert isinstance(data["config"], str), f"{path}: `config:` takes one file"
        for key, value in data.items():
            if isinstance(value, str) and value.endswith(".yaml"):
                clash = [k for k in data if k.startswith(f"{key}.")]
                assert not clash, f"{path}: {key} is a file, so {clash} would be dropped; set them where it is included"


def test_configs_resolve_alike_from_any_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    expected = {name: resolved_config(["-c", f"configs/{name}.yaml"]) for name in ("demo_w4a4", "vit_b16_w4a4")}
    monkeypatch.chdir(tmp_path)
    assert resolved_config(["-c", str(CONFIG_DIR / "demo_w4a4.yaml")]) == expected["demo_w4a4"]
    monkeypatch.chdir(ROOT / "docs")
    assert resolved_config(["-c", "../configs/vit_b16_w4a4.yaml"]) == expected["vit_b16_w4a4"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_printed_configs_list_each_class_path_before_its_init_args(config: Path) -> None:
    # A dotted change (`model.init_args.lr: ...`) would print the class after its arguments; the configs restate the
    # class before such a change so that the printed and saved configs read as before the configs were split.
    args = ["-c", str(CONFIG_DIR / "demo.yaml")] if config.name == "demo_tuned.yaml" else []
    resolved = resolved_config([*args, "-c", str(config)])
    specs = [v for _, v in _walk(resolved) if isinstance(v, dict) and {"class_path", "init_args"} <= set(v)]
    assert specs
    for spec in specs:
        keys = list(spec)
        assert keys.index("class_path") < keys.index("init_args"), spec["class_path"]


def _walk(data: Any) -> Iterator[tuple[str, Any]]:
    """Every value of ``data``, nested ones included."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        yield str(key), value
        yield from _walk(value)
