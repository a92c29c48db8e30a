"""End-to-end behaviour of the pure-torch ZOA adapter on tiny timm models."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from tests.helpers import MODEL_FACTORIES, corrupt_noise, make_vit
from zoa_lightning.core import ZOA, AdaptationDiverged, ZOAConfig

B = 64


def _stem(adapter: ZOA) -> torch.nn.Module:
    return adapter.model.get_submodule(adapter.layout.detector)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _adapter(kind: str, digits: torch.Tensor, **config: object) -> ZOA:
    cfg = {"lr": 0.005, "spsa_c": 0.05, "domain_t": 0.1, **config}
    adapter = ZOA(MODEL_FACTORIES[kind](0), ZOAConfig(**cfg))  # type: ignore[arg-type]
    adapter.collect_source_statistics(digits[:512].split(B))
    return adapter


def _stream(digits: torch.Tensor, clean: int = 4, shifted: int = 4) -> list[torch.Tensor]:
    pool = digits[512:]
    batches = [pool[(i * B) % 448 :][:B] for i in range(clean)]
    return batches + [corrupt_noise(pool[(i * B) % 448 :][:B], seed=i) for i in range(shifted)]


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_adapts_on_a_changing_stream_with_two_passes_per_batch(kind: str, digits: torch.Tensor) -> None:
    adapter = _adapter(kind, digits)
    calls = _count_calls(_stem(adapter))
    theta0 = adapter.bank.theta.clone()
    stores_at: list[int] = []
    for i, batch in enumerate(_stream(digits)):
        before, stores = calls[0], adapter.counter("stores")
        logits = adapter(batch)
        assert calls[0] - before == 2
        assert logits.shape == (B, 10)
        assert not logits.requires_grad
        if adapter.counter("stores") > stores:
            stores_at.append(i)
    assert not torch.equal(adapter.bank.theta, theta0)
    assert stores_at[:1] == [4], f"expected the first store at the change (batch 4), got {stores_at}"
    assert adapter.bank.num_entries >= 2
    assert not any(p.requires_grad for p in adapter.parameters())
    assert adapter.counter("forward_passes") == 16


@pytest.mark.parametrize(("steps", "sp_avg"), [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_forward_count_follows_the_spec_formula(steps: int, sp_avg: int, digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits, steps=steps, sp_avg=sp_avg)
    calls = _count_calls(_stem(adapter))
    adapter(digits[:B])
    assert calls[0] == 1 + sp_avg + (steps - 1) * (sp_avg + 1)


def test_no_autograd_graph_even_with_grad_enabled(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    with torch.enable_grad():
        out = adapter(digits[:B])
    assert out.grad_fn is None
    assert not out.requires_grad
    assert all(not t.requires_grad for t in adapter.state_dict().values() if isinstance(t, torch.Tensor))


def test_prediction_pass_uses_pre_update_parameters_and_the_activation_shift(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    first = digits[:B]
    expected = copy.deepcopy(adapter).predict(first)  # no shift before the first batch
    torch.testing.assert_close(adapter(first), expected)
    assert adapter.shift.ready
    second = digits[B : 2 * B]
    # Pass A of the second batch: head(final + (mu_src_final - h)) with the parameters of after batch 1.
    clone = copy.deepcopy(adapter)
    captured: dict[str, torch.Tensor] = {}
    handle = clone.model.head.register_forward_pre_hook(lambda _, a: captured.update(x=a[0]))
    clone.model(second)
    handle.remove()
    shift = adapter.source.mean[-adapter.final_dim :] - adapter.shift.mean
    torch.testing.assert_close(adapter(second), clone.model.head(captured["x"] + shift))


def test_loss_on_shifted_changes_only_the_loss(digits: torch.Tensor) -> None:
    """The extension scores the shifted model: same predictions and shift EMA, a loss on head(final + shift)."""
    plain, shifted = _adapter("vit", digits), _adapter("vit", digits, loss_on_shifted=True)
    batches = [digits[:B], corrupt_noise(digits[B : 2 * B]), corrupt_noise(digits[2 * B : 3 * B], seed=1)]
    # Batch 1 has no shift yet: the two adapters take the same step.
    torch.testing.assert_close(shifted(batches[0]), plain(batches[0]), rtol=0, atol=0)
    assert torch.equal(shifted.bank.theta, plain.bank.theta)
    # Batch 2 predicts with the same parameters and shift, then the losses (and steps) differ.
    torch.testing.assert_close(shifted(batches[1]), plain(batches[1]))
    assert not torch.equal(shifted.bank.theta, plain.bank.theta)
    torch.testing.assert_close(shifted.shift.mean, plain.shift.mean)  # the EMA still tracks the unshifted feature
    assert shifted.counter("forward_passes") == plain.counter("forward_passes") == 4
    # The loss of a pass is the spec's loss with the final feature shifted and the entropy of the shifted logits.
    shift = shifted.shift_vector()
    assert shift is not None
    from zoa_lightning.core.loss import loss_statistics

    result = shifted.fitness(batches[2], shift)
    reference = copy.deepcopy(shifted)
    reference.config = dataclasses.replace(reference.config, loss_on_shifted=False)
    raw = reference.fitness(batches[2], shift)
    torch.testing.assert_close(result.record.head_input, raw.record.head_input + shift)
    torch.testing.assert_close(result.logits, reference.taps.head(raw.record.head_input + shift))
    stats = loss_statistics(result.record.features(), result.logits)
    expected, _ = reference.loss(stats, reference.source.mean, reference.source.std)
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(result.final_mean, raw.final_mean)  # the mean of the unshifted feature


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_state_dict_round_trip_continues_bit_identically(kind: str, digits: torch.Tensor) -> None:
    stream = _stream(digits, 3, 4)
    adapter = _adapter(kind, digits)
    for batch in stream[:4]:
        adapter(batch)
    saved = copy.deepcopy(adapter.state_dict())
    expected = [adapter(batch) for batch in stream[4:]]

    restored = ZOA(MODEL_FACTORIES[kind](0), ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1))
    restored.load_state_dict(saved)
    for batch, want in zip(stream[4:], expected, strict=True):
        assert torch.equal(restored(batch), want)
    assert torch.equal(restored.bank.theta, adapter.bank.theta)
    assert restored.bank.num_entries == adapter.bank.num_entries


def test_adaptation_state_dict_is_small_and_restores(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    adapter(digits[600 : 600 + B])
    state = copy.deepcopy(adapter.adaptation_state_dict())
    assert not any(k.startswith("model.") for k in state)
    want = adapter(digits[700 : 700 + B])
    other = _adapter("vit", digits)
    other.load_adaptation_state_dict(state)
    assert torch.equal(other(digits[700 : 700 + B]), want)


def test_runs_under_inference_mode_and_continues_outside(digits: torch.Tensor) -> None:
    adapter = ZOA(make_vit(0), ZOAConfig(lr=0.005, spsa_c=0.05))
    with torch.inference_mode():
        adapter.collect_source_statistics(digits[:256].split(B))
        for batch in _stream(digits, 2, 3):
            adapter(batch)
    assert adapter.counter("stores") >= 1
    with torch.no_grad():
        adapter(digits[:B])
    state = copy.deepcopy(adapter.state_dict())
    adapter.load_state_dict(state)
    adapter(digits[:B])


def test_non_finite_input_is_rejected_before_any_change(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    adapter(digits[:B])
    before = copy.deepcopy(adapter.state_dict())
    bad = digits[B : 2 * B].clone()
    bad[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        adapter(bad)
    after = adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_non_finite_perturbed_loss_rolls_back_and_is_counted(kind: str, digits: torch.Tensor) -> None:
    adapter = _adapter(kind, digits, spsa_c=1e38)
    before = copy.deepcopy(adapter.state_dict())
    gen_state = adapter.generator.get_state()
    with pytest.warns(RuntimeWarning, match="rolled back"):
        logits = adapter(digits[600 : 600 + B])
    assert torch.isfinite(logits).all()
    assert adapter.skipped_batches == 1
    after = adapter.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor) and not key.startswith("counters."):
            assert torch.equal(value, after[key]), key
    assert torch.equal(adapter.generator.get_state(), gen_state)


def test_rollback_restores_a_store_made_in_the_same_batch(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    stream = _stream(digits)
    for batch in stream[:4]:
        adapter(batch)
    deltas, count = adapter.bank.deltas.clone(), adapter.bank.num_entries
    adapter.config = type(adapter.config)(**{**adapter.config.__dict__, "spsa_c": 1e38})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        adapter(stream[4])  # the change: pass A stores, pass B blows up
    assert adapter.bank.num_entries == count
    assert torch.equal(adapter.bank.deltas, deltas)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((B, 1, 32, 32), "3-channel"),
        ((B, 3, 28, 28), "multiple of 8"),
        ((3, 32, 32), "B, 3, H, W"),
        ((0, 3, 32, 32), "empty batch"),
    ],
)
def test_wrong_input_shape_names_the_expected_one(shape: tuple[int, ...], message: str, digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    with pytest.raises(ValueError, match=message):
        adapter(torch.zeros(shape))


def test_requires_source_statistics() -> None:
    adapter = ZOA(make_vit(0))
    with pytest.raises(RuntimeError, match="collect_source_statistics"):
        adapter(torch.zeros(4, 3, 32, 32))


def test_stationary_stream_never_fires_the_detector(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    for i in range(7):
        adapter(digits[512 + (i * B) % 448 :][:B])
    assert adapter.counter("stores") == 0
    assert not adapter.events


def test_small_batches_neither_test_nor_update_the_detector(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    adapter(digits[:B])
    det = adapter.detector.mean.clone()
    adapter(corrupt_noise(digits[:16]))
    assert torch.equal(adapter.detector.mean, det)
    assert adapter.counter("stores") == 0


def test_reference_mode_updates_the_detector_twice_per_batch(digits: torch.Tensor) -> None:
    ref = _adapter("vit", digits, mode="reference")
    cor = _adapter("vit", digits, mode="corrected")
    a, b = digits[512 : 512 + B], digits[600 : 600 + B]
    for adapter in (ref, cor):
        adapter(a)
        adapter(b)
    # After batch 1 both hold batch a's statistics; batch b moves them by 0.36 (two EMA steps) versus 0.2.
    probe = ZOA(make_vit(0), ZOAConfig(detector_passes=1))
    probe.collect_source_statistics(digits[:512].split(B))
    probe(a)
    stats_a = probe.detector.mean.clone()
    probe(b)
    stats_b = (probe.detector.mean - 0.8 * stats_a) / 0.2
    torch.testing.assert_close(cor.detector.mean, 0.8 * stats_a + 0.2 * stats_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.detector.mean, 0.64 * stats_a + 0.36 * stats_b, atol=1e-5, rtol=1e-5)


def test_resnet_reference_mode_seeds_the_detector_from_source_and_stores_a_zero_snapshot(
    digits: torch.Tensor,
) -> None:
    ref = _adapter("resnet", digits, mode="reference", domain_t=0.05)
    cor = _adapter("resnet", digits, mode="corrected", domain_t=0.05)
    assert ref.detector.ready
    assert not cor.detector.ready
    first = corrupt_noise(digits[600 : 600 + B])
    ref(first)
    cor(first)
    assert ref.counter("stores") == 1
    assert cor.counter("stores") == 0
    assert torch.count_nonzero(ref.bank.deltas[1]) == 0  # epsilon was still zero: an all-zero snapshot
    torch.testing.assert_close(ref.bank.mixing_weights(), torch.tensor([0.5, 0.5]))


def test_resnet_shift_vector_scalar_in_reference_and_vector_in_corrected(digits: torch.Tensor) -> None:
    for mode, scalar in (("reference", True), ("corrected", False)):
        adapter = _adapter("resnet", digits, mode=mode)
        adapter(digits[600 : 600 + B])
        shift = adapter.shift_vector()
        assert shift is not None
        final_src = adapter.source.mean[-adapter.final_dim :]
        expected = (final_src[-1] if scalar else final_src) - adapter.shift.mean
        torch.testing.assert_close(shift, expected)


def test_no_shift_and_no_bank_ablations(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits, use_shift=False, use_bank=False)
    for batch in _stream(digits):
        adapter(batch)
    assert adapter.shift_vector() is None
    assert adapter.bank.num_entries == 1
    assert adapter.counter("stores") == 0
    assert [e["event"] for e in adapter.events] == ["shift"]


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_vit_detector_statistics_are_those_of_the_patch_tokens(digits: torch.Tensor, mode: str) -> None:
    # Regression: the count used to include the class token, so the mean came out 16/17 of the patch-token mean here.
    adapter = _adapter("vit", digits, mode=mode, detector_passes=1)
    tokens: list[torch.Tensor] = []
    handle = _stem(adapter).register_forward_hook(lambda _m, _a, out: tokens.append(out.detach().clone()))
    batch = digits[512 : 512 + B]
    adapter(batch)
    handle.remove()
    patches = tokens[0][:, adapter.layout.num_prefix_tokens :].double()
    var, mean = torch.var_mean(patches, dim=(0, 1), correction=1)
    torch.testing.assert_close(adapter.detector.mean.double(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter.detector.var.double(), var, atol=1e-6, rtol=1e-5)
    # The divergence of the same statistics against themselves is zero; against the class-token-diluted ones it is not.
    assert adapter.detector.divergence(mean.float(), var.float()) == pytest.approx(0.0, abs=1e-5)


def test_runaway_learning_rate_is_rolled_back_then_stops_the_run(digits: torch.Tensor) -> None:
    # Regression: at lr 1000 the first update was kept (epsilons ~1e23), every later batch was rolled back, the
    # predictions were NaN and nothing said so.
    adapter = _adapter("vit", digits, lr=1000.0, max_consecutive_skips=3)
    theta0 = adapter.bank.theta.clone()
    batches = [digits[512 + 64 * i : 576 + 64 * i] for i in range(3)]
    for batch in batches[:2]:
        with pytest.warns(RuntimeWarning, match="max_abs_epsilon"):
            logits = adapter(batch)
        assert torch.isfinite(logits).all()
    assert torch.equal(adapter.bank.theta, theta0)
    assert adapter.skipped_batches == 2
    assert adapter.counter("forward_passes") == 4  # the passes of rolled-back batches still count
    with pytest.warns(RuntimeWarning), pytest.raises(AdaptationDiverged, match=r"3 batches in a row.*lr=1000"):
        adapter(batches[2])


def test_a_successful_batch_resets_the_consecutive_skip_count(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits, max_consecutive_skips=2)
    good = dataclasses.replace(adapter.config)
    for i in range(3):
        adapter.config = dataclasses.replace(good, spsa_c=1e38)
        with pytest.warns(RuntimeWarning, match="rolled back"):
            adapter(digits[512 + 64 * i : 576 + 64 * i])
        adapter.config = good
        adapter(digits[512 + 64 * i : 576 + 64 * i])
        assert adapter.counter("consecutive_skips") == 0
    assert adapter.skipped_batches == 3


def test_non_finite_pass_a_prediction_falls_back_to_the_unadapted_network(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    reference = ZOA(make_vit(0), ZOAConfig())
    expected = reference.model(digits[600 : 600 + B])
    adapter.bank.theta[0] = float("inf")  # a corrupted state: every prediction of the adapted network is NaN
    with pytest.warns(RuntimeWarning, match="rolled back"):
        logits = adapter(digits[600 : 600 + B])
    torch.testing.assert_close(logits, expected)
    assert adapter.counter("forward_passes") == 2  # pass A, then the unadapted network


def test_a_short_last_batch_after_full_ones_does_not_warn(digits: torch.Tensor) -> None:
    adapter = _adapter("vit", digits)
    adapter(digits[512 : 512 + B])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter(digits[600:616])


def test_deep_stem_resnet_detects_a_strong_shift(digits: torch.Tensor) -> None:
    # Regression: the detector read the deep stem's normalised output, whose divergence stayed ~1e-4 across a shift.
    import timm

    from tests.helpers import randomize_norms

    torch.manual_seed(0)
    net = randomize_norms(timm.create_model("test_resnet", num_classes=10)).eval()
    adapter = ZOA(net, ZOAConfig(lr=0.005, spsa_c=0.05, domain_t=0.1, mode="corrected"))
    adapter.collect_source_statistics(digits[:512].split(B))
    for batch in _stream(digits, clean=3, shifted=2):
        adapter(batch)
    assert adapter.counter("stores") >= 1
