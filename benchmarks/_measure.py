"""Measurement helpers shared by the benchmark scripts: methods built from their configs, tensor memory, timing.

Methods are built as ``zoa test`` builds them: the method config (``configs/methods/<name>.yaml``, listed by
:mod:`zoa_lightning.method_configs`) goes through the model and trainer part of LightningCLI's parser
(:func:`method_parser`), which validates it, fills in the defaults and instantiates the class it names.

Memory on a CPU has no ``torch.cuda.max_memory_allocated``, and a process's peak RSS is a lifetime maximum dominated
by the interpreter and libraries. The benchmarks therefore count **tensor bytes**, exactly:

* *resident*: the unique tensor storages (and NumPy arrays) a method holds between batches: network, adapter state,
  optimizer buffers, CMA-ES matrices; found by walking the method object;
* *transient peak*: the largest amount of tensor memory allocated and not yet freed during one batch, from the
  allocation events of ``torch.profiler`` (``profile_memory=True``);
* *peak* = resident + transient peak: what the method needs at its high-water mark on this batch.

On a CUDA device the same quantities come from the caching allocator's counters.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn

from zoa_lightning.method_configs import method_config
from zoa_lightning.methods import StreamModule

__all__ = [
    "SourceData",
    "build_method",
    "interleaved_times",
    "median",
    "method_parser",
    "peak_step_bytes",
    "resident_bytes",
    "step",
]


class SourceData:
    """The one member of a stream data module that method setup reads: ``source_dataloader()``.

    Args:
        batches: clean source batches (image tensors).
    """

    def __init__(self, batches: list[Tensor]) -> None:
        self.batches = batches

    def source_dataloader(self) -> Iterable[tuple[Tensor]]:
        """The source batches, as a loader would yield them."""
        return [(b,) for b in self.batches]


@functools.lru_cache(maxsize=1)
def method_parser() -> LightningArgumentParser:
    """The ``model`` and ``trainer`` part of the ``zoa`` CLI's parser, as LightningCLI builds it (no data section).

    ``model`` takes any :class:`~zoa_lightning.methods.base.StreamModule` subclass by ``class_path``
    (``subclass_mode``);
    ``trainer`` accepts the Trainer flags a method config may set (``tent.yaml`` sets ``inference_mode``), which
    the benchmarks do not use: they call the module directly.

    Returns:
        The parser (built once, then cached); ``-c``/``--config`` composes config files as ``zoa test -c`` does.
    """
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="config file(s), composed in order")
    parser.add_lightning_class_args(StreamModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    return parser


def build_method(
    method: str,
    network: nn.Module,
    num_classes: int,
    source: SourceData,
    method_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> StreamModule:
    """Build ``configs/methods/<method>.yaml``'s module around a copy of ``network`` and run its setup.

    The config is parsed and instantiated by :func:`method_parser` (LightningCLI's machinery: validation, defaults,
    the class its ``class_path`` names, with its ``init_args``), with ``num_classes`` and the given network in place
    of the config's network name; setup runs the same :meth:`~zoa_lightning.methods.base.StreamModule.setup_method` as
    under a Trainer (adapter and source statistics).

    Args:
        method: method config name (``zoa``, ``no_adapt``, ``tent``, ...:
            :func:`zoa_lightning.method_configs.method_names`).
        network: the (possibly quantized) network; deep-copied, so methods never share state.
        num_classes: classifier size.
        source: clean source batches.
        method_dir: folder of the method configs (default :func:`zoa_lightning.method_configs.default_method_dir`).
        overrides: ``init_args`` set over the config's (``{"lr": 0.005}`` as ``--model.init_args.lr 0.005``).

    Returns:
        The ready module.

    Raises:
        FileNotFoundError: for an unknown method (the message lists the known ones).
        TypeError: if the method refuses the network (FOA's prompts need a ViT); the module's own error, as its
            other refusals (``ValueError`` for a bad hyperparameter).
    """
    parser = method_parser()
    flags = [f"--model.init_args.{key}={value if isinstance(value, str) else json.dumps(value)}"
             for key, value in (overrides or {}).items()]  # fmt: skip
    config = parser.parse_args(
        ["--config", str(method_config(method, method_dir)), "--model.init_args.num_classes", str(num_classes), *flags]
    )
    config.model.init_args.network = copy.deepcopy(network)  # instead of building the config's network by name
    try:
        module = parser.instantiate(config).model
    except ValueError as error:  # jsonargparse reports a refusing constructor as a type mismatch: give its own error
        cause = error.__cause__ or error.__context__
        if isinstance(cause, Exception):
            raise cause from error
        raise
    if not isinstance(module, StreamModule):
        raise TypeError(f"{method}: the config's model is a {type(module).__name__}, not a StreamModule subclass")
    with torch.no_grad():
        module.setup_method(source)
    return module


def step(module: StreamModule, images: Tensor) -> Tensor:
    """One batch of ``module`` exactly as its ``test_step`` runs it (``torch.no_grad`` around ``adapt_step``)."""
    with torch.no_grad():
        return module.adapt_step(images)


_OPAQUE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType)


def _walk(obj: Any, seen: set[int], storages: dict[int, int], depth: int) -> None:
    if depth > 16 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        if isinstance(base, np.ndarray):
            storages[base.__array_interface__["data"][0]] = base.nbytes
        return
    if isinstance(obj, dict):
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, list | tuple | set | frozenset):
        children = obj
    elif isinstance(obj, _OPAQUE):
        return
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return
    for child in children:
        _walk(child, seen, storages, depth + 1)


def resident_bytes(module: StreamModule) -> int:
    """Bytes of every tensor storage and NumPy array reachable from ``module`` (each storage counted once)."""
    storages: dict[int, int] = {}
    _walk(module, set(), storages, 0)
    return sum(storages.values())


def peak_step_bytes(fn: Callable[[], object]) -> int:
    """Largest amount of tensor memory ``fn`` holds allocated at once, beyond what was allocated before it ran.

    Uses the allocation events of ``torch.profiler`` (CPU) or the CUDA allocator's peak counter when a CUDA device is
    in use. Frees of tensors allocated before ``fn`` started do not lower the count (the profiler never saw their
    size), so the figure is an upper bound when ``fn`` releases older state.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def _elapsed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_times(
    jobs: dict[str, Callable[[int], object]], repeats: dict[str, int], warmup: int = 1
) -> Iterator[tuple[str, float]]:
    """Time each job on batches ``0, 1, ...`` round-robin, so machine noise hits every job alike.

    Args:
        jobs: name → function of the batch index.
        repeats: timed runs per job (a job with fewer repeats drops out of later rounds).
        warmup: untimed runs per job first.

    Yields:
        ``(name, seconds)`` for every timed run, in the order they ran.
    """
    for i in range(warmup):
        for fn in jobs.values():
            fn(i)
    for r in range(max(repeats.values(), default=0)):
        for name, fn in jobs.items():
            if r < repeats[name]:
                yield name, _elapsed(functools.partial(fn, warmup + r))


def median(values: list[float]) -> float:
    """Median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")
