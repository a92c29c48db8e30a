"""Does the engine on the ONNX Runtime float graph follow the engine on the torch float network? The demo stream.

Run ``python benchmarks/runtime_equivalence.py [--model demo_vit|demo_cnn] [--methods zoa zoa_per_sample]
[--out PATH]``.

For each method the module ``zoa test -c configs/demo.yaml -c configs/methods/<method>.yaml`` builds is built twice
around the float demo network: once on the torch network, once on the float graph ``callbacks.OnnxRuntimeCallback``
exports (``precision: float``). ``--model demo_cnn`` runs the demo CNN (its BatchNorms on each pass's batch
statistics inside the graph) with the paper's ResNet hyperparameters (``configs/parts/model/resnet50_w8a8.yaml``:
``lr``, ``spsa_c``, ``lambda_bp``, ``domain_t``) in place of the demo ViT's; its ``zoa_per_sample`` is refused
(BatchNorm couples the images). Both collect source statistics from the demo's source images and run the demo
stream (15 corruptions at severity 5, 16 batches of 64 images each: 240 batches) side by side. After every batch
the script compares the adapted values (epsilons and mixing logits), the bank (entries, stores and their batches)
and the predictions. Targets: max |Δθ| ≤ 1e-4 over the stream, identical stores, ≥ 99.9 % identical predictions.
Results: ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from benchmarks._measure import build_method, step
from benchmarks.runtime import demo_overrides
from callbacks import OnnxRuntimeCallback
from zoa_lightning.core import ZOA
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.runtime.network import RuntimeNetwork
from zoa_lightning.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"max_theta_diff": 1e-4, "identical_predictions": 0.999}


def demo_data() -> Any:
    """The demo's stream data module (``configs/demo.yaml``), set up."""
    from cli import resolved_config
    from datamodules import CorruptionStreamDataModule

    init = resolved_config(["-c", str(ROOT / "configs" / "demo.yaml")])["data"]["init_args"]
    data = CorruptionStreamDataModule(**init)
    data.prepare_data()
    data.setup("test")
    return data


def model_overrides(model: str, method: str) -> dict[str, Any]:
    """The demo config's settings of ``method``; for the demo CNN with the paper's ResNet hyperparameters."""
    overrides = demo_overrides(method)
    if model == "demo_cnn":
        part = yaml.safe_load((ROOT / "configs" / "parts" / "model" / "resnet50_w8a8.yaml").read_text())["init_args"]
        overrides.update({k: part[k] for k in ("lr", "spsa_c", "lambda_bp", "domain_t")})
    return overrides


def compare(method: str, data: Any, batches: int | None, model: str = "demo_vit") -> dict[str, Any]:
    """Run ``method`` on both backends over the stream; the comparison after every batch."""
    network = build_network(model).eval()
    with torch.no_grad():
        graph = OnnxRuntimeCallback(precision="float").graphs(
            network, resolve_layout(network), data.calibration_images(32)
        )["float"]
    overrides = model_overrides(model, method)
    modules = [build_method(method, net, 10, data, overrides=overrides) for net in (network, RuntimeNetwork(graph))]
    engines = [m.adapter for m in modules if isinstance(m.adapter, ZOA)]
    assert len(engines) == 2
    worst = {"theta": 0.0, "alpha": 0.0, "logits": 0.0}
    same = total = count = 0
    mismatched_banks = []
    for loader in data.test_dataloader().values():
        for images, _ in loader:
            if batches is not None and count >= batches:
                break
            logits = [step(m, images) for m in modules]
            theta = [e.bank.theta for e in engines]
            alpha = [e.bank.alpha for e in engines]
            worst["theta"] = max(worst["theta"], float((theta[0] - theta[1]).abs().max()))
            worst["alpha"] = max(worst["alpha"], float((alpha[0] - alpha[1]).abs().max()))
            worst["logits"] = max(worst["logits"], float((logits[0] - logits[1]).abs().max()))
            same += int((logits[0].argmax(1) == logits[1].argmax(1)).sum())
            total += len(images)
            if int(engines[0].bank.count) != int(engines[1].bank.count):
                mismatched_banks.append(count)
            count += 1
    events = [[(e["batch"], e["event"]) for e in engine.events] for engine in engines]
    stores = [engine.counter("stores") for engine in engines]
    result: dict[str, Any] = {
        "model": model, "method": method, "batches": count, "images": total, "max_theta_diff": worst["theta"],
        "max_alpha_diff": worst["alpha"], "max_logit_diff": worst["logits"], "identical_predictions": same / total,
        "stores": stores, "identical_stores": events[0] == events[1] and not mismatched_banks,
        "theta_scale": float(engines[0].bank.theta.abs().max()),
    }  # fmt: skip
    result["targets_met"] = {
        "max_theta_diff": result["max_theta_diff"] <= TARGETS["max_theta_diff"],
        "identical_stores": result["identical_stores"],
        "identical_predictions": result["identical_predictions"] >= TARGETS["identical_predictions"],
        "batches_ge_240": count >= 240,
    }
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per method."""
    lines = [
        "| model | method | batches | max abs dtheta | max abs dalpha | max abs dlogits | stores (torch / ORT) "
        "| identical stores | identical predictions |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.get('model', 'demo_vit')} | {r['method']} | {r['batches']} | {r['max_theta_diff']:.2e} | "
            f"{r['max_alpha_diff']:.2e} | "
            f"{r['max_logit_diff']:.2e} | {r['stores'][0]} / {r['stores'][1]} | "
            f"{'yes' if r['identical_stores'] else 'no'} | {100 * r['identical_predictions']:.2f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, compare, write and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo_vit", "demo_cnn"], default="demo_vit")
    parser.add_argument("--methods", nargs="+", help="default: zoa zoa_per_sample (zoa on the demo CNN)")
    parser.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: all 240)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime_equivalence")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = demo_data()
    methods = args.methods or (["zoa"] if args.model == "demo_cnn" else ["zoa", "zoa_per_sample"])
    results = [compare(method, data, args.batches, args.model) for method in methods]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
