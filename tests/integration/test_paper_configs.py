"""The paper configs run end to end: ``configs/{vit_b16_w8a8,vit_b16_w6a6,resnet50_w8a8}.yaml`` through the ``zoa`` CLI.

Each config runs unchanged in what it is about (method, hyperparameters, quantizer, bit widths, normalisation, the
real ``vit_base_patch16_224`` / torchvision ``resnet50`` at 224 pixels and 1,000 classes, the callbacks) on a tiny
ImageNet-C-shaped tree of real photos (scikit-image), with randomly initialised weights saved as the local checkpoint
file each config expects. Only sizes shrink (and ResNet-50's MQBench observers are min/max instead of MSE); comments
at each override say why it is there. Measured on the 2-core development machine while other jobs shared it (load
average 3 to 7): ViT-B/16 W8A8 32 to 160 s, W6A6 108 to 136 s, ResNet-50 W8A8 23 to 40 s, fixtures 4 to 8 s; the
whole file 171 to 318 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cli import make_cli, resolved_config
from datamodules import corrupt_images
from tests.helpers import PHOTOS, photo, photo_variants, save_class_tree
from zoa_lightning.core.quant import vit_quant_modules

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CORRUPTIONS = ["gaussian_noise", "fog"]
TREE_PHOTOS = ["chelsea", "coffee", "rocket", "camera"]  # one image each, four ImageNet-1k wnids
BATCH = 2
BATCHES_PER_DOMAIN = 1
CONFIGS = {  # config -> (precision, checkpoint file name, a tensor the checkpoint sets and quantization keeps)
    "vit_b16_w8a8.yaml": ("W8A8", "vit_base_patch16_224.safetensors", "cls_token"),
    "vit_b16_w6a6.yaml": ("W6A6", "vit_base_patch16_224.safetensors", "cls_token"),
    "resnet50_w8a8.yaml": ("W8A8", "resnet50.pth", "layer4.2.conv3.weight"),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``imagenet-c/<corruption>/5/<wnid>/*.JPEG`` (224 px) and clean ``val``/``train`` folders (256 px)."""
    base = tmp_path_factory.mktemp("paper_tree")
    wnids = [PHOTOS[name][0] for name in TREE_PHOTOS]
    for split, size in (("imagenet-c", 224), ("val", 256), ("train", 256)):
        images = np.stack([photo_variants(photo(n), PHOTOS[n][2], 1, size, seed=0)[0] for n in TREE_PHOTOS])
        if split == "imagenet-c":
            for corruption in CORRUPTIONS:
                save_class_tree(
                    corrupt_images(images, corruption, severity=5, seed=0),
                    TREE_PHOTOS,
                    wnids,
                    base / split / corruption / "5",
                )
        else:
            save_class_tree(images, TREE_PHOTOS, wnids, base / split)
    return base


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Randomly initialised 1,000-class weights in each config's format: timm safetensors, torchvision state dict."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("paper_weights")
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224").state_dict()
    save_file(vit, str(folder / "vit_base_patch16_224.safetensors"))
    resnet = torchvision.models.resnet50().state_dict()
    torch.save(resnet, folder / "resnet50.pth")
    return {
        "vit_base_patch16_224.safetensors": (folder / "vit_base_patch16_224.safetensors", vit),
        "resnet50.pth": (folder / "resnet50.pth", resnet),
    }


def _overrides(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config's own callbacks with the calibration shrunk, plus the run-size overrides, as a config file.

    ``config`` is the config as ``zoa test`` composes it from its parts (:func:`cli.resolved_config`).
    """
    callbacks = config["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"] == "callbacks.QuantizationCallback":
            callback["init_args"].update(
                calib_images=1,  # 32 in the paper: PTQ4ViT records and scores every layer on each image
                # PTQ4ViT: one alternating round over 4 interval candidates instead of 3 over 100; the search runs per
                # layer (74 in ViT-B) and dominates the CPU time of a run
                search_rounds=1,
                num_candidates=4,
                cache_dir=str(run_dir / "quant-cache"),  # never write into the user's calibration cache
            )
            if callback["init_args"].get("method") == "mqbench":
                # MQBench's MSE observers try 80 (weights, per channel) and 95 (activations) clipping ranges: about 230
                # CPU seconds for ResNet-50 on two images; min/max observers give the same quantized graph in seconds
                callback["init_args"]["observer"] = "minmax"
    return {
        "trainer": {
            "callbacks": callbacks,
            "limit_test_batches": BATCHES_PER_DOMAIN,  # 782 batches of 64 per domain in the paper
            "default_root_dir": str(run_dir),  # results, config and stream checkpoint go to the test's folder
        }
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paper_config_runs_end_to_end(
    name: str,
    tree: Path,
    checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]],
    tmp_path: Path,
) -> None:
    precision, weights_name, kept = CONFIGS[name]
    weights, state = checkpoints[weights_name]
    config_path = ROOT / "configs" / name
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump(_overrides(resolved_config(["-c", str(config_path)]), tmp_path)))
    args = [
        "-c",
        str(config_path),
        "-c",
        str(override),
        "--data.init_args.root",
        str(tree / "imagenet-c"),
        "--data.init_args.source_root",
        str(tree / "val"),
        "--data.init_args.calib_root",
        str(tree / "train"),
        "--data.init_args.corruptions",
        json.dumps(CORRUPTIONS),  # 15 in the paper
        "--data.init_args.rounds",
        "1",  # 10 in the paper
        "--data.init_args.batch_size",
        str(BATCH),  # 64 in the paper
        "--data.init_args.num_source_images",
        "2",  # 50,000 clean validation images in the paper (ResNet: its first 25 batches)
        "--data.init_args.num_workers",
        "0",  # 8 in the configs; worker processes only cost start-up time for four images
        "--model.init_args.weights",
        str(weights),
        "--model.init_args.detector_min_batch",
        str(BATCH),  # 64: the shift detector skips smaller batches, so with 2 images it and the bank would never run
    ]
    cli = make_cli(args, run=False)
    assert cli.datamodule.num_classes == 1000  # ImageNet wnids: the canonical 1,000-class label space, linked
    assert cli.model.num_classes == 1000
    cli.trainer.test(cli.model, datamodule=cli.datamodule)

    module = cli.model
    rows = module.stream_results()
    assert [row["domain"] for row in rows] == [f"r1/{c}" for c in CORRUPTIONS]
    for row in rows:
        assert row["n"] == BATCH * BATCHES_PER_DOMAIN
        assert row["batches"] == BATCHES_PER_DOMAIN
        assert row["forward_passes"] == 2 * row["batches"]  # ZOA: two forward passes per batch
        assert 0.0 <= row["acc1"] <= row["acc5"] <= 100.0
    info = module.run_info()
    assert info["bits"] == precision
    assert module.adapter.skipped_batches == 0  # every update was finite and kept
    network = module.adapter.model
    if name.startswith("vit"):
        assert len(vit_quant_modules(network)) == 12 * 6 + 2  # per block 4 linears, 2 matmuls; patch embedding, head
    else:
        assert any("fake_quant" in n for n, _ in network.named_modules())  # the MQBench graph
    torch.testing.assert_close(network.get_parameter(kept).cpu(), state[kept], rtol=0, atol=0)  # the file was loaded

    out = tmp_path / "zoa"
    summary = json.loads((out / "results.json").read_text())
    assert [row["domain"] for row in summary["domains"]] == [f"r1/{c}" for c in CORRUPTIONS]
    assert summary["summary"]["forward_passes_per_batch"] == pytest.approx(2.0)
    assert (out / "results.csv").is_file()
    assert (out / "accuracy.png").is_file()
