"""The base of the stream data modules: the settings every corruption stream shares, and what follows from them.

:class:`StreamDataModuleBase` checks the shared settings, names the domains, orders every domain's images (shuffled,
label-shifted, mixed, gradual), serves a window of the stream (``start_domain`` to ``stop_domain``, a resumed run),
builds the loaders (sharded under DDP) and the common part of the stream fingerprint. A data module built on it adds
only where its images come from: :class:`datamodules.CorruptionStreamDataModule` (a small clean set corrupted on the
fly) and :class:`datamodules.ImageNetCDataModule` (ImageNet-C read from disk).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules._common import (
    GRADUAL_SCHEDULE,
    MIXED,
    ArrayDataset,
    FileDataset,
    check_concentration,
    check_flag,
    check_optional_count,
    check_positive,
    dirichlet_order,
    domain_names,
    make_loader,
    split_domain,
    stream_order,
)
from datamodules.corruptions import check_corruptions, check_severity


class StreamDataModuleBase(LightningDataModule):
    """Base of the stream data modules: the shared settings, the domain order, the window, the loaders.

    The test stream visits ``rounds × corruptions`` domains, round-major (``r1/gaussian_noise``, ...,
    ``r1/jpeg_compression``, ``r2/gaussian_noise``, ...), or one mixed domain per round. Within a domain the images
    come in a seeded order that differs per round and corruption (:func:`datamodules._common.stream_order`), or in
    class runs (:func:`datamodules._common.dirichlet_order`); the loaders themselves do not shuffle. A data module
    made of several draws per domain (``domain_repeats``) reads them one after the other, each in its own order.

    A subclass lists every setting in its own constructor (its defaults, its ``--help``; those arguments become the
    hyperparameters), hands the shared ones on with ``super().__init__(**stream_settings(locals()))`` and supplies
    its images through :meth:`_domain_labels`, :meth:`_domain_part`, :meth:`_test_images_fingerprint` and
    :meth:`_input_fingerprint`. The settings below are documented here once; a subclass documents the ones it
    describes differently.

    Args:
        corruptions: corruption names in stream order; default: the 15 ImageNet-C corruptions in the paper's order.
        severity: corruption severity, 1 to 5.
        rounds: how many times the whole corruption sequence is repeated.
        image_size: side length in pixels of the square images.
        batch_size: batch size of every loader.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of every sample order (non-negative).
        num_source_images: how many clean source images (a seeded random subset) feed the source statistics;
            ``None`` for all of them.
        start_domain: first stream domain served by ``test_dataloader`` (a resumed run starts after the
            domains it already finished).
        stop_domain: serve domains up to, not including, this index (``None``: to the end of the stream).
        mixed_domains: one domain per round holding every corruption's images shuffled together (``r1/mixed``)
            instead of one domain per corruption (the mixed-domain setting).
        label_dirichlet: a label-shifted stream: within every domain the classes come in runs, drawn with this
            Dirichlet concentration (:func:`datamodules._common.dirichlet_order`; 0.1 is the literature's usual
            non-i.i.d. setting, smaller gives longer runs). ``None``: the shuffled order.
        gradual: gradual severity: every domain's images, in the domain's order, are cut into nine consecutive parts
            at severity 1, 2, 3, 4, 5, 4, 3, 2, 1 instead of all at ``severity``.

    Raises:
        ValueError: for an unknown corruption, a severity outside 1..5, a non-positive count or size, a negative seed
            or start domain, a ``label_dirichlet`` that is not a positive number, or a flag that is not a bool.
    """

    domain_repeats: int = 1
    """Independent draws of the images per domain, read one after the other (a setting of some data modules)."""

    _resumed_from: int | None = None

    def __init__(
        self,
        *,
        corruptions: list[str] | None,
        severity: int,
        rounds: int,
        image_size: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        num_source_images: int | None,
        start_domain: int,
        stop_domain: int | None,
        mixed_domains: bool,
        label_dirichlet: float | None,
        gradual: bool,
    ) -> None:
        super().__init__()
        here = inspect.currentframe()
        self.save_hyperparameters(frame=here.f_back if here else None)  # the subclass's constructor arguments
        # Not merged into the model's logged hparams: Lightning refuses a key both define with different values, and
        # the stream's `seed` is not ZOAModule's (its perturbation generator's). The run's config.yaml and the stream
        # fingerprint record the data settings.
        self._log_hyperparams = False
        self.start_domain = check_positive("start_domain", start_domain, minimum=0)
        self.stop_domain = stop_domain
        self.corruptions = check_corruptions(corruptions)
        self.severity = check_severity(severity)
        self.rounds = check_positive("rounds", rounds)
        self.label_dirichlet = check_concentration(label_dirichlet)
        self.mixed_domains = check_flag("mixed_domains", mixed_domains)
        self.gradual = check_flag("gradual", gradual)
        self.image_size = check_positive("image_size", image_size)
        self.batch_size = check_positive("batch_size", batch_size)
        self.num_workers = check_positive("num_workers", num_workers, minimum=0)
        self.seed = check_positive("seed", seed, minimum=0)
        self.num_source_images = check_optional_count("num_source_images", num_source_images)

    # ------------------------------------------------------------------ domains and window

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names in stream order, round-major: ``("r1/gaussian_noise", ..., "r<rounds>/<last>")``.

        With ``mixed_domains`` one per round: ``("r1/mixed", ..., "r<rounds>/mixed")``.
        """
        return domain_names([MIXED] if self.mixed_domains else self.corruptions, self.rounds)

    @property
    def active_domains(self) -> tuple[str, ...]:
        """The domains ``test_dataloader`` returns: ``domains[start_domain:stop_domain]``.

        A stream interrupted after ``k`` domains resumes with ``start_domain = k`` (a resumed ``trainer.test`` calls
        :meth:`resume_from` with the checkpoint's position); ``stop_domain`` runs only a prefix of the stream.

        Raises:
            ValueError: if the window is empty or out of range.
        """
        total = len(self.domains)
        stop = total if self.stop_domain is None else self.stop_domain
        if self.start_domain == self._resumed_from and self.start_domain >= stop:
            return ()  # a resumed run whose checkpoint already finished the window: nothing left to serve
        if not 0 <= self.start_domain < stop <= total:
            raise ValueError(
                f"start_domain={self.start_domain} and stop_domain={self.stop_domain} select no domains of a "
                f"{total}-domain stream; need 0 <= start_domain < stop_domain <= {total}"
            )
        return self.domains[self.start_domain : stop]

    def resume_from(self, next_domain: int) -> tuple[str, ...]:
        """Serve the stream from domain ``next_domain`` on (a resumed run); return the domains left to serve.

        A checkpoint that already finished the window (``next_domain`` at or past ``stop_domain`` or the end of the
        stream) leaves nothing to serve: :attr:`active_domains` is then empty and ``trainer.test`` runs no batch,
        instead of raising as an empty window set by hand does.

        Args:
            next_domain: the first domain the checkpoint's run did not finish.

        Returns:
            The domains ``test_dataloader`` will serve (empty if the window is finished).

        Raises:
            ValueError: if ``next_domain`` is negative or beyond the end of the stream.
        """
        total = len(self.domains)
        if not 0 <= next_domain <= total:
            raise ValueError(f"cannot resume a {total}-domain stream at domain {next_domain}: need 0..{total}")
        self.start_domain = self._resumed_from = int(next_domain)
        return self.active_domains

    # ------------------------------------------------------------------ loaders

    def test_dataloader(self) -> OrderedDict[str, DataLoader]:
        """Return ``{domain: DataLoader}`` in stream order (see :attr:`domains` and :attr:`active_domains`).

        Each loader has ``shuffle=False`` and ``drop_last=False`` and reads the domain in a seeded order that differs
        per (round, corruption) and is reproducible for a given ``seed``. Under DDP each process reads its slice of
        every global batch of ``batch_size`` images (the global batches are the single-process ones).
        """
        loaders: OrderedDict[str, DataLoader] = OrderedDict()
        for domain in self.active_domains:
            round_index, corruption = split_domain(domain)
            names = list(self.corruptions) if corruption == MIXED else [corruption]  # mixed: all, one order
            labels = self._domain_labels(names)
            parts: list[Dataset] = []
            for draw in range(self.domain_repeats):
                if self.label_dirichlet is None:
                    order = stream_order(self.seed + draw, round_index, corruption, len(labels))
                else:
                    order = dirichlet_order(labels, self.label_dirichlet, self.seed + draw, round_index, corruption)
                if not self.gradual:
                    parts.append(self._domain_part(names, draw, None, labels, order))
                    continue
                # the domain's order cut into nine parts, read at severity 1, 2, 3, 4, 5, 4, 3, 2, 1
                for severity, part in zip(GRADUAL_SCHEDULE, np.array_split(order, len(GRADUAL_SCHEDULE)), strict=True):
                    parts.append(self._domain_part(names, draw, severity, labels, part))
            dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            loaders[domain] = self._loader(dataset)
        return loaders

    def _loader(self, dataset: Dataset, *, sharded: bool = True) -> DataLoader:
        """A sequential loader of ``batch_size``: sharded under DDP (the stream and source loaders) unless told not."""
        trainer = self.trainer if sharded else None
        return make_loader(dataset, self.batch_size, self.num_workers, trainer=trainer)

    @staticmethod
    def _stack_images(dataset: ArrayDataset | FileDataset) -> Tensor:
        """All images of ``dataset`` in one tensor, in order (the calibration images)."""
        return torch.stack([dataset[i][0] for i in range(len(dataset))])

    # ------------------------------------------------------------------ fingerprint

    def stream_fingerprint(self) -> dict[str, Any]:
        """What identifies the test stream: equal fingerprints mean the same images in the same order and batches.

        Plain values, stored in stream checkpoints so a resumed run can refuse a different stream. ``num_workers``,
        ``num_source_images``, ``start_domain``, ``stop_domain`` and the settings that only say where files are do not
        change the stream and are left out.

        Returns:
            ``data_module`` (the class name), the test images (:meth:`_test_images_fingerprint`), ``corruptions``,
            ``severity``, ``rounds``, ``seed``, ``image_size``, ``batch_size``, the data module's own settings
            (:meth:`_input_fingerprint`), and ``domain_repeats`` when above 1, ``label_dirichlet`` when set,
            ``mixed_domains`` and ``gradual`` when on (all four absent at their defaults, as in older checkpoints).
        """
        return (
            {"data_module": type(self).__name__}
            | self._test_images_fingerprint()
            | {
                "corruptions": list(self.corruptions),
                "severity": self.severity,
                "rounds": self.rounds,
                "seed": self.seed,
                "image_size": self.image_size,
                "batch_size": self.batch_size,
            }
            | self._input_fingerprint()
            | ({"domain_repeats": self.domain_repeats} if self.domain_repeats > 1 else {})
            | ({"label_dirichlet": self.label_dirichlet} if self.label_dirichlet is not None else {})
            | ({"mixed_domains": True} if self.mixed_domains else {})
            | ({"gradual": True} if self.gradual else {})
        )

    # ------------------------------------------------------------------ what a data module supplies

    def _domain_labels(self, names: Sequence[str]) -> np.ndarray:
        """The labels of one domain's images: those of every corruption of ``names``, one after the other."""
        raise NotImplementedError(f"{type(self).__name__} must say which labels a domain holds")

    def _domain_part(
        self, names: Sequence[str], draw: int, severity: int | None, labels: np.ndarray, order: np.ndarray
    ) -> Dataset:
        """The dataset of one part of a domain: its images at ``order`` (indices into the domain's images).

        Args:
            names: the domain's corruptions (several for a mixed domain), their images one after the other.
            draw: which draw of the domain (``0 <= draw < domain_repeats``).
            severity: the severity of the part (gradual streams), or ``None`` for ``severity``.
            labels: the domain's labels (:meth:`_domain_labels`).
            order: the part's items: indices into the domain's images, in reading order.
        """
        raise NotImplementedError(f"{type(self).__name__} must build a domain's datasets")

    def _test_images_fingerprint(self) -> dict[str, Any]:
        """The fingerprint keys that identify the test images (at least ``test_images``)."""
        raise NotImplementedError(f"{type(self).__name__} must identify its test images")

    def _input_fingerprint(self) -> dict[str, Any]:
        """The fingerprint keys of the data module's own settings that change the batches (normalization, labels)."""
        raise NotImplementedError(f"{type(self).__name__} must name its own stream settings")


STREAM_SETTINGS: tuple[str, ...] = tuple(inspect.signature(StreamDataModuleBase.__init__).parameters)[1:]
"""The constructor arguments every stream data module has, checked by :class:`StreamDataModuleBase`."""


def stream_settings(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Pick the shared settings (:data:`STREAM_SETTINGS`) out of a data module constructor's arguments.

    A data module's constructor lists every setting in its own signature (its defaults and ``--help``); it hands the
    shared ones on with ``super().__init__(**stream_settings(locals()))``.

    Args:
        arguments: the constructor's arguments by name (its ``locals()``), holding at least every shared setting.
    """
    return {name: arguments[name] for name in STREAM_SETTINGS}
