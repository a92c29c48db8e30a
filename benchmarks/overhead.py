"""Per-batch cost of the pure-torch ZOA adapter against the same network's plain forward, measured side by side.

Run ``python benchmarks/overhead.py [--json] [--batch 64] [--repeats 15]``. For each model the plain forward (no
adaptation, ``torch.no_grad``) and one ZOA step (two forward passes plus the update) alternate on the same batches,
so machine noise hits both alike; the script prints the median seconds per batch and their ratio as a table, or as
JSON with ``--json``. ZOA's floor is 2.0 (two passes); the issue's bound is 2.3, the project's goal 2.05. For CNNs a
second ratio compares with the same network running every BatchNorm on batch statistics, which is how ZOA must run
it (spec §1.2): that part of the cost is the method's, not the implementation's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from zoa_lightning.core import ZOA, ZOAConfig
from zoa_lightning.networks import build_network


def _models() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    def demo_vit() -> nn.Module:
        return build_network("demo_vit")

    def demo_vit_w8a8() -> nn.Module:
        from zoa_lightning.core.quant import quantize_vit

        torch.manual_seed(0)
        network = build_network("demo_vit")
        assert isinstance(network, timm.models.VisionTransformer)
        return quantize_vit(network, torch.randn(32, 3, 32, 32), 8, 8, num_candidates=20)

    def demo_cnn() -> nn.Module:
        return build_network("demo_cnn")

    def vit_tiny_224() -> nn.Module:
        return timm.create_model("vit_tiny_patch16_224", num_classes=1000)

    def resnet18_32() -> nn.Module:
        return torchvision.models.resnet18(num_classes=10)

    return {
        "demo_vit (32px)": (demo_vit, 32),
        "demo_vit W8A8 (32px)": (demo_vit_w8a8, 32),
        "demo_cnn (32px)": (demo_cnn, 32),
        "vit_tiny (224px)": (vit_tiny_224, 224),
        "resnet18 (32px)": (resnet18_32, 32),
    }


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, build: Callable[[], nn.Module], size: int, batch: int, repeats: int) -> dict[str, object]:
    """Median seconds per batch of the plain forward and of one ZOA step, interleaved."""
    torch.manual_seed(0)
    plain = build().eval()
    batch_stats = copy.deepcopy(plain)  # the same network with every BatchNorm on batch statistics (as ZOA runs it)
    for m in batch_stats.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    adapter = ZOA(copy.deepcopy(plain), ZOAConfig())
    source = torch.randn(batch, 3, size, size)
    adapter.collect_source_statistics([source])
    batches = [torch.randn(batch, 3, size, size) for _ in range(3)]
    plain_times, stats_times, zoa_times = [], [], []
    with torch.no_grad():
        for i in range(repeats + 2):
            x = batches[i % len(batches)]
            t_plain = _time(functools.partial(plain, x))
            t_stats = _time(functools.partial(batch_stats, x))
            t_zoa = _time(functools.partial(adapter, x))
            if i >= 2:  # warm-up
                plain_times.append(t_plain)
                stats_times.append(t_stats)
                zoa_times.append(t_zoa)
    plain_s, zoa_s = statistics.median(plain_times), statistics.median(zoa_times)
    stats_s = statistics.median(stats_times)
    return {
        "model": name,
        "batch": batch,
        "plain_s_per_batch": plain_s,
        "batch_stats_s_per_batch": stats_s,
        "zoa_s_per_batch": zoa_s,
        "time_ratio": zoa_s / plain_s,
        "time_ratio_vs_batch_stats": zoa_s / stats_s,
        "forward_passes_per_batch": adapter.forward_passes / max(adapter.counter("batches"), 1),
        # What N processes would exchange per batch under DDP (sufficient statistics, float64; see docs/distributed.md).
        "ddp_bytes_per_batch": adapter.reduce.last_batch_bytes,
    }


def main() -> None:
    """Parse arguments, run every model, print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = [
        measure(name, build, size, args.batch, args.repeats)
        for name, (build, size) in _models().items()
        if not args.models or any(m in name for m in args.models)
    ]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    table = Table(title=f"ZOA step vs plain forward (CPU, {torch.get_num_threads()} threads, batch {args.batch})")
    columns = (
        "model",
        "plain s/batch",
        "ZOA s/batch",
        "ratio",
        "ratio vs batch-stat BN",
        "passes/batch",
        "DDP bytes/batch",
    )
    for column in columns:
        table.add_column(column)
    for r in results:
        table.add_row(
            str(r["model"]),
            f"{r['plain_s_per_batch']:.4f}",
            f"{r['zoa_s_per_batch']:.4f}",
            f"{r['time_ratio']:.3f}",
            f"{r['time_ratio_vs_batch_stats']:.3f}",
            f"{r['forward_passes_per_batch']:.0f}",
            f"{r['ddp_bytes_per_batch']:,}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
