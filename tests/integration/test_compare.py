"""`zoa compare`: several methods on one stream, one table, one CSV, one plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import zoa_lightning.compare as compare_mod
import zoa_lightning.processes as processes
from cli import main as cli_main
from cli import resolved_config
from zoa_lightning.compare import COMPARE_SETTINGS, compare, main, parse_args, results_file
from zoa_lightning.method_configs import method_names

ROOT = Path(__file__).resolve().parents[2]
METHODS = ROOT / "configs" / "methods"


@pytest.mark.slow
def test_compare_runs_each_method_and_writes_the_report(tmp_path: Path, cache_dir: Path) -> None:
    config = resolved_config(["-c", str(ROOT / "configs/demo.yaml")])  # composed from its parts, every key written
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "Quantization" not in c["class_path"]
    ]
    config["trainer"]["limit_test_batches"] = 2
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]
    ]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["network"] = "demo_cnn"
    config["data"]["init_args"].update(
        corruptions=["gaussian_noise", "brightness"], cache_dir=str(cache_dir), num_source_images=128
    )
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    os.chdir(ROOT)
    summaries = compare([str(path)], ["zoa", "no_adapt"], tmp_path / "out")
    assert [s["method"] for s in summaries] == ["zoa", "no_adapt"]
    assert summaries[0]["forward_passes_per_batch"] == pytest.approx(2.0)
    assert summaries[1]["forward_passes_per_batch"] == pytest.approx(1.0)
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["zoa", "no_adapt"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zoa |" in (tmp_path / "out" / "comparison.md").read_text()
    # The demo config's CSV logger moves into each method's run folder, next to its results and stream checkpoint.
    for method in ("zoa", "no_adapt"):
        run = tmp_path / "out" / method
        assert (run / method / "results.json").is_file()
        assert (run / method / "stream-last.ckpt").is_file()
        header = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"step", "stream/domain", "adapt/skipped_batches", "test/mean/acc1"} <= set(header)
        assert ("bank/entries" in header) == (method == "zoa")
        assert (run / "logs" / "version_0" / "config.yaml").is_file()


def test_unknown_method_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_adapt"):
        compare([str(ROOT / "configs/demo.yaml")], ["nonsense"], tmp_path, method_dir=ROOT / "configs/methods")


def test_results_file_is_the_newest_results_json(tmp_path: Path) -> None:
    assert results_file(tmp_path) is None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    os.utime(tmp_path / "old" / "results.json", (1, 1))
    (tmp_path / "zoa").mkdir()
    (tmp_path / "zoa" / "results.json").write_text("{}")
    assert results_file(tmp_path) == tmp_path / "zoa" / "results.json"


def test_parse_args_sorts_own_options_from_zoa_test_flags() -> None:
    settings, print_config = parse_args(
        ["-c", str(ROOT / "configs/demo.yaml"), "--methods", "zoa", "tent", "--model.init_args.lr", "0.01",
         "--resume", "--trainer.limit_test_batches=2", "--jobs", "2", "--data.init_args.seed", "-1"]
    )  # fmt: skip
    assert not print_config
    assert settings.test_configs == [str(ROOT / "configs/demo.yaml")]
    assert settings.methods == ["zoa", "tent"]
    assert (settings.resume, settings.jobs, settings.out, settings.log_to_files) == (True, 2, "runs/compare", False)
    assert settings.test_args == [
        "--model.init_args.lr", "0.01", "--trainer.limit_test_batches=2", "--data.init_args.seed", "-1"
    ]  # fmt: skip


def test_print_config_round_trips_through_a_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = str(ROOT / "configs/demo.yaml")
    main(["-c", demo, "--methods", "zoa", "--out", "runs/x", "--model.init_args.lr", "0.01", "--print_config"])
    printed = capsys.readouterr().out
    saved = yaml.safe_load(printed)
    assert set(saved) == set(COMPARE_SETTINGS)
    assert (saved["test_configs"], saved["methods"], saved["out"]) == ([demo], ["zoa"], "runs/x")
    assert saved["test_args"] == ["--model.init_args.lr", "0.01"]
    (tmp_path / "compare.yaml").write_text(printed)

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(compare_mod, "compare", lambda *args, **kwargs: calls.append((*args, kwargs)))
    main(["-c", str(tmp_path / "compare.yaml"), "--jobs", "2", "--data.init_args.rounds", "2"])
    configs, methods, out, extra, kwargs = calls[0]
    assert (configs, methods, out) == ([demo], ["zoa"], Path("runs/x"))
    assert extra == ["--model.init_args.lr", "0.01", "--data.init_args.rounds", "2"]
    assert kwargs == {"resume": False, "jobs": 2, "log_to_files": False}


def test_help_lists_the_options_and_the_known_methods(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--config", "--methods", "--out", "--resume", "--jobs", "--print_config", "passed to every"):
        assert option in text
    for method in method_names(ROOT / "configs/methods"):
        assert method in text


def test_a_bad_option_value_is_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", str(ROOT / "configs/demo.yaml"), "--jobs", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zoa compare: error:")
    assert "jobs" in err
    assert "zoa compare --help" in err
    assert err.count("\n") == 1


def test_no_config_or_jobs_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stream config given"):
        compare([], ["zoa"], tmp_path)
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        compare([str(ROOT / "configs/demo.yaml")], ["zoa"], tmp_path, jobs=0)


def _failing_children(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every method's child process fails at once; the commands it was given, in order."""
    commands: list[list[str]] = []

    def fake_run(self: Any, command: list[str], **kwargs: Any) -> int:
        commands.append(command)
        return 1

    monkeypatch.setattr(compare_mod.ChildProcesses, "run", fake_run)
    return commands


def test_a_logger_with_a_folder_moves_into_each_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = _failing_children(monkeypatch)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"trainer": {"logger": False}}))
    logged = tmp_path / "logged.yaml"
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/x"}}
    logged.write_text(yaml.safe_dump({"trainer": {"logger": csv_logger}}))
    with pytest.raises(RuntimeError, match="method 'zoa' failed"):
        compare([str(logged), str(plain)], ["zoa"], tmp_path / "a", method_dir=METHODS)
    assert "--trainer.logger.init_args.save_dir" not in commands[-1]
    with pytest.raises(RuntimeError, match="method 'zoa' failed"):
        compare([str(plain), str(logged)], ["zoa"], tmp_path / "b", method_dir=METHODS)
    flag = commands[-1].index("--trainer.logger.init_args.save_dir")
    assert commands[-1][flag + 1] == str(tmp_path / "b" / "zoa")


def test_a_logger_from_an_included_config_moves_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # demo_w4a4.yaml takes its CSV logger from demo.yaml (`config: demo.yaml`): compare reads the composed config.
    commands = _failing_children(monkeypatch)
    for config, moved in (("demo_w4a4.yaml", True), ("vit_b16_w8a8.yaml", False)):
        with pytest.raises(RuntimeError, match="method 'zoa' failed"):
            compare([str(ROOT / "configs" / config)], ["zoa"], tmp_path / config, method_dir=METHODS)
        assert ("--trainer.logger.init_args.save_dir" in commands[-1]) == moved, config


# ------------------------------------------------------------------------------------------------ --resume and children
def _results(folder: Path, fingerprint: dict[str, Any] | None) -> Path:
    """A results.json of a finished run under ``folder/<method>/`` recording ``fingerprint``."""
    run = folder / "zoa"
    run.mkdir(parents=True)
    record: dict[str, Any] = {"summary": {"domains": 3, "mean_acc1": 50.0}, "domains": []}
    if fingerprint is not None:
        record["fingerprint"] = fingerprint
    (run / "results.json").write_text(json.dumps(record))
    return run / "results.json"


def _checkpoint(folder: Path, fingerprint: dict[str, Any]) -> Path:
    """A stream checkpoint (with its checksum) under ``folder/<method>/`` recording ``fingerprint``."""
    import io

    import torch

    from zoa_lightning.files import write_verified

    buffer = io.BytesIO()
    torch.save({"zoa_stream": {"fingerprint": fingerprint, "next_domain": 1}}, buffer)
    (folder / "zoa").mkdir(parents=True, exist_ok=True)
    return write_verified(folder / "zoa" / "stream-last.ckpt", buffer.getvalue())


SETTING = {"data": {"seed": 1}, "method": {"class": "ZOAModule", "lr": 0.1}, "precision": "W8A8"}


def test_resume_reuses_only_results_of_this_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare_mod, "run_fingerprint", lambda args: SETTING)
    _results(tmp_path / "same", SETTING)
    assert compare_mod._resume_decision("zoa", tmp_path / "same", []) is None  # reused
    for name, recorded in [
        ("seed", {**SETTING, "data": {"seed": 2}}),  # the stream changed
        ("flag", {**SETTING, "method": {"class": "ZOAModule", "lr": 0.2}}),  # a model flag changed
        ("bits", {**SETTING, "precision": "W4A4"}),
        ("none", None),  # results that record no setting at all
    ]:
        _results(tmp_path / name, recorded)
        assert compare_mod._resume_decision("zoa", tmp_path / name, []) == [], name  # run again


def test_resume_continues_an_unfinished_checkpoint_of_this_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_mod, "run_fingerprint", lambda args: SETTING)
    checkpoint = _checkpoint(tmp_path / "run", SETTING)
    assert compare_mod._resume_decision("zoa", tmp_path / "run", []) == ["--ckpt_path", str(checkpoint)]
    _checkpoint(tmp_path / "other", {**SETTING, "precision": "float"})
    assert compare_mod._resume_decision("zoa", tmp_path / "other", []) == []  # another setting's: a fresh run
    damaged = _checkpoint(tmp_path / "damaged", SETTING)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert compare_mod._resume_decision("zoa", tmp_path / "damaged", []) == []


def test_an_interrupted_comparison_returns_at_once_and_starts_no_other_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import subprocess
    import sys
    import threading
    import time

    started: list[str] = []
    popen = subprocess.Popen

    def fake_popen(command: list[str], **kwargs: Any) -> Any:  # each method's `zoa test` is a long sleep here
        started.append(command[command.index("--model.init_args.name") + 1])
        threading.Timer(1.0, interrupt).start()  # Ctrl-C while it runs
        return popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)

    interrupted: list[float] = []

    def interrupt() -> None:
        interrupted.append(time.monotonic())
        # Ctrl-C reaches the main thread, which waits for the method; a process-wide kill from this timer thread may
        # land on another thread, whose interrupted wait Python does not turn into KeyboardInterrupt until the main
        # thread runs again (here: when the 60 s child ends), so aim it at the main thread as a terminal does
        signal.pthread_kill(main, signal.SIGINT)

    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C, whatever ran before
    monkeypatch.setattr(processes.subprocess, "Popen", fake_popen)
    try:
        with pytest.raises(KeyboardInterrupt):
            compare([str(ROOT / "configs/demo.yaml")], ["zoa", "no_adapt"], tmp_path, method_dir=METHODS)
    finally:
        signal.signal(signal.SIGINT, previous)
    # Timed from the interrupt (the child sleeps 60 s): what comes before it depends on the machine's load.
    assert time.monotonic() - interrupted[0] < 30, "it waited for the child instead of stopping it"
    assert started == ["zoa"], "no method starts after the interrupt"
