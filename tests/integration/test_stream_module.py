"""The Lightning shape: ZOAModule / NoAdaptModule under Trainer.test, the bank callback and stream resumption."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import torch
import yaml

from callbacks import AdaptationMonitor, StreamCheckpoint
from tests.helpers import STREAM_CORRUPTIONS, RecordLogits, make_resnet, make_stream, make_trainer, make_vit
from zoa_lightning import NoAdaptModule, StreamModule, ZOAModule
from zoa_lightning.core import ZOAConfig
from zoa_lightning.core.methods import Adapter

ROOT = Path(__file__).resolve().parents[2]

CORRUPTIONS = STREAM_CORRUPTIONS
_data = make_stream
_trainer = make_trainer


def _zoa(network: torch.nn.Module | None = None, **kwargs: Any) -> ZOAModule:
    options = {"lr": 0.005, "spsa_c": 0.05, **kwargs}
    return ZOAModule(network=network if network is not None else make_vit(0), **options)


@pytest.mark.parametrize("make", [make_vit, make_resnet])
def test_zoa_module_adapts_with_two_passes_and_logs_per_domain(make: Any, cache_dir: Path) -> None:
    module = _zoa(make(0))
    trainer = _trainer(batches=2)
    results = trainer.test(module, datamodule=_data(cache_dir))
    assert len(results) == 3
    rows = module.stream_results()
    assert [r["domain"] for r in rows] == [f"r1/{c}" for c in CORRUPTIONS]
    assert all(r["batches"] == 2 and r["forward_passes"] == 4 and r["n"] == 128 for r in rows)
    assert all(0 <= r["acc1"] <= r["acc5"] <= 100 for r in rows)
    assert "test/r1/gaussian_noise/acc1" in results[0]
    assert "test/mean/acc1" in trainer.callback_metrics
    assert module.adapter is not None
    assert module.adapter.counter("batches") == 6
    assert not torch.equal(module.adapter.bank.theta, torch.zeros_like(module.adapter.bank.theta))


def test_no_adapt_spends_one_pass_and_changes_nothing(cache_dir: Path) -> None:
    net = make_vit(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    module = NoAdaptModule(network=net)
    _trainer(batches=2).test(module, datamodule=_data(cache_dir))
    assert all(r["forward_passes"] == 2 for r in module.stream_results())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_works_under_default_inference_mode(cache_dir: Path) -> None:
    module = _zoa()
    _trainer(batches=2, inference_mode=True).test(module, datamodule=_data(cache_dir))
    assert len(module.stream_results()) == 3
    # The adaptation state is made of ordinary tensors: it can still be loaded outside inference mode.
    module.load_state_dict(module.state_dict())


def test_class_count_mismatch_is_reported(cache_dir: Path) -> None:
    module = ZOAModule(network=make_vit(0), num_classes=7)
    with pytest.raises(ValueError, match="10 classes"):
        _trainer().test(module, datamodule=_data(cache_dir))


def test_stream_split_in_two_runs_gives_the_same_predictions(cache_dir: Path, tmp_path: Path) -> None:
    full = RecordLogits()
    _trainer([full], batches=3).test(_zoa(make_vit(0), detector_min_batch=16), datamodule=_data(cache_dir))

    first = RecordLogits()
    _trainer([first, StreamCheckpoint(dirpath=str(tmp_path))], batches=3).test(
        _zoa(make_vit(0), detector_min_batch=16), datamodule=_data(cache_dir, stop_domain=2)
    )
    ckpt = tmp_path / "stream-last.ckpt"
    assert ckpt.is_file()

    second = RecordLogits()
    resumed = _zoa(make_vit(0), detector_min_batch=16)
    _trainer([second, StreamCheckpoint(dirpath=str(tmp_path / "b"))], batches=3).test(
        resumed, datamodule=_data(cache_dir), ckpt_path=str(ckpt)
    )
    split = first.logits + second.logits
    assert len(split) == len(full.logits) == 9
    for got, want in zip(split, full.logits, strict=True):
        assert torch.equal(got, want)
    assert [r["domain"] for r in resumed.stream_results()] == [f"r1/{c}" for c in CORRUPTIONS]


def test_bank_callback_reports_stores(cache_dir: Path, tmp_path: Path) -> None:
    bank = AdaptationMonitor(verbose=False)
    module = _zoa(make_vit(0), detector_min_batch=16, domain_t=0.05)
    _trainer([bank, StreamCheckpoint(dirpath=str(tmp_path))], batches=3).test(
        module, datamodule=_data(cache_dir, batch_size=32)
    )
    stores = [e for e in bank.history if e["event"] == "shift"]
    assert stores, "the corruption changes should be detected"
    assert all(e["domain_index"] >= 1 for e in stores)
    assert bank.state_dict()["history"] == bank.history


def test_adapt_norms_restricts_the_adapted_layers(cache_dir: Path) -> None:
    from zoa_lightning.core.bank import FusedLayerNorm

    module = _zoa(adapt_norms=["blocks.2.norm2", "blocks.1.norm1"])  # any order; kept in network order
    _trainer(batches=1).test(module, datamodule=_data(cache_dir))
    assert module.adapter is not None
    assert module.adapter.layout.norms == ("blocks.1.norm1", "blocks.2.norm2")
    fused = [n for n, m in module.adapter.model.named_modules() if isinstance(m, FusedLayerNorm)]
    assert fused == ["blocks.1.norm1", "blocks.2.norm2"]
    width = module.adapter.model.embed_dim
    assert module.run_info()["adapted_values"] == module.adapter.bank.size == 4 * width
    assert all(r["forward_passes"] == 2 for r in module.stream_results())


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["blocks.1.norm1", "blocks.9.norm1"], r"\['blocks\.9\.norm1'\], which .* does not have"),
        (["blocks.1.norm1", "blocks.1.norm1"], "each once"),
        ([], "at least one"),
        (["blocks.1.attn"], "adapts affine LayerNorm"),
    ],
)
def test_adapt_norms_rejects_bad_names(names: list[str], match: str, cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=match):
        _trainer(batches=1).test(_zoa(adapt_norms=names), datamodule=_data(cache_dir))


def test_a_diverging_run_stops_with_an_error_naming_the_learning_rate(cache_dir: Path) -> None:
    # Regression: lr 1000 used to drive the epsilons to ~1e23, roll back every later batch, score NaN logits as
    # class 0 and exit normally.
    module = _zoa(lr=1000.0, max_consecutive_skips=3)
    with pytest.warns(RuntimeWarning, match="rolled back"), pytest.raises(RuntimeError, match="lr=1000"):
        _trainer(batches=2).test(module, datamodule=_data(cache_dir))


def test_rolled_back_batches_are_reported_per_domain_and_in_the_results(cache_dir: Path, tmp_path: Path) -> None:
    from callbacks import ResultsCallback

    module = _zoa(lr=1000.0, max_consecutive_skips=None)
    trainer = _trainer(callbacks=[ResultsCallback(out_dir=tmp_path)], batches=2)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        trainer.test(module, datamodule=_data(cache_dir))
    rows = module.stream_results()
    assert [r["skipped_batches"] for r in rows] == [2, 2, 2]
    assert all(r["forward_passes"] == 4 for r in rows)  # the passes of rolled-back batches are counted
    import json

    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["skipped_batches"] == 6
    assert "skipped_batches" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_ablation_configs_label_their_runs_with_their_own_name(cache_dir: Path, tmp_path: Path) -> None:
    from callbacks import ResultsCallback

    module = _zoa(lr=0.0, lr_alpha=0.0, use_bank=False, name="zoa_shift_only")
    callbacks = [ResultsCallback(), AdaptationMonitor(), StreamCheckpoint()]
    trainer = _trainer(callbacks=callbacks, batches=1, default_root_dir=tmp_path)
    trainer.test(module, datamodule=_data(cache_dir))
    assert module.run_info()["method"] == "zoa_shift_only"
    assert (tmp_path / "zoa_shift_only" / "results.json").is_file()
    assert (tmp_path / "zoa_shift_only" / "stream-last.ckpt").is_file()
    assert {
        line.split(",")[-3] for line in (tmp_path / "zoa_shift_only" / "results.csv").read_text().splitlines()[1:]
    } == {"zoa_shift_only"}
    with pytest.raises(ValueError, match="path separators"):
        _zoa(name="a/b")


def test_a_last_batch_of_one_image_is_predicted_by_a_vit(cache_dir: Path) -> None:
    # Regression: batch size 333 on the 1,000-image stream crashed after a whole domain (last batch: 1 image).
    module = _zoa()
    _trainer(batches=4).test(module, datamodule=_data(cache_dir, batch_size=333))
    rows = module.stream_results()
    assert [row["n"] for row in rows] == [1000] * 3
    assert [row["batches"] for row in rows] == [4] * 3
    # 3 batches × 2 passes + 1 for the single image: right after a full batch it stands alone (docs/small_batches.md),
    # and one image has no variance for the loss, so it is predicted, not adapted on
    assert [row["forward_passes"] for row in rows] == [7] * 3
    assert module.run_info()["unadapted_batches"] == 3


def test_a_last_batch_of_one_image_is_predicted_by_a_batchnorm_network(cache_dir: Path) -> None:
    # test_resnet's last stage is 1×1 at 32 px: one image has a single value per channel there, so its BatchNorms mix
    # in their source statistics instead of failing (it was refused before small-batch support)
    module = _zoa(make_resnet(0))
    record = RecordLogits()
    _trainer(callbacks=[record], batches=4).test(module, datamodule=_data(cache_dir, batch_size=333))
    assert [logits.shape[0] for logits in record.logits[:4]] == [333, 333, 333, 1]
    assert all(torch.isfinite(logits).all() for logits in record.logits)
    assert module.run_info()["unadapted_batches"] == 3


# ------------------------------------------------------------------------------------------------ the template
class _Counting(Adapter):
    """A minimal adapter with every optional capability but the bank: 3 passes per batch, records its source calls."""

    COUNTERS = ("batches", "forward_passes", "skipped_batches")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.source_calls: list[tuple[int, int | None, set[torch.device]]] = []

    @property
    def passes_per_batch(self) -> int:
        return 3

    def collect_source_statistics(self, loader: Iterable[torch.Tensor], max_batches: int | None = None) -> None:
        batches = list(loader)
        self.source_calls.append((len(batches), max_batches, {b.device for b in batches}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.counters.add("batches")
        self.counters.add("forward_passes", 3)
        self.counters.add("skipped_batches")
        return self.model(images)

    def run_info(self) -> dict[str, Any]:
        return {"source_calls": len(self.source_calls)}


class _CountingModule(StreamModule):
    """A method of a few lines on the template.

    Args:
        network: see StreamModule.
        weights: see StreamModule.
        num_classes: see StreamModule.
        flag: a reported hyperparameter.
        source_batches: clean batches for source statistics.
        name: see StreamModule.
    """

    method_name = "counting"
    reported_hparams = ("flag",)

    def __init__(
        self,
        network: str | torch.nn.Module = "demo_vit",
        weights: str | None = None,
        num_classes: int = 10,
        flag: int = 7,
        source_batches: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(network, weights, num_classes, name)

    def build_adapter(self, network: torch.nn.Module) -> _Counting:
        return _Counting(network)


def test_the_template_counts_passes_rollbacks_source_batches_and_reports_through_the_adapter(cache_dir: Path) -> None:
    module = _CountingModule(network=make_vit(0), source_batches=2)
    _trainer(batches=2).test(module, datamodule=_data(cache_dir))
    adapter = module.adapter
    assert isinstance(adapter, _Counting)
    assert adapter.source_calls == [(4, 2, {torch.device("cpu")})]  # the loader's 4 batches; the adapter stops at 2
    assert [(r["forward_passes"], r["skipped_batches"]) for r in module.stream_results()] == [(6, 2)] * 3
    assert module.forward_passes() == 18
    assert module.skipped_batches() == 6
    assert module.run_info() == {
        "method": "counting",
        "model": "VisionTransformer",
        "bits": "float",
        "flag": 7,
        "source_calls": 1,
    }
    assert module.pop_adaptation_events() == []
    assert module.mixing_weights() is None
    # The adapter owns the network: checkpoint keys adapter.*
    assert {key.split(".")[0] for key in module.state_dict()} == {"adapter"}
    assert module.get_network() is adapter.model
    assert module.net is None


def test_a_module_adapter_takes_over_the_network_and_its_checkpoint_keys(cache_dir: Path) -> None:
    net = make_vit(0)
    keys = {f"adapter.{k}" for k in net.state_dict()}
    module = ZOAModule(network=net)
    _trainer(batches=1).test(module, datamodule=_data(cache_dir))
    assert module.net is None
    assert module.get_network() is net
    assert {key.split(".")[0] for key in module.state_dict()} == {"adapter"}
    assert not keys <= set(module.state_dict())  # ZOA fused its norm layers: the network's keys changed in place
    assert {f"adapter.model.{k}" for k in net.state_dict()} <= set(module.state_dict())


def test_source_batches_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="source_batches must be >= 1 or None, got 0"):
        _CountingModule(network=make_vit(0), source_batches=0)
    with pytest.raises(ValueError, match="source_batches must be >= 1 or None, got 0"):
        ZOAModule(network=make_vit(0), source_batches=0)


def test_build_adapter_must_return_an_adapter(cache_dir: Path) -> None:
    class Wrong(StreamModule):
        def build_adapter(self, network: torch.nn.Module) -> Any:
            return network  # an nn.Module is callable, but counts no passes

    with pytest.raises(TypeError, match=r"Wrong.build_adapter returned a VisionTransformer: return a subclass of"):
        _trainer(batches=1).test(Wrong(network=make_vit(0)), datamodule=_data(cache_dir))
    with pytest.raises(NotImplementedError, match="must implement build_adapter"):
        _trainer(batches=1).test(StreamModule(network=make_vit(0)), datamodule=_data(cache_dir))


def test_adapt_step_before_setup_says_what_to_call() -> None:
    with pytest.raises(RuntimeError, match=r"setup_method\(datamodule\) first"):
        NoAdaptModule(network=make_vit(0)).adapt_step(torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------------------- ZOAModule and ZOAConfig in step
def _non_default(name: str, annotation: Any, default: Any) -> Any:
    """A valid value other than ``default`` for a ZOAConfig field of type ``annotation``."""
    options = [a for a in get_args(annotation) if a is not type(None)]
    literals = [v for a in [annotation, *options] if get_origin(a) is Literal for v in get_args(a)]
    if literals:
        return next(v for v in literals if v != default)
    if bool in (annotation, *options):
        return True if default is None else not default
    if int in (annotation, *options):
        return (default or 0) + 1
    if float in (annotation, *options):
        return default / 2 if default else 0.5
    raise AssertionError(f"no test value for ZOAConfig.{name}: {annotation}; teach _non_default this type")


def test_every_zoa_config_field_is_a_zoa_module_argument_with_the_same_type_and_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(ZOAConfig)}
    field_types = get_type_hints(ZOAConfig)
    parameters = inspect.signature(ZOAModule.__init__).parameters
    argument_types = get_type_hints(ZOAModule.__init__)
    missing = [name for name in fields if name not in parameters]
    assert not missing, f"ZOAModule.__init__ lacks the ZOAConfig fields {missing}: add them, typed, defaulted, in Args:"
    for name, field in fields.items():
        assert parameters[name].default == field.default, name
        assert argument_types[name] == field_types[name], name
        assert f"        {name}: " in (ZOAModule.__doc__ or ""), f"{name} is not documented in ZOAModule's Args:"
    assert ZOAModule(network=make_vit(0)).config == ZOAConfig()


def test_zoa_module_documents_every_config_field_with_the_config_s_own_text() -> None:
    from docstring_parser import parse

    config = {p.arg_name: p.description for p in parse(ZOAConfig.__doc__ or "").params}
    module = {p.arg_name: p.description for p in parse(ZOAModule.__doc__ or "").params}
    assert set(config) == {f.name for f in dataclasses.fields(ZOAConfig)}
    assert {name: module.get(name) for name in config} == config
    assert set(module) - set(config) == {"source_batches", "adapt_norms"}  # the template's own are StreamModule's


def test_a_config_file_sets_every_zoa_config_field(tmp_path: Path) -> None:
    from cli import make_cli

    types = get_type_hints(ZOAConfig)
    values = {f.name: _non_default(f.name, types[f.name], f.default) for f in dataclasses.fields(ZOAConfig)}
    overlay = tmp_path / "every_field.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"class_path": "zoa_lightning.ZOAModule", "init_args": values}}))
    cli = make_cli(["-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(overlay)], run=False)
    assert isinstance(cli.model, ZOAModule)
    assert dataclasses.asdict(cli.model.config) == values
    assert all(values[name] != getattr(ZOAConfig(), name) for name in values)


def test_per_sample_on_a_batchnorm_network_is_refused_at_construction() -> None:
    # It used to be refused in setup, after the quantizer had calibrated the network (minutes on a real model).
    with pytest.raises(TypeError, match=r"estimator='per_sample' needs a network whose images do not interact"):
        ZOAModule(network=make_resnet(0), estimator="per_sample")
