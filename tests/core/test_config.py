"""ZOAConfig: every refused value names itself, and ``resolved`` fills the quirk switches from ``mode``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from zoa_lightning.core import ZOAConfig

REFUSED: list[tuple[str, Any, str]] = [
    ("lr", -0.1, "lr must be >= 0, got -0.1"),
    ("lr_alpha", -1.0, "lr_alpha must be >= 0, got -1.0"),
    ("spsa_c", 0.0, "spsa_c must be > 0, got 0.0"),
    ("spsa_c_alpha", -0.5, "spsa_c_alpha must be > 0, got -0.5"),
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("momentum", -0.1, "momentum must be in [0, 1), got -0.1"),
    ("weight_decay", -0.4, "weight_decay must be >= 0, got -0.4"),
    ("weight_decay_alpha", -0.1, "weight_decay_alpha must be >= 0, got -0.1"),
    ("sp_avg", 0, "sp_avg must be >= 1, got 0"),
    ("steps", -1, "steps must be >= 0, got -1"),
    ("max_weight_nums", 0, "max_weight_nums must be >= 1, got 0"),
    ("alpha_scale", 0.0, "alpha_scale must be > 0, got 0.0"),
    ("weight_margin", 0.0, "weight_margin must be > 0, got 0.0"),
    ("domain_t", -0.1, "domain_t must be >= 0, got -0.1"),
    ("lambda_bp", -30.0, "lambda_bp must be >= 0, got -30.0"),
    ("detector_min_batch", 1, "detector_min_batch must be >= 2, got 1"),
    ("detector_momentum", 1.0, "detector_momentum must be in [0, 1), got 1.0"),
    ("shift_momentum", -0.9, "shift_momentum must be in [0, 1), got -0.9"),
    ("mode", "paper", "mode must be 'reference' or 'corrected', got 'paper'"),
    ("resnet_shift", "both", "resnet_shift must be 'scalar' or 'vector', got 'both'"),
    ("detector_passes", 3, "detector_passes must be 1 or 2, got 3"),
    ("max_abs_epsilon", 0.0, "max_abs_epsilon must be > 0 or None, got 0.0"),
    ("max_consecutive_skips", 0, "max_consecutive_skips must be >= 1 or None, got 0"),
    ("estimator", "cma", "estimator must be 'spsa', 'per_sample' or 'first_order', got 'cma'"),
    ("perturbation", "gaussian", "perturbation must be 'segmented_uniform' or 'rademacher', got 'gaussian'"),
    ("normalize_floor", 0.0, "normalize_floor must be > 0, got 0.0"),
    ("normalize_momentum", 1.0, "normalize_momentum must be in [0, 1), got 1.0"),
    ("pool_images", 1, "pool_images must be >= 2, got 1"),
    ("bn_prior", -1.0, "bn_prior must be >= 0, got -1.0"),
]


@pytest.mark.parametrize(("field", "value", "message"), REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_a_refused_value_names_the_field_the_rule_and_the_value(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ZOAConfig(**{field: value})


def test_every_checked_field_has_a_refused_case() -> None:
    checked = {"lr", "lr_alpha", "spsa_c", "spsa_c_alpha", "momentum", "weight_decay", "weight_decay_alpha", "sp_avg",
               "steps", "max_weight_nums", "alpha_scale", "weight_margin", "domain_t", "lambda_bp",
               "detector_min_batch", "detector_momentum", "shift_momentum", "mode", "resnet_shift", "detector_passes",
               "max_abs_epsilon", "max_consecutive_skips", "estimator", "perturbation", "normalize_floor",
               "normalize_momentum", "pool_images", "bn_prior"}  # fmt: skip
    assert {field for field, _, _ in REFUSED} == checked
    assert checked <= {f.name for f in dataclasses.fields(ZOAConfig)}


def test_boundary_values_and_the_off_switches_are_accepted() -> None:
    ZOAConfig(lr=0.0, lr_alpha=0.0, momentum=0.0, weight_decay=0.0, steps=0, domain_t=0.0, lambda_bp=0.0,
              detector_min_batch=2, detector_momentum=0.0, shift_momentum=0.0, max_abs_epsilon=None,
              max_consecutive_skips=None, pool_images=2, bn_prior=0.0)  # fmt: skip


def test_the_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZOAConfig().lr = 0.1  # type: ignore[misc]


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


def test_resolved_keeps_explicit_switches_and_every_other_value() -> None:
    explicit = ZOAConfig(mode="reference", resnet_shift="vector", compact_similarity=True, detector_passes=1,
                         seed_detector_from_source=False, perturbation="rademacher", lr=0.123)  # fmt: skip
    resolved = explicit.resolved("cnn")
    assert resolved == explicit  # nothing left to fill in
    assert explicit.resolved("cnn").resolved("vit") == resolved  # filled switches stay as they are
    config = ZOAConfig(lr=0.123, seed=7)
    assert config.resnet_shift is None  # resolved returns a copy
    filled = config.resolved("vit")
    changed = {f.name for f in dataclasses.fields(ZOAConfig) if getattr(filled, f.name) != getattr(config, f.name)}
    assert changed == {"resnet_shift", "compact_similarity", "detector_passes", "perturbation",
                       "seed_detector_from_source"}  # fmt: skip
    assert (filled.seed_detector_from_source, filled.perturbation) == (False, "segmented_uniform")


def test_the_per_sample_estimator_draws_rademacher_unless_told_otherwise() -> None:
    assert ZOAConfig(estimator="per_sample").resolved("vit").perturbation == "rademacher"
    assert ZOAConfig(estimator="first_order").resolved("vit").perturbation == "segmented_uniform"
    chosen = ZOAConfig(estimator="per_sample", perturbation="segmented_uniform").resolved("vit")
    assert chosen.perturbation == "segmented_uniform"
