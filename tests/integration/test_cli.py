"""The `zoa` LightningCLI: every shipped config parses, configs compose, errors name paths, README matches CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cli import main, make_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # what users pass to -c; test_configs.py checks the parts
OVERLAYS = [c for c in CONFIGS if set(yaml.safe_load(c.read_text())) == {"model"}]  # e.g. demo_tuned.yaml
BASE_CONFIGS = [c for c in CONFIGS if c not in OVERLAYS]
METHOD_CONFIGS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


def _print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["test", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resolved = _print_config(["-c", str(config)], capsys)
    assert resolved["trainer"]["inference_mode"] is False
    assert isinstance(resolved["seed_everything"], int)
    callbacks = [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.RichProgressBar" in callbacks


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlays_override_the_demo(overlay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resolved = _print_config(["-c", str(ROOT / "configs/demo.yaml"), "-c", str(overlay)], capsys)
    for key, value in yaml.safe_load(overlay.read_text())["model"]["init_args"].items():
        assert resolved["model"]["init_args"][key] == value
    with_foa = ["-c", str(ROOT / "configs/demo.yaml"), "-c", str(overlay), "-c", str(ROOT / "configs/methods/foa.yaml")]
    assert resolved["model"]["class_path"] == "zoa_lightning.ZOAModule"
    assert "lr" not in _print_config(with_foa, capsys)["model"]["init_args"]  # dropped with the ZOA arguments


def test_there_is_an_overlay() -> None:
    assert ROOT / "configs" / "demo_tuned.yaml" in OVERLAYS


@pytest.mark.parametrize("method", METHOD_CONFIGS, ids=lambda p: p.name)
def test_method_configs_compose_with_the_demo(method: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resolved = _print_config(["-c", str(ROOT / "configs/demo.yaml"), "-c", str(method)], capsys)
    assert resolved["model"]["class_path"] == yaml.safe_load(method.read_text())["model"]["class_path"]
    assert resolved["model"]["init_args"]["network"] == "demo_vit"


def test_flags_override_configs(capsys: pytest.CaptureFixture[str]) -> None:
    resolved = _print_config(["-c", str(ROOT / "configs/demo.yaml"), "--model.init_args.lr", "0.123"], capsys)
    assert resolved["model"]["init_args"]["lr"] == pytest.approx(0.123)


def test_help_documents_every_zoa_hyperparameter(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--model.help", "zoa_lightning.ZOAModule"])
    text = capsys.readouterr().out
    for name in ("lr", "spsa_c", "spsa_c_alpha", "lambda_bp", "domain_t", "max_weight_nums", "mode", "sp_avg"):
        assert f"--model.{name} " in text
    assert "perturbation scale ``c`` of ``θ``" in text  # ZOAConfig's own description of spsa_c


def test_missing_imagenet_c_root_fails_fast_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-imagenet-c"
    with pytest.raises((FileNotFoundError, SystemExit, ValueError)) as info:
        make_cli(["-c", str(ROOT / "configs/vit_b16_w8a8.yaml"), "--data.init_args.root", str(missing)], run=False)
    message = str(info.value)
    if isinstance(info.value, SystemExit):  # jsonargparse wraps instantiation errors into a usage exit
        message = str(info.value.__context__ or "")
    assert str(missing) in message


def test_readme_opens_with_the_two_commands_and_ci_runs_them() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None
    install, test = block.group(1).strip().splitlines()
    assert "pip install -e '.[dev]'" in install
    assert "zoa test -c configs/demo.yaml" in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, "CI must run the README's test command verbatim"
    assert "pip install --quiet -e '.[dev]'" in ci


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model.init_args.lr", "abc"], 2, "model.lr: Expected a <class 'float'>. Got value: abc"),
        (["--model.init_args.spsa_c", "-1"], 2, "spsa_c must be > 0, got -1.0"),
        (["--data.init_args.dataset", "/nonexistent/folder"], 2, "/nonexistent/folder"),
    ],
)
def test_config_errors_print_the_message_alone(
    args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a bad value drowned in ~100 lines of usage text or a 76-line traceback.
    monkeypatch.delenv("ZOA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", str(ROOT / "configs" / "demo.yaml"), *args])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("zoa: error: ")
    assert message in err[0]
    assert "Traceback" not in err[0]


def test_zoa_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOA_DEBUG", "1")
    with pytest.raises(ValueError, match="spsa_c must be > 0"):
        main(["test", "-c", str(ROOT / "configs" / "demo.yaml"), "--model.init_args.spsa_c", "-1"])


def test_lightning_advertisement_and_seed_lines_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import lightning.pytorch as pl

    from cli import quiet_lightning

    quiet_lightning()
    with caplog.at_level(logging.INFO):
        pl.seed_everything(3)
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert not [r for r in caplog.records if "litlogger" in r.getMessage() or "Seed set" in r.getMessage()]
