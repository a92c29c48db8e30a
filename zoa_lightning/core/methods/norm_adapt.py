"""``norm_adapt`` (``bn_adapt``, spec §8): every BatchNorm2d normalises with the test batch's statistics.

* :func:`use_batch_statistics`: the conversion itself (also the first step of T3A's and Tent's configurations).
* :class:`NormAdapt`: the adapter; one forward pass per batch, no parameter changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoa_lightning.core.methods.no_adapt import NoAdapt

__all__ = ["NormAdapt", "use_batch_statistics"]


def use_batch_statistics(model: nn.Module) -> list[str]:
    """Make every ``nn.BatchNorm2d`` of ``model`` normalise with the current batch's statistics (``bn_adapt``).

    The running statistics are discarded (``track_running_stats=False``, ``running_mean = running_var = None``), so the
    layer uses batch statistics in train and in eval mode alike, and its ``state_dict`` no longer holds them. The
    affine parameters are untouched. LayerNorms are not affected: for a vision transformer this does nothing.

    Args:
        model: any network; modified in place.

    Returns:
        The qualified names of the converted layers (empty if the network has no ``BatchNorm2d``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> use_batch_statistics(net)
        ['1']
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            names.append(name)
    return names


class NormAdapt(NoAdapt):
    """``bn_adapt``: :func:`use_batch_statistics` at construction, then the plain forward of :class:`NoAdapt`.

    The running statistics are discarded at construction, so this also holds in eval mode. A network without
    BatchNorm2d (a vision transformer: its LayerNorms are untouched) predicts exactly as with :class:`NoAdapt`;
    :attr:`batch_norms` is then empty.

    Args:
        model: the classifier (modified in place).

    Example:
        >>> import torch
        >>> adapter = NormAdapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> adapter.batch_norms, adapter(torch.randn(2, 3, 5, 5)).shape
        (['1'], torch.Size([2, 4, 3, 3]))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.batch_norms = use_batch_statistics(model)

    def run_info(self) -> dict[str, Any]:
        """``{"batch_norms": <converted layers>}`` for the run's summary."""
        return {"batch_norms": len(self.batch_norms)}
