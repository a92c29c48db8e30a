"""Learning that never hurts: the per-sample estimator against shift-only and the oracle on several streams.

``python benchmarks/learning.py --settings short_w8a8 digits_w8a8 --methods shift_only per_sample oracle`` runs every
named setting and method not yet in ``<out>/runs`` (one JSON file each, written as soon as the run ends);
``--report`` only gathers the finished runs into ``benchmarks/results/learning.json`` (adding to the runs it holds) and
prints the tables.

Settings (the demo ViT, severity 5, the 15 corruptions, seed 2020):

* ``demo_w8a8`` / ``demo_w4a4``: the demo stream (the 1,000 MNIST test images per domain, batch 64), 3 rounds;
* ``short_w8a8``: the demo stream thinned to its first 400 images per domain (7 batches), 3 rounds;
  ``short_ls16``: the same domains label-shifted (Dirichlet 0.1) in batches of 16, 1 round;
* ``digits_w8a8``: scikit-learn's 1,797 bundled 8x8 digits written as an image folder, the demo ViT trained on its
  training part with the project's own command (``zoa_lightning.demo.train``), the stream made of its 359 test
  images per domain (6 batches), 3 rounds; ``digits_ls16``: label-shifted in batches of 16, 1 round;
  ``digits_w4a4``: the digits stream at W4A4, 3 rounds.

Methods: ``no_adapt``, ``shift_only`` (``zoa_shift_only``), ``per_sample`` (``configs/methods/zoa_per_sample.yaml``
as shipped), ``per_sample_plain`` (the same without the signal-scaled step and the source guard: the estimator as
issue 13 left it) and ``oracle`` (``zoa_first_order`` as shipped: exact gradients by back-propagation). Every run
records the accuracy of every domain, the parameter travel (per adapted layer, the mean ``|effective − pretrained|``
of its affine values) at the end of every domain, the guard's checks and resets and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import Tensor

from benchmarks._measure import SourceData, build_method
from callbacks import QuantizationCallback
from datamodules import CorruptionStreamDataModule
from zoa_lightning.networks import build_network

ROOT = Path(__file__).resolve().parents[1]

PLAIN = {"snr_step": False, "guard": False}  # the per-sample estimator as issue 13 left it
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "no_adapt": ("no_adapt", {}),
    "shift_only": ("zoa_shift_only", {}),
    "per_sample_plain": ("zoa_per_sample", PLAIN),
    "per_sample": ("zoa_per_sample", {}),
    "oracle": ("zoa_first_order", {}),
}
SETTINGS: dict[str, dict[str, Any]] = {
    "demo_w8a8": {"stream": "demo", "bits": 8, "rounds": 3, "batch_size": 64},
    "demo_w4a4": {"stream": "demo", "bits": 4, "rounds": 3, "batch_size": 64},
    "short_w8a8": {"stream": "demo", "bits": 8, "rounds": 3, "batch_size": 64, "images_per_domain": 400},
    "short_ls16": {"stream": "demo", "bits": 8, "rounds": 1, "batch_size": 16, "images_per_domain": 400,
                   "label_dirichlet": 0.1},
    "digits_w8a8": {"stream": "digits", "bits": 8, "rounds": 3, "batch_size": 64},
    "digits_ls16": {"stream": "digits", "bits": 8, "rounds": 1, "batch_size": 16, "label_dirichlet": 0.1},
    "digits_w4a4": {"stream": "digits", "bits": 4, "rounds": 3, "batch_size": 64},
}  # fmt: skip
DOMAINS = 15  # corruptions per round


def digits_folder(out: Path) -> Path:
    """scikit-learn's 1,797 bundled 8x8 digits as an image folder ``<out>/data/sklearn_digits/<class>/<i>.png``."""
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the digits settings need scikit-learn's bundled digits: pip install scikit-learn, or run the demo "
            "settings only (--settings demo_w8a8 short_w8a8 ...)"
        ) from error

    root = out / "data" / "sklearn_digits"
    if (root / "9").is_dir():
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return root


def digits_weights(out: Path) -> Path:
    """The demo ViT trained on the digits folder with the project's own command (``zoa_lightning.demo.train``)."""
    weights = out / "weights" / "sklearn_digits" / "demo_vit.safetensors"
    if not weights.is_file():
        from zoa_lightning.demo import train

        train.main(["--model", "demo_vit", "--dataset", str(digits_folder(out)), "--out", str(weights.parent),
                    "--threads", "1"])  # fmt: skip
    return weights


def stream_data(
    out: Path, stream: str, rounds: int, batch_size: int, label_dirichlet: float | None
) -> tuple[CorruptionStreamDataModule, str | None]:
    """The data module of ``stream`` and its weights file (``None``: the shipped demo weights)."""
    if stream.startswith("digits"):
        dataset, weights, source = str(digits_folder(out)), str(digits_weights(out)), None
    else:
        dataset, weights, source = "mnist", None, 2048
    data = CorruptionStreamDataModule(
        dataset=dataset, severity=5, rounds=rounds, image_size=32, batch_size=batch_size, num_source_images=source,
        seed=2020, label_dirichlet=label_dirichlet,
    )  # fmt: skip
    data.prepare_data()
    data.setup("test")
    return data, weights


def domains_of(data: CorruptionStreamDataModule, images_per_domain: int | None) -> list[tuple[str, Tensor, Tensor]]:
    """Every domain's images and labels in stream order, the first ``images_per_domain`` of each (all if ``None``)."""
    out = []
    for name, loader in data.test_dataloader().items():
        dataset = loader.dataset
        count = len(dataset) if images_per_domain is None else min(images_per_domain, len(dataset))  # type: ignore[arg-type]
        items = [dataset[i] for i in range(count)]
        out.append((str(name), torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
    return out


def batches(domain: tuple[str, Tensor, Tensor], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A domain cut into batches of ``size`` (the last may be smaller), as the data module's loaders cut it."""
    _, images, labels = domain
    for start in range(0, len(images), size):
        yield images[start : start + size], labels[start : start + size]


def layer_travel(module: Any) -> list[float]:
    """Per adapted layer, the mean ``|effective − pretrained|`` of its affine values (bank mixture plus epsilons)."""
    adapter = getattr(module, "adapter", None)
    bank = getattr(adapter, "bank", None)
    if bank is None:
        return []
    delta = bank.current_delta().abs()
    return [float(delta[o : o + 2 * w].mean()) for o, w in zip(bank.offsets, bank.widths, strict=True)]


def run_one(setting: dict[str, Any], method: str, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """One method on one setting: per-domain accuracy, parameter travel, guard resets, seconds.

    ``extra``: ``init_args`` set over the shipped per-sample config (``per_sample`` only; to try other values).
    """
    data, weights = stream_data(out, setting["stream"], setting["rounds"], setting["batch_size"],
                                setting.get("label_dirichlet"))  # fmt: skip
    net = build_network("demo_vit", weights, data.num_classes).eval()
    if setting["bits"]:
        callback = QuantizationCallback(bits=setting["bits"])
        net = callback.quantize(net, data.calibration_images(callback.calib_images))[0]
    source = SourceData([x for x, _ in data.source_dataloader()])
    config, overrides = METHODS[method]
    if method == "per_sample":
        overrides = {**overrides, **extra}
    torch.manual_seed(0)
    module = build_method(config, net, data.num_classes, source, overrides=overrides)
    grad = torch.enable_grad if getattr(module.adapter, "requires_autograd", False) else torch.no_grad
    rows = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for domain in domains_of(data, setting.get("images_per_domain")):
            correct = total = 0
            for images, labels in batches(domain, setting["batch_size"]):
                with grad():
                    logits = module.adapt_step(images)
                correct += int((logits.argmax(1) == labels).sum())
                total += len(labels)
            guard = getattr(module.adapter, "guard", None)
            resets = 0 if guard is None else int(guard.resets)
            rows.append({"domain": domain[0], "acc1": 100.0 * correct / total, "n": total,
                         "travel": layer_travel(module), "resets": resets})  # fmt: skip
    guard = getattr(module.adapter, "guard", None)
    return {
        "setting": setting, "method": method, "config": config, "overrides": overrides, "domains": rows,
        "seconds": time.perf_counter() - start, "forward_passes": module.forward_passes(),
        "skipped_batches": module.skipped_batches(), "weights": shown(weights, out),
        "guard": None if guard is None else {"checks": int(guard.checks), "resets": int(guard.resets)},
    }  # fmt: skip


def shown(weights: str | None, out: Path | None = None) -> str:
    """The weights file as the results name it, never an absolute path of the machine that ran it.

    ``"the shipped demo weights"``; a file under the repository, relative to it; a file under ``out`` (the digits
    model the benchmark trains), as ``<out>/...``; anything else by its file name.
    """
    if weights is None or "shipped" in weights:
        return "the shipped demo weights"
    path = Path(weights)
    if not path.is_absolute():
        return weights
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    if out is not None and path.is_relative_to(out.resolve()):
        return f"<out>/{path.relative_to(out.resolve())}"
    return path.name


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per-round means, the overall mean, and the largest per-layer travel (mean over layers at the end)."""
    accs = [r["acc1"] for r in result["domains"]]
    travel = [r["travel"] for r in result["domains"] if r["travel"]]
    return {
        "rounds": [float(np.mean(accs[i : i + DOMAINS])) for i in range(0, len(accs), DOMAINS)],
        "mean": float(np.mean(accs)),
        "travel_max": max((max(t) for t in travel), default=0.0),  # the largest layer's, at any domain's end
        "travel_mean": float(np.mean([np.mean(t) for t in travel])) if travel else 0.0,  # over layers and domains
        "resets": 0 if result.get("guard") is None else result["guard"]["resets"],
        "checks": 0 if result.get("guard") is None else result["guard"]["checks"],
        "seconds": result["seconds"],
    }


def report(out: Path, path: Path) -> str:
    """Gather ``<out>/runs/*.json`` into ``path`` (summaries and per-domain rows) and return the Markdown tables.

    Runs already in ``path`` stay unless a run of the same setting and method replaces them, so runs gathered from
    another ``--out`` (extra seeds, trials) add to the results instead of replacing them; the tables show them all.
    """
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}
    table: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    for key, result in runs.items():
        setting, method = key.split("__")
        keep = ("domain", "acc1", "n", "travel", "resets")
        domains = [{k: row.get(k, 0) for k in keep} for row in result["domains"]]
        for row in domains:
            row["travel"] = [round(t, 4) for t in row["travel"]]
        table.setdefault(setting, {})[method] = {**summary(result), "domains": domains,
                                                 "weights": shown(result["weights"], out)}  # fmt: skip
    path.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    lines = [
        "| setting | method | round 1 | over 3 rounds | per round | vs shift-only (round 1 / all / per round) "
        "| travel: largest layer / mean | guard resets / checks |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for setting in SETTINGS:
        rows = table.get(setting, {})
        base = rows.get("shift_only")
        for method in [*(m for m in METHODS if m in rows), *sorted(set(rows) - set(METHODS))]:  # then --tag trials
            r = rows[method]
            gap = "" if base is None else (
                f"{r['rounds'][0] - base['rounds'][0]:+.2f} / {r['mean'] - base['mean']:+.2f} / "
                + " ".join(f"{a - b:+.2f}" for a, b in zip(r["rounds"], base["rounds"], strict=True)))  # fmt: skip
            lines.append(
                f"| {setting} | {method} | {r['rounds'][0]:.2f} | {r['mean']:.2f} | "
                + " → ".join(f"{x:.2f}" for x in r["rounds"])
                + f" | {gap} | {r['travel_max']:.3f} / {r['travel_mean']:.3f} | {r['resets']} / {r['checks']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["short_w8a8", "digits_w8a8"])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["shift_only", "per_sample"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="init_args over the shipped per-sample config (needs --tag)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the per-sample runs' names (for --set trials)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learning")
    parser.add_argument("--report", action="store_true", help="only gather the finished runs and print the tables")
    args = parser.parse_args(argv)
    if args.set and not args.tag:
        parser.error("--set changes the per-sample config: name the trial with --tag")
    if not args.report:
        torch.set_num_threads(1)
        extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        for name in args.settings:
            for method in args.methods:
                key = f"{name}__{method}{args.tag if method == 'per_sample' else ''}"
                path = args.out / "runs" / f"{key}.json"
                if path.exists():
                    continue
                result = run_one(SETTINGS[name], method, args.out, extra if method == "per_sample" else {})
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1) + "\n")
                s = summary(result)
                print(f"{key}: rounds {' '.join(f'{x:.2f}' for x in s['rounds'])} mean {s['mean']:.2f} "
                      f"travel {s['travel_max']:.3f}/{s['travel_mean']:.3f} guard {result['guard']} "
                      f"{s['seconds']:.0f}s", flush=True)  # fmt: skip
    print(report(args.out, ROOT / "benchmarks" / "results" / "learning.json"))


if __name__ == "__main__":
    main()
