""" The dual batch: a second batch drawn beside each training batch, for two-branch methods (BBN).

BBN (Zhou et al., CVPR 2020) trains its conventional branch on the ordinary batch and its re-balancing branch on
a batch of the same size from the *reversed sampler*: a class ``k`` drawn with probability proportional to
``w_k = n_max / n_k``, then an image of that class uniformly. That is a per-sample weight proportional to
``w_k / n_k``, i.e. ``n_k^-2``, so the epoch plan (:class:`~timm_cmo.data.plan.EpochPlanner`) draws it with its
class-weighted sampler at ``r = 2`` (``dual_r``): the same law, from its own seeded stream, so resumed runs and
``--data-on-device`` see the same batches. BBN's other dual samplers are ``r = 1`` (class-balanced, its
``balance``) and ``r = 0`` (the data distribution, its ``uniform``).

How a dual batch travels: the plan's ``dual_index`` (B,) rides in the batch sampler's keys; the collate function
appends its images after the backgrounds and foregrounds and its labels as a third target row (see
:class:`~timm_cmo.data.loader.CMOCollate`); after the prefetcher :func:`split_dual` cuts it off again. The device
loader gathers and augments the same indices itself. Both loaders then hold it in ``loader.dual`` (a
:class:`DualBatch`) while the batch is out, as they hold ``loader.mix_info``: CMO and label smoothing apply to the
ordinary batch; the dual batch is never mixed and keeps hard labels (smoothed in the loss, if asked).
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .cmo import MixInfo

__all__ = ['DualBatch', 'split_dual']


class DualBatch(NamedTuple):
    """The dual (re-balancing) batch of a training batch.

    Attributes:
        x: (B, C, H, W) images, augmented and normalised like the ordinary batch.
        y: (B,) int64 labels.
        smoothing: The loader's label smoothing, for the loss of these labels.
    """
    x: torch.Tensor
    y: torch.Tensor
    smoothing: float = 0.0

    def mix(self) -> MixInfo:
        """The labels as an unmixed :class:`~timm_cmo.data.cmo.MixInfo` (lam 1), what the losses take as ``mix=``."""
        return MixInfo(self.y, self.y, 1., self.smoothing)


def split_dual(x: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[DualBatch]]:
    """Cut a collated batch's dual batch off.

    A batch with a dual batch arrives as ``x`` = B backgrounds, M foregrounds, B dual images and ``y`` (3, B) =
    background labels, per-position foreground labels (-1 where none) and dual labels. Returns ``(x, y, dual)``
    with ``x``, ``y`` as a batch without one (``y`` (2, B) with foregrounds, (B,) without); other batches come
    back as they are, with ``dual`` None.
    """
    if y.ndim != 2 or y.shape[0] != 3:
        return x, y, None
    b = y.shape[1]
    dual = DualBatch(x[x.shape[0] - b:], y[2], smoothing)
    x = x[:x.shape[0] - b]
    return x, (y[:2] if x.shape[0] > b else y[0]), dual
