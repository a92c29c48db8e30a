"""Cost of ZOA on the ONNX Runtime backend beside torch, per batch, side by side in one process; peak memory apart.

Run ``python benchmarks/runtime.py [--models demo_vit vit_small demo_cnn] [--batches 64 1] [--repeats 15] [--out P]``.

For each model and batch size the script builds every (backend, method) pair as ``zoa test`` builds it (the method
configs of ``configs/methods/`` around a copy of the same network, source statistics on the same clean batches):

* backends: ``torch float``; ``torch W8A8`` (the fake quantizer of ``callbacks.QuantizationCallback``, calibrated on
  the same 32 images, cached); ``ORT INT8`` and ``ORT float`` (the graphs of ``callbacks.OnnxRuntimeCallback``, cached;
  ``no_adapt`` runs the plain graph, ZOA the adaptable one);
* methods: ``no_adapt``, ``zoa`` (the demo's reference-mode settings) and, on ViTs, ``zoa_per_sample``; on CNNs
  also ``norm_adapt``, one pass with every BatchNorm on the batch's statistics (ONNX Runtime: one call of the
  adaptable graph), the reference for ZOA's batch-statistics passes, as in ``benchmarks/cost.py``.

Every batch is real digits of the MNIST test part (upsampled to 224 px for ``vit_small``, timm
``vit_small_patch16_224`` with random weights). Torch and ONNX Runtime both run one thread
(``torch.set_num_threads(1)``, ``intra_op_threads=1``), so both compute on the calling thread and its CPU time
(``time.thread_time``) is the cost of a batch even on a busy machine; wall time is reported too. Jobs take turns batch
by batch (interleaved) after two warm-up batches; medians. For ORT jobs the time inside ``session.run`` is accumulated,
so the rest is the engine's bookkeeping (the same torch code as the torch backend's). ``--memory`` also measures each
configuration's peak resident memory in its own process (``VmHWM`` after a reset once set up: the batches' peak, the
process's libraries included) and the increment over the memory in use once set up. ``--calls`` times the two ways to
run a ZOA batch's passes on the INT8 graph: two calls of ``B`` rows or one call of ``2B`` rows. Results:
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._measure import SourceData, build_method, median, step
from callbacks import OnnxRuntimeCallback, QuantizationCallback
from zoa_lightning.core.layout import resolve_layout
from zoa_lightning.core.runtime.network import RuntimeNetwork
from zoa_lightning.methods import StreamModule
from zoa_lightning.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, ...]]] = {
    # name: (builder, image size, batch sizes)
    "demo_vit": (lambda: build_network("demo_vit"), 32, (64, 1)),
    "vit_small": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10), 224, (16,)),
    "demo_cnn": (lambda: build_network("demo_cnn"), 32, (64, 1)),
}
BACKENDS = ("torch float", "torch W8A8", "ORT INT8", "ORT float")
TARGETS = {"vs_ort_no_adapt": 2.2, "vs_torch_w8a8": 0.6, "vit_small_vs_torch_float": 1.5, "batch1": 3.0, "memory": 1.1}


def digits(size: int) -> tuple[Tensor, Tensor]:
    """(32 calibration images, 512 test images) of the demo stream's data, at ``size`` px."""
    from datamodules import CorruptionStreamDataModule

    data = CorruptionStreamDataModule(dataset="mnist")
    calibration = data.calibration_images(32)
    _, _, x, _ = data.clean_split()
    test = (torch.from_numpy(np.array(x[:512])).float().div(255).permute(0, 3, 1, 2) - 0.5) / 0.5
    if size != calibration.shape[-1]:
        calibration, test = (F.interpolate(t, size=(size, size), mode="bilinear") for t in (calibration, test))
    return calibration.contiguous(), test.contiguous()


def networks(name: str, calibration: Tensor) -> dict[str, Any]:
    """Each backend's network (graphs per layout for ONNX Runtime), built or loaded from the caches."""
    torch.manual_seed(0)
    network = MODELS[name][0]().eval()
    candidates = {"num_candidates": 20} if name == "vit_small" else {}  # (the search's cost, not the forward's)
    quantized, _ = QuantizationCallback(bits=8, **candidates).quantize(network, calibration)  # type: ignore[arg-type]
    runtime = OnnxRuntimeCallback()
    with torch.no_grad():
        graphs = {kind: runtime.graphs(network, layout, calibration)
                  for kind, layout in (("plain", None), ("zoa", resolve_layout(network)))}  # fmt: skip
    return {"torch float": network, "torch W8A8": quantized.eval(), "graphs": graphs}


def build(name: str, backend: str, method: str, nets: dict[str, Any], source: SourceData) -> StreamModule:
    """The method's module on the backend's network."""
    if backend.startswith("ORT"):
        precision = "int8" if backend == "ORT INT8" else "float"
        network: nn.Module = RuntimeNetwork(nets["graphs"]["plain" if method == "no_adapt" else "zoa"][precision])
        if method == "norm_adapt":  # one pass of the adaptable graph: every BatchNorm on the batch's statistics
            return build_method("no_adapt", network, 10, source)
    else:
        network = nets[backend]
    return build_method(method, network, 10, source, overrides=demo_overrides(method))


def demo_overrides(method: str) -> dict[str, Any]:
    """The model settings ``zoa test -c configs/demo.yaml -c configs/methods/<method>.yaml`` runs the method with.

    Every ``init_args`` value of the composed config (as ``zoa test`` resolves it: ``configs/demo.yaml`` includes the
    paper's ViT W8A8 hyperparameters from ``configs/parts/``), but the network and the class count, which the
    benchmark gives.
    """
    model = _composed_model(method)
    return {k: v for k, v in model["init_args"].items() if k not in ("network", "num_classes")}


@functools.cache
def _composed_model(method: str) -> dict[str, Any]:
    from cli import resolved_config
    from zoa_lightning.method_configs import method_config

    model: dict[str, Any] = resolved_config(
        ["-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(method_config(method))]
    )["model"]
    return model


class SessionClock:
    """Wraps an ``InferenceSession``: ``run`` accumulates its wall and thread CPU seconds."""

    def __init__(self, session: Any) -> None:
        self.session, self.wall, self.cpu = session, 0.0, 0.0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """``session.run``, timed."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu


def clock(module: StreamModule) -> SessionClock | None:
    """Put a :class:`SessionClock` around the session an ORT module calls (``None`` for torch modules)."""
    adapter = module.adapter
    assert adapter is not None
    network = adapter.model
    if not isinstance(network, RuntimeNetwork):
        return None
    timed = SessionClock(network.session)
    network.session = timed
    forward = getattr(adapter, "taps", None)  # ZOA's SessionForward holds the session too
    if forward is not None:
        forward.session = timed
    return timed


def measure(name: str, batch: int, repeats: int, methods: list[str]) -> list[dict[str, Any]]:
    """Time every (backend, method) of ``name`` at ``batch`` images, interleaved; one row each."""
    size = MODELS[name][1]
    calibration, test = digits(size)
    nets = networks(name, calibration)
    source = SourceData(list(calibration.split(16)))
    cnn = resolve_layout(nets["torch float"]).kind == "cnn"
    # A CNN's ZOA normalises with batch statistics: one such pass (norm_adapt) is its reference beside no_adapt's
    wanted = [m for m in methods if m != "zoa_per_sample" or not cnn] + (["norm_adapt"] if cnn else [])
    jobs = {(b, m): build(name, b, m, nets, source) for b in BACKENDS for m in wanted}
    clocks = {key: clock(module) for key, module in jobs.items()}
    batches = [test[(i * batch) % (len(test) - batch) :][:batch] for i in range(repeats + 2)]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in jobs}
    session: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in jobs}
    for i, images in enumerate(batches):
        for key, module in jobs.items():
            timed = clocks[key]
            before = (timed.wall, timed.cpu) if timed is not None else (0.0, 0.0)
            wall, cpu = time.perf_counter(), time.thread_time()
            step(module, images)
            took = (time.perf_counter() - wall, time.thread_time() - cpu)
            if i >= 2:  # two warm-up batches
                times[key].append(took)
                if timed is not None:
                    session[key].append((timed.wall - before[0], timed.cpu - before[1]))
    rows = []
    for (backend, method), module in jobs.items():
        row: dict[str, Any] = {
            "model": name, "batch": batch, "backend": backend, "method": method,
            "passes_per_batch": module.forward_passes() / len(batches),
            "wall_ms": 1e3 * median([t[0] for t in times[(backend, method)]]),
            "cpu_ms": 1e3 * median([t[1] for t in times[(backend, method)]]),
        }  # fmt: skip
        if session[(backend, method)]:
            row["session_cpu_ms"] = 1e3 * median([t[1] for t in session[(backend, method)]])
            row["session_share"] = row["session_cpu_ms"] / row["cpu_ms"]
        rows.append(row)
    spent = {(r["backend"], r["method"]): r["cpu_ms"] for r in rows}
    for r in rows:
        r["x_ort_int8_no_adapt"] = r["cpu_ms"] / spent[("ORT INT8", "no_adapt")]
        r["x_torch_float_no_adapt"] = r["cpu_ms"] / spent[("torch float", "no_adapt")]
        r["x_torch_w8a8_same_method"] = r["cpu_ms"] / spent[("torch W8A8", r["method"])]
        if ("ORT INT8", "norm_adapt") in spent:
            r["x_same_backend_norm_adapt"] = r["cpu_ms"] / spent[(r["backend"], "norm_adapt")]
    return rows


def calls(name: str, batch: int, repeats: int) -> dict[str, Any]:
    """Thread CPU ms of a ZOA batch's two passes on the INT8 graph: two calls of B rows vs one call of 2B rows."""
    size = MODELS[name][1]
    calibration, test = digits(size)
    network = RuntimeNetwork(networks(name, calibration)["graphs"]["zoa"]["int8"])
    meta = network.metadata
    images = test[:batch].numpy()
    base = np.repeat(meta.base_values().numpy()[None], batch, 0)
    perturbed = (base + 0.02 * np.random.default_rng(0).standard_normal(base.shape)).astype(np.float32)
    shift = np.zeros((batch, meta.tap_dims[-1]), np.float32)
    extra: dict[str, np.ndarray] = {}
    if meta.batch_norm_channels:  # a BatchNorm graph normalises a call's rows together: one call of 2B is not 2 passes
        return {"model": name, "batch": batch, "note": "BatchNorm graph: each pass must be its own call"}
    feeds = [{"images": images, "params": p, "shift": shift, **extra} for p in (base, perturbed)]
    both = {k: np.concatenate([feeds[0][k], feeds[1][k]]) for k in feeds[0]}
    session = network.session
    variants = {"two calls of B": lambda: [session.run(None, f) for f in feeds], "one call of 2B": lambda: session.run(
        None, both)}  # fmt: skip
    spent: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats + 2):
        for key, run in variants.items():
            start = time.thread_time()
            run()
            if i >= 2:
                spent[key].append(1e3 * (time.thread_time() - start))
    return {"model": name, "batch": batch, **{f"{k} cpu_ms": median(v) for k, v in spent.items()}}


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def memory_worker(name: str, batch: int, backend: str, method: str, batches: int = 5) -> dict[str, Any]:
    """One configuration's peak resident memory in MiB (run in its own process by :func:`memory`)."""
    calibration, test = digits(MODELS[name][1])
    module = build(name, backend, method, networks(name, calibration), SourceData(list(calibration.split(16))))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the batches'
    ready = _status()["VmRSS"]
    for i in range(batches):
        step(module, test[i * batch :][:batch])
    peak = _status()["VmHWM"]
    return {"model": name, "batch": batch, "backend": backend, "method": method, "rss_ready_mib": ready,
            "peak_mib": peak, "increment_mib": peak - ready}  # fmt: skip


def memory(name: str, batch: int, methods: list[str]) -> list[dict[str, Any]]:
    """:func:`memory_worker` for every configuration, each in a fresh process (caches warm)."""
    rows = []
    for backend in ("ORT INT8", "torch W8A8", "torch float"):
        for method in methods:
            if method == "zoa_per_sample" and name == "demo_cnn":
                continue
            args = [sys.executable, __file__, "--memory-worker", name, str(batch), backend, method]
            out = subprocess.run(
                args, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        base = next(b for b in rows if b["backend"] == r["backend"] and b["method"] == "no_adapt")
        r["peak_x_no_adapt"], r["increment_x_no_adapt"] = r["peak_mib"] / base["peak_mib"], (
            r["increment_mib"] / max(base["increment_mib"], 1))  # fmt: skip
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The tables of the report."""
    lines = [
        "| model | batch | backend | method | passes | CPU ms/batch | wall ms | in ORT calls | × ORT INT8 no_adapt "
        "| × torch W8A8 same method | × torch float no_adapt | × same backend norm_adapt |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cost"]:
        share = f"{100 * r['session_share']:.0f} %" if "session_share" in r else "–"
        stats = f"{r['x_same_backend_norm_adapt']:.2f}" if "x_same_backend_norm_adapt" in r else "–"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['backend']} | {r['method']} | {r['passes_per_batch']:.0f} | "
            f"{r['cpu_ms']:.2f} | {r['wall_ms']:.2f} | {share} | {r['x_ort_int8_no_adapt']:.2f} | "
            f"{r['x_torch_w8a8_same_method']:.2f} | {r['x_torch_float_no_adapt']:.2f} | {stats} |"
        )
    if report.get("memory"):
        lines += ["", "| model | batch | backend | method | peak MiB | × no_adapt | increment MiB | × no_adapt |",
                  "|---|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for m in report["memory"]:
            lines.append(
                f"| {m['model']} | {m['batch']} | {m['backend']} | {m['method']} | {m['peak_mib']} | "
                f"{m['peak_x_no_adapt']:.3f} | {m['increment_mib']} | {m['increment_x_no_adapt']:.2f} |"
            )
    if report.get("calls"):
        lines += ["", "| model | batch | two calls of B, CPU ms | one call of 2B, CPU ms |", "|---|---:|---:|---:|"]
        for c in report["calls"]:
            if "note" not in c:
                lines.append(f"| {c['model']} | {c['batch']} | {c['two calls of B cpu_ms']:.2f} | "
                             f"{c['one call of 2B cpu_ms']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=["no_adapt", "zoa", "zoa_per_sample"])
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per configuration")
    parser.add_argument("--batches", nargs="+", type=int, help="only these of the models' batch sizes")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one process each")
    parser.add_argument("--calls", action="store_true", help="also time two calls of B vs one call of 2B rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime")
    parser.add_argument(
        "--memory-worker", nargs=4, metavar=("MODEL", "BATCH", "BACKEND", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if args.memory_worker:
        name, batch, backend, method = args.memory_worker
        result = memory_worker(name, int(batch), backend, method)
        print(json.dumps(result))
        return result
    machine = {"torch": torch.__version__, "threads": 1, "cpu_count": os.cpu_count(), "load": os.getloadavg()}
    report: dict[str, Any] = {"machine": machine, "cost": [], "memory": [], "calls": []}
    for name in args.models:
        for batch in (b for b in MODELS[name][2] if args.batches is None or b in args.batches):
            report["cost"] += measure(name, batch, args.repeats, args.methods)
            if args.memory and batch > 1:
                report["memory"] += memory(name, batch, args.methods)
            if args.calls:
                report["calls"].append(calls(name, batch, args.repeats))
            print(markdown({"cost": [r for r in report["cost"] if r["model"] == name and r["batch"] == batch]}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
