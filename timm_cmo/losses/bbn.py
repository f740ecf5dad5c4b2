"""BBN's cumulative-learning loss (Zhou et al., CVPR 2020), with and without CMO.

The BBN model (:mod:`timm_cmo.models.bbn`) mixes its two branches' features with the weight ``alpha`` of the
conventional branch, ``logits = fc(2 * cat(alpha * f_c, (1 - alpha) * f_r))``, and the loss weighs the two
batches' labels the same way, on the same logits::

    L = alpha * CE(logits, y_c) + (1 - alpha) * CE(logits, y_r)

``y_c`` the ordinary batch's labels, ``y_r`` the dual (re-balancing) batch's (:class:`~timm_cmo.data.dual.DualBatch`).
Cumulative learning moves the weight from the conventional to the re-balancing branch as training goes on:
``alpha = 1 - (t / T)^2`` in (0-based) epoch ``t``, ``T`` the number of epochs (:func:`bbn_alpha`). BBN's code
(``lib/core/combiner.py``) computes ``1 - ((epoch - 1) / div_epoch)^2`` with its 1-based epoch, so alpha is 1 in the
first epoch and ``1 - ((T - 1) / T)^2`` in the last (0.00998 for T = 200); its ``div_epoch`` is the epoch count,
except that 90 and 180 epochs divide by 100 and 200 (its iNaturalist schedules end at alpha 0.19 and 0.20):
``alpha_epochs`` (``--bbn-alpha-epochs``) sets T apart from the run's epochs for that.

CMO on BBN: CMO mixes the ordinary batch, the conventional branch's input (backgrounds ~ P as that branch's
sampler draws them, foregrounds ~ Q pasted into them); the re-balancing batch, drawn from the minority already,
is left as it is. The conventional term then becomes CMO's per-term loss::

    L = alpha * [lam * CE(logits, y_b) + (1 - lam) * CE(logits, y_f)] + (1 - alpha) * CE(logits, y_r)

(per sample ``lam_i`` in elem mode; label smoothing, where asked, on every term). No paper reports BBN with
CMO; the row is runnable so the comparison can be made.

``loss(logits, target, mix=loader.mix_info, dual=loader.dual)``: ``target`` / ``mix`` as for every loss of the
plugin (:mod:`timm_cmo.losses.long_tail`); ``dual`` is required. Each term is the plain CE's batch mean (BBN's
``CrossEntropy``), so the mean loss is the weighted sum of two batch means. ``normalizer`` gives the three
denominators (``y_b``, ``y_f``, ``y_r``) that gradient accumulation sums over micro-batches.
"""
from typing import Optional, Union

import torch

from ..data.cmo import MixInfo
from ..data.dual import DualBatch
from .long_tail import CrossEntropyLoss
from .registry import register_loss
from .reweight import ClassCounts

__all__ = ['BBNLoss', 'bbn_alpha']


def bbn_alpha(epoch: int, epochs: int) -> float:
    """BBN's cumulative-learning weight of the conventional branch in (0-based) ``epoch`` of ``epochs``:
    ``1 - (epoch / epochs)^2`` (1 in epoch 0, ``1 - ((epochs - 1) / epochs)^2`` in the last)."""
    if epochs < 1:
        raise ValueError(f'epochs must be >= 1, got {epochs}')
    return 1. - (epoch / epochs) ** 2


@register_loss('bbn')
class BBNLoss(CrossEntropyLoss):
    """``alpha * CE(logits, y_c) + (1 - alpha) * CE(logits, y_r)`` with BBN's cumulative-learning alpha.

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        epochs: Training epochs; the T of ``alpha = 1 - (t / T)^2`` unless ``alpha_epochs`` is given.
        alpha_epochs: T apart from ``epochs`` (BBN's ``div_epoch``: 200 for its 180-epoch iNaturalist schedule);
            at least ``epochs``, so alpha stays in (0, 1].
        **kwargs: :class:`~timm_cmo.losses.long_tail.CrossEntropyLoss` options (``reduction``, ``validate``);
            ``reweight`` must be ``'none'``: BBN re-balances with its sampler and its cumulative learning.
    """
    needs_dual = True  # trains on the loader's dual (re-balancing) batch and a two-branch model

    def __init__(self, class_counts: ClassCounts, epochs: Optional[int] = None, alpha_epochs: Optional[int] = None,
                 **kwargs):
        reweight = kwargs.get('reweight', 'none')
        if reweight != 'none':
            raise ValueError(f"reweight must be 'none', got {reweight!r}: BBN re-balances with its re-balancing branch "
                             f"(reversed sampler, cumulative learning), not with class weights")
        super().__init__(class_counts, epochs=epochs, **kwargs)
        total = alpha_epochs if alpha_epochs is not None else epochs
        if total is None:
            raise ValueError('BBN needs the number of epochs (epochs=, or alpha_epochs=) for its alpha = 1 - (t / T)^2')
        if isinstance(total, bool) or int(total) != total or total < 1:
            raise ValueError(f'alpha_epochs must be an integer >= 1, got {total!r}')
        if epochs is not None and total < epochs:
            raise ValueError(f'alpha_epochs must be >= epochs ({epochs}), got {total}: alpha = 1 - (t / T)^2 would '
                             f'turn negative')
        self.alpha_epochs = int(total)

    @property
    def alpha(self) -> float:
        """The conventional branch's weight in the current epoch (:meth:`set_epoch`), what the model mixes with."""
        return bbn_alpha(self.epoch, self.alpha_epochs)

    def normalizer(self, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None,
                   dual: Optional[DualBatch] = None) -> torch.Tensor:
        """The ``(3,)`` float64 denominators ``[sum d(y_b), sum d(y_f), sum d(y_r)]`` of the batch's terms."""
        return torch.cat([super().normalizer(target, mix), super().normalizer(_dual(dual).mix())[:1]])

    def forward(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None,
                norm: Optional[torch.Tensor] = None, dual: Optional[DualBatch] = None) -> torch.Tensor:
        """The loss of the mixed logits (B, C) against the ordinary batch's ``target`` / ``mix`` and ``dual.y``;
        ``norm``: the ``(3,)`` denominators to divide by (sums of :meth:`normalizer`)."""
        dual = _dual(dual)
        if dual.y.shape[0] != logits.shape[0]:
            raise ValueError(f'the dual batch has {dual.y.shape[0]} labels for a batch of {logits.shape[0]}')
        alpha = self.alpha
        conventional = super().forward(logits, target, mix=mix, norm=None if norm is None else norm[:2])
        rebalancing = super().forward(logits, dual.mix(), norm=None if norm is None else norm[2:])
        return alpha * conventional + (1. - alpha) * rebalancing

    def extra_repr(self) -> str:
        return f'alpha_epochs={self.alpha_epochs}, ' + super().extra_repr()


def _dual(dual: Optional[DualBatch]) -> DualBatch:
    if dual is None:
        raise ValueError('the BBN loss needs the dual (re-balancing) batch: loss(logits, target, mix=loader.mix_info, '
                         'dual=loader.dual), from a loader built with dual_r (2: the reversed sampler)')
    return dual
