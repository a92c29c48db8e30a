"""NetworkTaps: one ordinary forward records the loss taps and the head input and hands over the detector tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import images, make_vit
from zoa_lightning.core.layout import ModelLayout, resolve_layout
from zoa_lightning.core.taps import NetworkTaps, PassRecord, PassResult


def _cnn() -> tuple[nn.Module, ModelLayout]:
    """A tiny CNN: stem conv+BN, two stages (conv+BN), pooled into a linear head."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("bn1", nn.BatchNorm2d(4))
    net.add_module("layer1", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    net.add_module("layer2", nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6, 5))
    layout = ModelLayout(kind="cnn", norms=("layer1.1",), detector="conv1", taps=("layer1", "layer2"), head="fc")
    return net.eval(), layout


def _capture(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's output, from hooks of the test's own."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_a_vit_pass_records_the_class_token_of_every_tap_and_the_head_input() -> None:
    net = make_vit(0)
    layout = resolve_layout(net)
    detector_calls: list[tuple[torch.Tensor, str]] = []
    taps = NetworkTaps(net, layout, lambda out, record: detector_calls.append((out, record.mode)))
    x = images(4)
    with torch.no_grad():
        logits, record = taps.run(x, "source")
    outputs = _capture(net, [*layout.taps, layout.detector], x)
    assert len(record.taps) == len(layout.taps) >= 1
    for got, name in zip(record.taps, layout.taps, strict=True):
        torch.testing.assert_close(got, outputs[name][:, 0])  # the CLS token of the tap's output
    head_input = record.final()
    torch.testing.assert_close(logits, net.get_submodule(layout.head)(head_input))
    torch.testing.assert_close(logits, net(x))  # an ordinary forward of the network
    torch.testing.assert_close(record.features(), torch.cat([*record.taps, head_input], 1))
    assert [mode for _, mode in detector_calls] == ["source"]
    torch.testing.assert_close(detector_calls[0][0], outputs[layout.detector])
    torch.testing.assert_close(taps.head(head_input), logits)


def test_a_cnn_pass_records_spatially_averaged_taps() -> None:
    net, layout = _cnn()
    taps = NetworkTaps(net, layout, lambda out, record: None)
    x = images(3)
    with torch.no_grad():
        _, record = taps.run(x, "adapt", pass_index=1)
    outputs = _capture(net, ["layer1", "layer2", "flat"], x)
    torch.testing.assert_close(record.taps[0], outputs["layer1"].mean((2, 3)))
    torch.testing.assert_close(record.taps[1], outputs["layer2"].mean((2, 3)))
    torch.testing.assert_close(record.final(), outputs["flat"])
    assert (record.mode, record.pass_index) == ("adapt", 1)


def test_the_detector_callback_runs_in_recorded_passes_but_not_in_probes_predictions_or_plain_forwards() -> None:
    net, layout = _cnn()
    modes: list[str] = []
    taps = NetworkTaps(net, layout, lambda out, record: modes.append(record.mode))
    x = images(2)
    with torch.no_grad():
        _, probe = taps.run(x, "probe")
        _, predict = taps.run(x, "predict")
        taps.run(x, "adapt")
        taps.run(x, "source")
        net(x)  # not through run(): the hooks pass it untouched
    assert modes == ["adapt", "source"]
    assert probe.detector_channels == 4  # the probe sizes the detector: channels of conv1's output
    assert predict.detector_channels == 0
    assert len(predict.taps) == 2  # predictions still record their features


def test_a_pass_that_does_not_reach_the_head_says_so() -> None:
    with pytest.raises(RuntimeError, match="the pass did not reach the classifier head"):
        PassRecord("predict").final()


def test_first_taps_are_the_first_loss_taps_computed_after_each_module() -> None:
    net, layout = _cnn()
    taps = NetworkTaps(net, layout, lambda out, record: None)
    # bn1 runs before both taps; layer1.1 finishes inside the tap layer1 (counts as after it); layer2.0 feeds layer2;
    # pool runs after every tap: the head (index 2, also the logits) stands for it.
    found = taps.first_taps(images(2), ["bn1", "layer1.1", "layer2.0", "layer2", "pool"])
    assert found == [0, 0, 1, 1, 2]
    handles = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    assert handles == 4  # only the taps' own hooks (detector, 2 taps, head) are left


def test_a_pass_result_counts_the_batchs_own_images() -> None:
    record = PassRecord("adapt")
    pooled = torch.tensor([0.0, 0.0, 0.0, 40.0], dtype=torch.float64)
    own = torch.tensor([0.0, 0.0, 0.0, 8.0], dtype=torch.float64)
    common = {"logits": torch.zeros(1), "record": record, "loss": torch.zeros(()), "final_mean": torch.zeros(1)}
    assert PassResult(stats=pooled, own=own, **common).images == 8
    assert PassResult(stats=own, **common).images == 8
