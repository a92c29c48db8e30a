"""Clean and corrupted-stream accuracy of the demo models in float and at W8A8 / W6A6 / W4A4, and calibration time.

Run ``python benchmarks/quantization.py [--json] [--models demo_vit demo_cnn] [--bits 8 6 4]``. For each model and
precision it quantizes the shipped demo network with the project's quantizer (PTQ4ViT-style for the ViT, MQBench for
the CNN, 32 calibration images of the training part), then measures top-1 on the clean 1,000-image MNIST test part and
the mean top-1 without adaptation over the 15-corruption severity-5 stream (the drop that ZOA has to recover).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from callbacks.quantization import QuantizationCallback
from datamodules import CorruptionStreamDataModule
from zoa_lightning.networks import build_network


def _accuracy(net: nn.Module, loader: Any) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((net(images).argmax(1) == labels).sum())
            total += int(labels.numel())
    return 100.0 * correct / total


def measure(
    model: str,
    bits: int | None,
    data: CorruptionStreamDataModule,
    observer: Literal["mse", "minmax"],
    adaround_iters: int = 20000,
) -> dict[str, Any]:
    """Quantize (``bits=None``: float) and evaluate one demo model."""
    net = build_network(model)
    seconds = 0.0
    if bits is not None:
        callback = QuantizationCallback(
            bits=bits,
            observer=observer,
            adaround_iters=adaround_iters,
            cache=False,  # type: ignore[arg-type]
        )
        start = time.perf_counter()
        net, _ = callback.quantize(copy.deepcopy(net), data.calibration_images(32))
        seconds = time.perf_counter() - start
    net.eval()
    clean = _accuracy(net, data.val_dataloader())
    stream = [_accuracy(net, loader) for loader in data.test_dataloader().values()]
    return {
        "model": model,
        "precision": "float" if bits is None else f"W{bits}A{bits}",
        "clean_acc1": clean,
        "stream_mean_acc1": sum(stream) / len(stream),
        "calibration_s": seconds,
        "adaround_iters": adaround_iters if bits is not None and bits <= 4 and "cnn" in model else None,
    }


def main() -> None:
    """Parse arguments, measure every (model, precision), print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo_vit", "demo_cnn"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--observer", default="mse", choices=["mse", "minmax"], help="MQBench observers (CNN)")
    parser.add_argument("--adaround-iters", type=int, default=20000, help="MQBench AdaRound iterations (<= 4 bits)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = CorruptionStreamDataModule()
    data.setup("test")
    rows = [measure(m, b, data, args.observer, args.adaround_iters) for m in args.models for b in [None, *args.bits]]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=2))
        return
    table = Table(title="demo models: clean and corrupted-stream top-1 (no adaptation)")
    for column in ("model", "precision", "clean top-1 %", "stream mean top-1 %", "calibration s"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["model"],
            r["precision"],
            f"{r['clean_acc1']:.1f}",
            f"{r['stream_mean_acc1']:.1f}",
            f"{r['calibration_s']:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
