"""The protocols between the pieces: structural checks and the names ``missing_members`` reports."""

from __future__ import annotations

from typing import Any

import torch

from zoa_lightning.core.protocols import (
    AdaptationModule,
    BankAdapter,
    QuantizableModule,
    ResultsModule,
    ResumableDataModule,
    SourceDataModule,
    SourceStatisticsAdapter,
    StreamDataModule,
    missing_members,
)


class _Stream:
    domains = ("r1/fog",)
    num_classes = 10

    def source_dataloader(self) -> Any:
        return []

    def calibration_images(self, n: int = 32) -> torch.Tensor:
        return torch.zeros(n, 3, 8, 8)


class _Results:
    def stream_results(self) -> list[dict[str, Any]]:
        return []

    def run_info(self) -> dict[str, Any]:
        return {}


class _Monitored(_Results):
    run_name = "zoa"
    start_domain = 0

    def pop_adaptation_events(self) -> list[dict[str, Any]]:
        return []

    def mixing_weights(self) -> torch.Tensor | None:
        return None

    def skipped_batches(self) -> int:
        return 0

    def last_losses(self) -> tuple[float, ...]:
        return ()


def test_the_documented_example() -> None:
    assert missing_members(object(), SourceDataModule) == ["source_dataloader"]


def test_methods_properties_and_annotated_attributes_are_reported_in_order() -> None:
    assert missing_members(object(), StreamDataModule) == [
        "domains", "num_classes", "source_dataloader", "calibration_images"
    ]  # fmt: skip
    assert missing_members(object(), ResumableDataModule) == [
        "resume_from", "stream_fingerprint", "start_domain", "stop_domain"
    ]  # fmt: skip
    assert missing_members(object(), QuantizableModule) == ["get_network", "set_network"]
    assert missing_members(object(), BankAdapter) == ["events", "bank"]


def test_an_object_with_every_member_lacks_nothing_and_passes_the_isinstance_check() -> None:
    stream = _Stream()
    assert missing_members(stream, StreamDataModule) == []
    assert isinstance(stream, StreamDataModule)
    assert missing_members(_Results(), ResultsModule) == []
    assert isinstance(_Monitored(), AdaptationModule)
    assert missing_members(_Monitored(), AdaptationModule) == []


def test_a_partial_implementation_lists_only_what_it_lacks() -> None:
    class Half:
        domains = ("r1/fog",)

        def source_dataloader(self) -> Any:
            return []

    assert missing_members(Half(), StreamDataModule) == ["num_classes", "calibration_images"]
    assert not isinstance(Half(), StreamDataModule)


def test_private_names_and_protocol_machinery_are_not_members() -> None:
    names = missing_members(object(), SourceStatisticsAdapter)
    assert names == ["collect_source_statistics"]
    assert not any(n.startswith("_") for n in missing_members(object(), AdaptationModule))


def test_members_inherited_from_a_parent_protocol_are_reported() -> None:
    class Bare:  # _Monitored's own members, without the ResultsModule ones
        run_name = "zoa"
        start_domain = 0

        def pop_adaptation_events(self) -> list[dict[str, Any]]:
            return []

        def mixing_weights(self) -> None:
            return None

        def skipped_batches(self) -> int:
            return 0

        def last_losses(self) -> tuple[float, ...]:
            return ()

    assert not isinstance(Bare(), AdaptationModule)
    assert missing_members(Bare(), AdaptationModule) == ["stream_results", "run_info"]
