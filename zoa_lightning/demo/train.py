"""Train the demo's source models from scratch on the training part of a clean image set (default: embedded MNIST).

Usage::

    python -m zoa_lightning.demo.train --model demo_cnn|demo_vit|all [--dataset mnist|<folder>] [--out DIR]
        [--epochs N] [--seed S]

The data is the clean split of :class:`datamodules.CorruptionStreamDataModule` for the same ``dataset`` at 32 pixels:
the embedded MNIST digits (4,000 training, 1,000 test images) or an image folder ``<root>/<class>/*.png|jpg`` (a
seeded permutation of its files, the last 20 % forming the test part), so a model trained here has never seen the
images that the corruption stream of that data set is built from. The class count is the data's (10 for MNIST, the
number of class sub-folders otherwise).

Each model is trained on the training part only, with AdamW, a linear warm-up followed by a cosine learning-rate
decay, and light geometric augmentation (a small random affine: rotation, scale and a shift of a few pixels, no
flips). Inputs are scaled to ``[0, 1]`` and normalised with mean = std = 0.5 per channel. Training is seeded and runs
with deterministic algorithms in plain PyTorch loops on the CPU.

At the end the model is written to ``<out>/<name>.safetensors`` (the full state dict, stored in ``--dtype``; ``--out``
defaults to ``./runs/demo-weights``, never the installed package) and reloaded through
:func:`zoa_lightning.demo.load_demo_model`; the accuracy of the reloaded model on the clean test part is recorded,
with the recipe, in ``<out>/<name>.json``, and the ``zoa test`` command that adapts it is printed. The test part is
never used for training or model selection: the weights of the last epoch are kept. To rebuild the shipped weights,
pass the package folder explicitly: ``--out zoa_lightning/demo/weights``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import safetensors
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoa_lightning.demo.models import (
    DEMO_MEAN,
    DEMO_MODEL_NAMES,
    DEMO_STD,
    build_demo_cnn,
    build_demo_vit,
    load_demo_model,
)
from zoa_lightning.demo.recipes import RECIPES, Recipe, TrainingData, load_training_data
from zoa_lightning.files import atomic_write

__all__ = ["DEFAULT_OUT", "evaluate", "main", "train_model", "usage"]

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "float32": torch.float32}

DEFAULT_OUT = Path("runs") / "demo-weights"
"""Default output folder, relative to the working directory (the shipped weights are only replaced on request)."""


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert ``uint8`` ``N×H×W×3`` images to a ``float32`` ``N×3×H×W`` tensor in ``[0, 1]``."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise ``[0, 1]`` images with the demo mean and standard deviation."""
    mean = torch.tensor(DEMO_MEAN, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(DEMO_STD, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent small random affine transform to each ``[0, 1]`` image of a batch.

    Rotation, isotropic scale and shift are drawn uniformly from the recipe's ranges; pixels brought in from outside
    the image are black (0), like the MNIST background. No flips: they change a digit's identity.

    Args:
        x: ``N×C×H×W`` batch in ``[0, 1]``.
        recipe: gives the ranges.
        generator: the source of randomness.

    Returns:
        The transformed batch, same shape.
    """
    n, _, h, w = x.shape
    uniform = torch.rand(n, 4, generator=generator, dtype=x.dtype)
    angle = (uniform[:, 0] * 2 - 1) * math.radians(recipe.max_rotation)
    low, high = recipe.scale_range
    scale = low + uniform[:, 1] * (high - low)
    shift = (uniform[:, 2:] * 2 - 1) * recipe.max_shift
    # affine_grid maps output coordinates to input coordinates, in [-1, 1] units (2 / size per pixel).
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -shift[:, 0] * 2 / w], dim=1),
            torch.stack([sin, cos, -shift[:, 1] * 2 / h], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Split parameters into a weight-decayed group (matrices, kernels) and an undecayed one (the rest)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 1 % to 100 %, then a cosine decay to zero."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 250) -> float:
    """Return the top-1 accuracy of ``model`` (put in eval mode) on ``uint8`` ``N×H×W×3`` images.

    Args:
        model: a classifier taking normalised ``N×3×H×W`` inputs.
        images: the images, as returned by :func:`zoa_lightning.data.load_mnist_split`.
        labels: integer class labels.
        batch_size: evaluation batch size.

    Returns:
        The fraction of correctly classified images.
    """
    model.eval()
    x, y = _to_tensor(images), torch.from_numpy(np.array(labels, dtype=np.int64))
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(_normalize(x[start : start + batch_size]))
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def _build(name: str, recipe: Recipe, num_classes: int) -> nn.Module:
    """Build the randomly initialised architecture ``name`` with the recipe's training-only options."""
    if name == "demo_vit":
        return build_demo_vit(num_classes=num_classes, drop_path_rate=recipe.drop_path_rate)
    if name == "demo_cnn":
        return build_demo_cnn(num_classes=num_classes)
    raise ValueError(f"unknown demo model {name!r}; expected one of {', '.join(DEMO_MODEL_NAMES)}")


def train_model(
    name: str,
    recipe: Recipe,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "float16",
    monitor_every: int = 0,
    data: TrainingData | None = None,
) -> dict[str, object]:
    """Train demo model ``name`` from scratch, save it, and evaluate the saved weights on the clean test part.

    Args:
        name: ``"demo_vit"`` or ``"demo_cnn"``.
        recipe: the hyper-parameters.
        out_dir: folder receiving ``<name>.safetensors`` and ``<name>.json`` (created if needed).
        seed: seeds the initialisation, the data order and the augmentation.
        dtype: storage precision of floating-point tensors in the weights file, ``"float16"`` or ``"float32"``.
        monitor_every: if positive, log the clean test accuracy every ``monitor_every`` epochs to watch progress.
            It is never used to choose weights or stop early; the last epoch's weights are saved.
        data: the split to train on (:func:`load_training_data`); ``None`` for the embedded MNIST. The model gets
            its class count. A training part smaller than the recipe's batch size is one batch per step.

    Returns:
        The run record that is also written to ``<name>.json``.
    """
    started = time.perf_counter()
    data = data if data is not None else load_training_data("mnist")
    train_images, train_labels, test_images, test_labels = (
        data.train_images,
        data.train_labels,
        data.test_images,
        data.test_labels,
    )
    batch_size = min(recipe.batch_size, len(train_labels))
    if batch_size < recipe.batch_size:
        log.info("%s: the training part has %d images, so the batch size is %d", name, len(train_labels), batch_size)
    torch.manual_seed(seed)
    model = _build(name, recipe, data.num_classes)
    num_params = sum(p.numel() for p in model.parameters())
    dataset = TensorDataset(_to_tensor(train_images), torch.from_numpy(np.array(train_labels, dtype=np.int64)))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    aug_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(_parameter_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999))
    total_steps = recipe.epochs * len(loader)
    warmup_steps = round(recipe.warmup_epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    log.info(
        "%s: %d parameters, %d classes, %d steps of batch %d, recipe %s",
        name,
        num_params,
        data.num_classes,
        total_steps,
        batch_size,
        recipe,
    )

    for epoch in range(1, recipe.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            logits = model(_normalize(_augment(x, recipe, aug_generator)))
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().item() * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
        message = "%s epoch %d/%d: loss %.4f, train acc %.4f, lr %.2e, %.1f s"
        values: list[object] = [name, epoch, recipe.epochs, loss_sum / seen, correct / seen]
        values += [optimizer.param_groups[0]["lr"], time.perf_counter() - epoch_start]
        if monitor_every > 0 and (epoch % monitor_every == 0) and epoch < recipe.epochs:
            message += " (monitoring only: clean test acc %.4f)"
            values.append(evaluate(model, test_images, test_labels))
        log.info(message, *values)
    train_seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    state = {
        k: (v.to(_DTYPES[dtype]) if v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    # Atomic: a concurrent reader never sees a half-written file. 0o644 whatever the umask: the shipped weights are
    # meant to be read by all.
    atomic_write(path, save(state, metadata={"model": name, "seed": str(seed), "dtype": dtype}), mode=0o644)

    saved = load_demo_model(name, path, num_classes=data.num_classes)
    record: dict[str, object] = {
        "model": name,
        "architecture": type(saved).__name__,
        "parameters": num_params,
        "num_classes": data.num_classes,
        "dataset": data.dataset,
        "seed": seed,
        "storage_dtype": dtype,
        "file_bytes": path.stat().st_size,
        "optimizer": "AdamW (betas 0.9, 0.999); no weight decay on biases, norms, pos_embed, cls_token",
        "schedule": "per-step linear warm-up from lr/100, then cosine decay to 0",
        "augmentation": (
            f"random affine per image: rotation ±{recipe.max_rotation:g}°, scale {recipe.scale_range[0]:g}–"
            f"{recipe.scale_range[1]:g}, shift ±{recipe.max_shift:g} px, black fill, bilinear; no flips"
        ),
        "normalization": {"scale": "1/255", "mean": list(DEMO_MEAN), "std": list(DEMO_STD)},
        "data": data.description,
        "recipe": asdict(recipe),
        "batch_size": batch_size,
        "train_accuracy_last_epoch": correct / seen,
        "train_seconds": round(train_seconds, 1),
        "test_accuracy": evaluate(saved, test_images, test_labels),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "safetensors": safetensors.__version__},
        "threads": torch.get_num_threads(),
        "test_monitoring_every_epochs": monitor_every,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "%s: clean test accuracy %.4f (stored %s weights, %d bytes) after %.0f s; wrote %s",
        name,
        record["test_accuracy"],
        dtype,
        record["file_bytes"],
        train_seconds,
        path,
    )
    return record


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m zoa_lightning.demo.train", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--model", choices=[*DEMO_MODEL_NAMES, "all"], required=True, help="model to train")
    parser.add_argument(
        "--dataset",
        default="mnist",
        help="'mnist' (the embedded digits) or a folder <root>/<class>/*.png|jpg; split exactly as "
        "CorruptionStreamDataModule(dataset=...) splits it, and the class count is the folder's",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT}); the shipped weights are replaced only if you pass their "
        "folder, zoa_lightning/demo/weights",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="float16",
        help="storage precision of the weights file (float16 halves the files; the models are used in float32)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--monitor-every",
        type=int,
        default=10,
        help="log the clean test accuracy every N epochs, for watching only (0: never); weights are not selected on it",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run the command line: train the requested model(s) and log how to adapt them.

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The run record of each trained model.
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = load_training_data(args.dataset)
    names = ["demo_cnn", "demo_vit"] if args.model == "all" else [args.model]
    records = []
    for name in names:
        recipe = RECIPES[name]
        if args.epochs is not None:
            recipe = replace(recipe, epochs=args.epochs)
        if args.lr is not None:
            recipe = replace(recipe, lr=args.lr)
        records.append(
            train_model(
                name, recipe, args.out, seed=args.seed, dtype=args.dtype, monitor_every=args.monitor_every, data=data
            )
        )
    for name in names:
        log.info("%s", usage(name, args.out / f"{name}.safetensors", data))
    return records


def usage(name: str, weights: Path, data: TrainingData) -> str:
    """Say how to adapt (``zoa test``) and compare (``zoa compare``) a trained model on its data's corruption stream.

    Args:
        name: the demo architecture.
        weights: the trained weights file.
        data: the data it was trained on.

    Returns:
        A few lines with the commands, run from the repository root (where ``configs/`` is).
    """
    flags = f"--model.init_args.network {name} --model.init_args.weights {weights}"
    if data.dataset.lower() != "mnist":
        # num_source_images null: source statistics from the whole training part (the demo config asks for 2,048).
        flags += f" --data.init_args.dataset {data.dataset} --data.init_args.num_source_images null"
    return (
        f"{name} trained on {data.num_classes} classes ({len(data.train_labels)} training images). Adapt it on the "
        f"corruption stream of the same data's {len(data.test_labels)} test images:\n"
        f"  zoa test -c configs/demo.yaml {flags}\n"
        f"and compare methods on that stream:\n"
        f"  zoa compare -c configs/demo.yaml --methods zoa no_adapt {flags}"
    )


if __name__ == "__main__":
    main()
