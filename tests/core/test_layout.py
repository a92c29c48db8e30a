"""Layer selection: the paper's rules for ViT-B/16 and ResNet-50, and their generalisation."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from zoa_lightning.core import ModelLayout, ZOAConfig, resolve_layout


def _width(model: nn.Module, layout: ModelLayout) -> int:
    return sum(2 * model.get_submodule(n).weight.numel() for n in layout.norms)


def test_vit_b16_adapts_blocks_1_to_8() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    layout = resolve_layout(model)
    assert layout.norms == tuple(f"blocks.{i}.norm{j}" for i in range(1, 9) for j in (1, 2))
    assert _width(model, layout) == 24_576
    assert len(layout.taps) + 1 == 12
    assert layout.detector == "norm_pre"
    assert layout.head == "head"


def test_resnet50_adapts_the_papers_24_batchnorms() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    layout = resolve_layout(model)
    expected = [f"layer1.{b}.bn{j}" for b in (1, 2) for j in (1, 2)]
    expected += [f"layer2.{b}.bn{j}" for b in range(4) for j in (1, 2)]
    expected += [f"layer3.{b}.bn{j}" for b in range(6) for j in (1, 2)]
    assert list(layout.norms) == expected
    assert _width(model, layout) == 8_704
    assert layout.taps == ("layer1", "layer2", "layer3")
    assert layout.detector == "conv1"
    assert len(layout.batch_norms) == 53


@pytest.mark.parametrize(("depth", "blocks"), [(1, [0]), (2, [1]), (6, [1, 2, 3, 4]), (24, list(range(1, 18)))])
def test_vit_rule_generalises_to_other_depths(depth: int, blocks: list[int]) -> None:
    with torch.device("meta"):
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2
        )
    assert resolve_layout(model).norms == tuple(f"blocks.{i}.norm{j}" for i in blocks for j in (1, 2))


def test_basic_block_resnet_keeps_the_last_bn_of_each_block_frozen() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    norms = resolve_layout(model).norms
    assert norms == ("layer1.1.bn1", "layer2.0.bn1", "layer2.1.bn1", "layer3.0.bn1", "layer3.1.bn1")


def test_vit_without_class_token_is_rejected() -> None:
    with torch.device("meta"):
        model = timm.create_model("test_vit", global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        resolve_layout(model)


def test_unknown_architecture_says_how_to_provide_a_layout() -> None:
    with pytest.raises(TypeError, match="zoa_layout"):
        resolve_layout(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_explicit_layout_attribute_is_used_and_checked() -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    model.zoa_layout = ModelLayout(kind="cnn", norms=("bn",), detector="conv", taps=(), head="fc")
    assert resolve_layout(model).norms == ("bn",)
    model.zoa_layout = ModelLayout(kind="cnn", norms=("nope",), detector="conv", taps=(), head="fc")
    with pytest.raises(ValueError, match="'nope'"):
        resolve_layout(model)


def test_config_resolves_reference_and_corrected_switches() -> None:
    ref_cnn = ZOAConfig().resolved("cnn")
    assert (ref_cnn.resnet_shift, ref_cnn.compact_similarity, ref_cnn.detector_passes) == ("scalar", False, 2)
    assert ref_cnn.seed_detector_from_source
    assert not ZOAConfig().resolved("vit").seed_detector_from_source
    cor = ZOAConfig(mode="corrected").resolved("cnn")
    assert (cor.resnet_shift, cor.compact_similarity, cor.detector_passes) == ("vector", True, 1)
    assert not cor.seed_detector_from_source
    assert ZOAConfig(mode="corrected", detector_passes=2).resolved("vit").detector_passes == 2
    with pytest.raises(ValueError, match="spsa_c"):
        ZOAConfig(spsa_c=0)


def test_deep_stem_detector_reads_the_first_stem_convolution() -> None:
    model = timm.create_model("test_resnet", num_classes=10)  # conv1 is conv-BN-act-conv-BN-act-conv
    assert isinstance(model.conv1, nn.Sequential)
    assert resolve_layout(model).detector == "conv1.0"
    with torch.device("meta"):
        assert resolve_layout(timm.create_model("resnet50d")).detector == "conv1.0"
