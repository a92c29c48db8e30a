"""Layer selection: the paper's rules for ViT-B/16 and ResNet-50, and their generalisation."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torchvision
from torch import nn

from tests.helpers import make_vit
from zoa_lightning.core import ZOA, ModelLayout, ZOAConfig, resolve_layout


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


def test_deep_stem_detector_reads_the_first_stem_convolution() -> None:
    model = timm.create_model("test_resnet", num_classes=10)  # conv1 is conv-BN-act-conv-BN-act-conv
    assert isinstance(model.conv1, nn.Sequential)
    assert resolve_layout(model).detector == "conv1.0"
    with torch.device("meta"):
        assert resolve_layout(timm.create_model("resnet50d")).detector == "conv1.0"


# ------------------------------------------------------------------ the prediction ZOA makes is the network's own
_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


@pytest.mark.parametrize(
    "options", [{}, {"reg_tokens": 2}, {"fc_norm": True}, {"no_embed_class": True}, {"class_token": True}]
)
def test_for_every_accepted_vit_family_zoa_predicts_what_the_network_does(options: dict) -> None:
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(**_VIT, **options).eval()
    adapter = ZOA(net, ZOAConfig())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, record = adapter.taps.run(x, "predict")
        torch.testing.assert_close(adapter.taps.head(record.final()), logits)  # what the shifted prediction reads
        torch.testing.assert_close(logits, net(x))  # nothing adapted yet: the network's own forward


def test_a_distilled_vit_is_refused_by_zoa_and_foa() -> None:
    from timm.models.deit import VisionTransformerDistilled

    from zoa_lightning.core.methods import FOA

    net = VisionTransformerDistilled(**_VIT).eval()
    with pytest.raises(ValueError, match=r"distilled ViT: it predicts the mean of two heads, `head` .*`head_dist`"):
        ZOA(net, ZOAConfig())
    with pytest.raises(ValueError, match=r"FOA's activation shift and loss read the class token's head alone"):
        FOA(net, popsize=2)


def test_a_network_whose_output_is_not_its_head_alone_is_refused() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_vit(0)
            self.extra = nn.Linear(3 * 32 * 32, 10)
            self.zoa_layout = resolve_layout(self.inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + self.extra(x.flatten(1))

    net = TwoHeads()
    net.zoa_layout = dataclasses.replace(
        net.zoa_layout,
        norms=tuple(f"inner.{n}" for n in net.zoa_layout.norms),
        detector=f"inner.{net.zoa_layout.detector}",
        taps=tuple(f"inner.{n}" for n in net.zoa_layout.taps),
        head=f"inner.{net.zoa_layout.head}",
    )
    with pytest.raises(TypeError, match=r"is not its head 'inner.head' applied to the head's input"):
        ZOA(net, ZOAConfig(), input_size=(3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float64])
def test_a_batch_of_another_dtype_is_refused_before_anything_changes(dtype: torch.dtype) -> None:
    adapter = ZOA(make_vit(0), ZOAConfig(detector_min_batch=4))
    adapter.collect_source_statistics([torch.randn(8, 3, 32, 32)])
    before = {k: v.clone() for k, v in adapter.adaptation_state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=rf"the network takes torch.float32 images, got a {dtype} batch"):
        adapter(torch.zeros(4, 3, 32, 32, dtype=dtype))
    after = adapter.adaptation_state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
