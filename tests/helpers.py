"""What several test modules share, other than fixtures (those live in ``tests/conftest.py``).

* Tiny timm models (built fresh per call: ZOA rewrites a model in place) and random image batches.
* The three-corruption MNIST stream and a quiet CPU test Trainer.
* Thread "processes" with a sum all-reduce between them, and a 2-process gloo run recorded after every batch.
* Photos with ImageNet wnids written as class-folder trees.
* Rows and run info of a results table, and a quick ``zoa test`` config.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import timm
import torch
import yaml
from torch import nn

from zoa_lightning.core import ZOA, ZOAConfig

# ---------------------------------------------------------------------------------------------------- models, images


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """timm zero-initialises some norm scales; give every norm a generic affine so adaptation has an effect."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def make_vit(seed: int = 0) -> nn.Module:
    """timm ``test_vit`` at 32 px (patch 8: 16 tokens + CLS), 10 classes, deterministic weights."""
    torch.manual_seed(seed)
    return randomize_norms(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8), seed).eval()


def make_resnet(seed: int = 0) -> nn.Module:
    """timm ``test_resnet`` with a single-conv stem (the torchvision-style detector tap), 10 classes."""
    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=10, stem_type="", stem_width=16)
    return randomize_norms(net, seed).eval()


MODEL_FACTORIES: dict[str, Callable[[int], nn.Module]] = {"vit": make_vit, "resnet": make_resnet}


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random 32 px RGB images (standard normal) from a generator seeded with ``seed``."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def corrupt_noise(x: torch.Tensor, sigma: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise: a real distribution change for the detector."""
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g)


# ---------------------------------------------------------------------------------------------------- stream, Trainer
STREAM_CORRUPTIONS = ["gaussian_noise", "brightness", "contrast"]


def make_stream(cache: Path, **kwargs: Any) -> Any:
    """A three-domain MNIST corruption stream with 256 source images, read from the session cache."""
    from datamodules import CorruptionStreamDataModule

    return CorruptionStreamDataModule(
        corruptions=STREAM_CORRUPTIONS, cache_dir=str(cache), num_source_images=256, **kwargs
    )


def make_trainer(callbacks: list[pl.Callback] | None = None, batches: int | None = 2, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU test Trainer running ``batches`` batches per domain (``None``: all), inference mode off."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "limit_test_batches": batches,
        "inference_mode": False,
        "callbacks": callbacks or [],
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class RecordLogits(pl.Callback):
    """Keep every test batch's logits."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.logits.append(outputs.detach().clone())


# ---------------------------------------------------------------------------------------------------- several ranks
class ThreadAllReduce:
    """A sum all-reduce between threads, standing in for ``trainer.strategy.reduce`` across processes."""

    def __init__(self, world: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The reduce function of thread ``rank``."""

        def reduce(stats: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = stats.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)  # type: ignore[arg-type]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
            return total

        return reduce


def run_ranks(work: Callable[[int], None], world: int) -> None:
    """Run ``work(rank)`` in ``world`` threads; re-raise the first error in the calling thread."""
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            work(rank)
        except BaseException as error:  # re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def rank_slice(batch: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch (rank order, as the shard sampler cuts it)."""
    b = batch.shape[0]
    return batch[b * rank // world : b * (rank + 1) // world]


Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits, epsilons, mixing logits after a batch


def thread_ranks(
    networks: list[torch.nn.Module], config: ZOAConfig, source: Any, stream: list[torch.Tensor]
) -> tuple[list[ZOA], list[list[Step]]]:
    """One engine per network, each in a thread 'process' on its slice of every batch.

    Engines are built inside their rank (a BatchNorm network's probe forward already reduces); build the networks
    outside, since building seeds the global generator and threads would race.
    """
    world = len(networks)
    comm = ThreadAllReduce(world)
    engines: list[ZOA | None] = [None] * world
    got: list[list[Step]] = [[] for _ in range(world)]

    def rank_work(rank: int) -> None:
        engine = ZOA(networks[rank], config, reduce_fn=comm.for_rank(rank), rank=rank, world_size=world)
        engines[rank] = engine
        engine.collect_source_statistics([rank_slice(x, world, rank) for x in source])
        for x in stream:
            logits = engine(rank_slice(x, world, rank))
            got[rank].append((logits, engine.bank.theta.clone(), engine.bank.alpha.clone()))

    run_ranks(rank_work, world)
    return [e for e in engines if e is not None], got


def assert_ranks_step_as_one(
    want: Sequence[Step], got: list[list[Step]], atol: float = 1e-5, logits_atol: float = 1e-4, label: str = ""
) -> None:
    """Two ranks' epsilons and mixing logits equal each other and, within ``atol``, one engine's after every batch."""
    for i, (logits, theta, alpha) in enumerate(want):
        r0, r1 = got[0][i], got[1][i]
        assert torch.equal(r0[1], r1[1]), f"{label}ranks' epsilons differ after batch {i}"
        assert torch.equal(r0[2], r1[2]), f"{label}ranks' mixing logits differ after batch {i}"
        torch.testing.assert_close(r0[1], theta, rtol=0, atol=atol, msg=lambda m: f"{label}{m}")
        torch.testing.assert_close(r0[2], alpha, rtol=0, atol=atol, msg=lambda m: f"{label}{m}")
        torch.testing.assert_close(torch.cat([r0[0], r1[0]]), logits, rtol=0, atol=logits_atol)


class RecordPerBatch(pl.Callback):
    """Save the adaptation state after every batch (and the domain rows at the end) from inside each process."""

    def __init__(self, out_dir: Path, tag: str) -> None:
        self.out_dir, self.tag, self.step = str(out_dir), tag, 0

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        adapter = pl_module.adapter  # type: ignore[attr-defined]
        state = {
            "theta": adapter.bank.theta.clone(),
            "alpha": adapter.bank.alpha.clone(),
            "count": int(adapter.bank.count),
            "events": [dict(e) for e in adapter.events],
            "logits": outputs.detach().clone(),
            "labels": args[0][1].clone(),
        }
        torch.save(state, f"{self.out_dir}/{self.tag}{trainer.global_rank}_batch{self.step}.pt")
        self.step += 1

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = pl_module.stream_results()  # type: ignore[attr-defined]
        torch.save(rows, f"{self.out_dir}/{self.tag}{trainer.global_rank}_rows.pt")


def load_recorded(path: Path) -> Any:
    """A file :class:`RecordPerBatch` saved."""
    return torch.load(path, weights_only=False)


def single_and_gloo_runs(
    out_dir: Path, make_module: Callable[[], pl.LightningModule], make_data: Callable[[], Any], batches: int
) -> tuple[Any, Any]:
    """``Trainer.test`` on one process (tag ``single``), then on two gloo ``ddp_spawn`` processes (tag ``ddp``).

    Both record every batch into ``out_dir`` (:class:`RecordPerBatch`); returns both runs' ``trainer.test`` results.
    """
    single = make_trainer([RecordPerBatch(out_dir, "single")], batches=batches)
    want = single.test(make_module(), datamodule=make_data())
    ddp = make_trainer(
        [RecordPerBatch(out_dir, "ddp")],
        batches=batches,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    got = ddp.test(make_module(), datamodule=make_data())
    return want, got


# ---------------------------------------------------------------------------------------------------- photo trees
Box = tuple[float, float, float, float]

# photo -> (ImageNet-1k wnid, a word of its lemma, region holding the object as fractions (left, top, right, bottom))
PHOTOS: dict[str, tuple[str, str, Box]] = {
    "chelsea": ("n02123045", "tabby", (0.0, 0.0, 1.0, 1.0)),
    "coffee": ("n07920052", "espresso", (0.0, 0.0, 1.0, 1.0)),
    "rocket": ("n03773504", "missile", (0.0, 0.0, 1.0, 1.0)),  # a launcher on its pad; no "rocket" class
    "camera": ("n04485082", "tripod", (0.0, 0.0, 1.0, 1.0)),  # the cameraman's camera stands on a tripod
    "stereo_motorcycle": ("n03785016", "moped", (0.0, 0.0, 1.0, 1.0)),  # no "motorcycle" class in ImageNet-1k
    "astronaut": ("n04266014", "space shuttle", (0.55, 0.0, 1.0, 0.6)),  # the shuttle model behind the astronaut
}


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as an RGB ``uint8`` array."""
    from PIL import Image
    from skimage import data

    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    return np.asarray(Image.fromarray(image).convert("RGB"))


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized to ``size`` × ``size`` (bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def photo_variants(image: np.ndarray, box: Box, count: int, size: int, seed: Any) -> list[np.ndarray]:
    """Seeded square crops (75–100 % of the region's shorter side), horizontal flips and shifts, resized to ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    left, top = round(box[0] * width), round(box[1] * height)
    right, bottom = round(box[2] * width), round(box[3] * height)
    short = min(right - left, bottom - top)
    out = []
    for k in range(count):
        side = short if k == 0 else round(short * rng.uniform(0.75, 1.0))
        x0 = left + (right - left - side) // 2 if k == 0 else int(rng.integers(left, right - side + 1))
        y0 = top + (bottom - top - side) // 2 if k == 0 else int(rng.integers(top, bottom - side + 1))
        crop = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
        if k > 0 and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS)))
    return out


def save_class_tree(
    images: Sequence[np.ndarray], names: Sequence[str], wnids: Sequence[str], folder: Path, suffix: str = ".JPEG"
) -> None:
    """Write ``folder/<wnid>/<name><suffix>`` for every image (JPEG quality 90)."""
    from PIL import Image

    for image, name, wnid in zip(images, names, wnids, strict=True):
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / wnid / f"{name}{suffix}", quality=90)


def imagenet_c_data(tree: Path, corrupted: str, **kwargs: Any) -> Any:
    """An ``ImageNetCDataModule`` on ``tree/<corrupted>`` (corruption folders), ``tree/val`` and ``tree/train``."""
    from datamodules import ImageNetCDataModule

    folders = {"root": str(tree / corrupted), "source_root": str(tree / "val"), "calib_root": str(tree / "train")}
    return ImageNetCDataModule(**{**folders, **kwargs})


# ---------------------------------------------------------------------------------------------------- results, configs
def domain_row(index: int, rnd: int, corruption: str, acc1: float, acc5: float, n: int) -> dict[str, Any]:
    """One domain's results row (50 images a batch, three forward passes a batch)."""
    return {
        "index": index,
        "domain": f"r{rnd}/{corruption}",
        "round": rnd,
        "corruption": corruption,
        "acc1": acc1,
        "acc5": acc5,
        "n": n,
        "batches": n // 50,
        "forward_passes": 3 * (n // 50),
        "skipped_batches": 0,
        "seconds": 0.5,
    }


# Unweighted mean acc1 = 55, acc5 = 81.25; weighted by n it would differ (acc1 52.5).
RESULT_ROWS = [
    domain_row(0, 1, "gaussian_noise", 50.0, 80.0, 100),
    domain_row(1, 1, "fog", 40.0, 70.0, 300),
    domain_row(2, 2, "gaussian_noise", 70.0, 90.0, 100),
    domain_row(3, 2, "fog", 60.0, 85.0, 300),
]
RUN_INFO = {"method": "zoa", "model": "test_vit", "bits": "W8A8", "seed": 7}


def quick_zoa_config(
    tmp_path: Path,
    cache_dir: Path,
    checkpoint_dir: Path | None = None,
    results_dir: Path | None = None,
    **trainer: Any,
) -> Path:
    """A quick ZOA run of ``zoa test`` (demo ViT, float, one batch per domain) into ``tmp_path/run``, as a file.

    The stream checkpoint and the results go to the run folder, or to ``checkpoint_dir`` / ``results_dir``; ``trainer``
    overrides Trainer settings.
    """
    checkpoint: Any = "callbacks.StreamCheckpoint"
    if checkpoint_dir is not None:
        checkpoint = {"class_path": "callbacks.StreamCheckpoint", "init_args": {"dirpath": str(checkpoint_dir)}}
    results: dict[str, Any] = {"plot": False, "table": False}
    if results_dir is not None:
        results = {"out_dir": str(results_dir), **results}
    config = {
        "seed_everything": 2020,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "inference_mode": False,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "limit_test_batches": 1,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "callbacks.AdaptationMonitor", "init_args": {"verbose": False}},
                checkpoint,
                {"class_path": "callbacks.ResultsCallback", "init_args": results},
            ],
            **trainer,
        },
        "model": {
            "class_path": "zoa_lightning.ZOAModule",
            "init_args": {"network": "demo_vit", "lr": 0.0005, "source_batches": 1},
        },
        "data": {
            "class_path": "datamodules.CorruptionStreamDataModule",
            "init_args": {"corruptions": STREAM_CORRUPTIONS, "cache_dir": str(cache_dir), "num_source_images": 64},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def per_sample_engine(digits: torch.Tensor, batch: int, **config: object) -> Any:
    """A per-sample ZOA engine on the tiny ViT (normalised steps, detector and pool at ``batch`` images) with source
    statistics from the first 256 digits; ``config`` overrides or adds :class:`ZOAConfig` fields."""
    from zoa_lightning.core import ZOA, ZOAConfig

    options: dict[str, object] = {"estimator": "per_sample", "normalize_step": True, "lr": 0.05, "spsa_c": 0.1,
                                  "detector_min_batch": batch, "pool_images": batch, **config}  # fmt: skip
    adapter = ZOA(make_vit(0), ZOAConfig(**options))  # type: ignore[arg-type]
    adapter.collect_source_statistics(digits[:256].split(64))
    return adapter
