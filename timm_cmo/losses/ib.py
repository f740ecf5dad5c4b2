"""Influence-balanced loss (Park et al., ICCV 2021), as pseulki/IB-Loss trains it.

Plain cross-entropy (unweighted) until ``start_epoch`` (0-based; the authors' 100 of 200 on CIFAR, 50 of 100 on
Tiny ImageNet), then, with ``p = softmax(f)``, the penultimate (pooled, pre-classifier) feature ``h`` (B, D) and
class weights ``w``::

    L = 1/B sum_i  w_{y_i} l_i(y_i) * alpha / (||p_i - e_{y_i}||_1 * ||h_i||_1 + epsilon)

``l_i(y) = -log p_iy`` (``ib``) or ``(1 - p_iy)^gamma (-log p_iy)`` (``ib_focal``), ``||p - e_y||_1 = sum_k
|p_k - [k = y]|`` (the L1 norm of the CE gradient with respect to the logits), ``||h||_1 = sum_d |h_d|``;
``alpha`` 1000 (what the authors' scripts pass; their class default of 10000 is never used), ``epsilon``
0.001. The influence factor is part of the loss: gradients flow through it (the authors' code does not detach
it). The batch mean divides by ``B`` (the authors' ``.mean()``), not by the weights' sum as the other losses
here do. Class weights (``weighting='inverse'``, the authors' ``IBReweight``):
``w_k = n_k^-1``, normalised to sum to ``C``; ``weighting='none'`` with ``reweight='cb'`` is their
``CBReweight`` variant. The authors' ``IB_FocalLoss`` took ``p`` from the *weighted* CE (``exp(-w_y CE)``); here
``p_iy`` is the model's probability, as in :class:`~timm_cmo.losses.long_tail.FocalLoss`.

**Mixed batches** (``mix=MixInfo``): the paper's per-term form ``lam * L(y_b) + (1 - lam) * L(y_f)`` with ``L``
the IB loss of one label, so each term's influence factor uses its own label: the term of ``y`` weighs
``w_y l_i(y)`` by ``alpha / (||p_i - e_y||_1 ||h_i||_1 + eps)``, the influence the sample would have with label
``y`` (``||p - e_y||_1`` is the L1 norm of that term's CE gradient). Per sample,
``1/B sum_i [lam_i n_i(y_b) + (1 - lam_i) n_i(y_f)]``, which is the same form for scalar ``lam``, elem mode and
Remix (the normaliser ``B`` does not depend on the labels). Label smoothing replaces ``e_y`` by the smoothed
target ``t`` of ``y``: ``n_i = (sum_k t_k w_k l_ik) * alpha / (||p_i - t||_1 ||h_i||_1 + eps)`` (its CE gradient is
``p - t``); a soft target without ``mix`` is used the same way. Before ``start_epoch`` the loss is
:class:`~timm_cmo.losses.long_tail.CrossEntropyLoss`'s, mixes included, and the features are not read.

The loss declares ``needs_features = True``: call it as ``loss(logits, target, mix=..., features=h)`` with
``logits, h = timm_cmo.models.logits_and_features(model, x)`` (train_cmo.py does this for it).
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..data.cmo import MixInfo, soft_target
from .long_tail import CrossEntropyLoss, LongTailLoss, focal_class_losses
from .registry import register_loss
from .reweight import ClassCounts, check_class_counts, check_finite, resolve_switch_epoch

__all__ = ['IBLoss', 'IBFocalLoss', 'IB_WEIGHTINGS', 'ib_class_weights', 'influence_factor', 'resolve_ib_start_epoch']

IB_WEIGHTINGS = ('inverse', 'none')

_NEEDS_FEATURES = ('the IB loss needs the penultimate features from its start epoch on: call it as '
                   'loss(logits, target, features=h) with logits, h = timm_cmo.models.logits_and_features(model, x)')


def ib_class_weights(class_counts: ClassCounts) -> torch.Tensor:
    """The authors' ``IBReweight`` class weights ``n_k^-1 / sum_j n_j^-1 * C``: ``(C,)`` float32 (float64 math)."""
    counts = check_class_counts(class_counts)
    w = 1.0 / counts
    return torch.tensor(w / w.sum() * len(counts), dtype=torch.float32)


def resolve_ib_start_epoch(start_epoch: Optional[int] = None, epochs: Optional[int] = None) -> int:
    """The 0-based epoch from which the IB loss applies: ``start_epoch``, else ``epochs // 2``."""
    return resolve_switch_epoch(
        'start_epoch', start_epoch, epochs, lambda n: n // 2,
        'the IB loss needs its start epoch: pass start_epoch=<0-based epoch from which IB applies> or '
        'epochs=<total training epochs> (start_epoch then defaults to epochs // 2)')


def influence_factor(
        probs: torch.Tensor, target: torch.Tensor, features: torch.Tensor, alpha: float, epsilon: float,
) -> torch.Tensor:
    """``(B,)`` ``alpha / (||probs - target||_1 * ||features||_1 + epsilon)``; probs, target (B, C), features (B, D)."""
    grad_norm = (probs - target).abs().sum(dim=1)
    feature_norm = features.abs().sum(dim=1)
    return alpha / (grad_norm * feature_norm + epsilon)


@register_loss('ib')
class IBLoss(LongTailLoss):
    """Influence-balanced loss (module docstring); CE before ``start_epoch``.

    Call as ``loss(logits, target, mix=None, features=None)``: ``logits`` (B, C), ``target`` (B,) labels or
    (B, C) soft targets, ``features`` (B, D) pre-logit features (required from ``start_epoch`` on).

    Args:
        class_counts: ``(C,)`` training images per class.
        alpha: Numerator of the influence factor. Default 1000 (the authors' CIFAR and Tiny ImageNet runs).
        epsilon: Added to the influence. Default 0.001.
        start_epoch: 0-based epoch from which the IB loss replaces CE. Default ``epochs // 2``.
        weighting: ``'inverse'`` (default, the authors' ``IBReweight``: ``n_k^-1`` normalised to sum to ``C``) or
            ``'none'``; with ``'none'``, ``reweight='cb'`` / ``'drw'`` give the class-balanced weights instead.
        gamma: Focal exponent of the per-class loss. Default 0 (plain IB); :class:`IBFocalLoss` defaults to 1.
        reweight, drw_epoch, epochs, cb_beta, reduction, validate: as :class:`LongTailLoss` (``reduction`` 'mean'
            divides by ``B``); class weights apply in the IB phase only, the CE phase is unweighted.
    """
    needs_features = True

    # a batch mean over B (whatever the labels): --grad-accum-steps scales each micro-batch by its share of the samples
    normalizer = None

    def __init__(
            self,
            class_counts: ClassCounts,
            alpha: float = 1000.,
            epsilon: float = 1e-3,
            start_epoch: Optional[int] = None,
            weighting: str = 'inverse',
            gamma: float = 0.,
            reweight: str = 'none',
            drw_epoch: Optional[int] = None,
            epochs: Optional[int] = None,
            cb_beta: float = 0.9999,
            reduction: str = 'mean',
            validate: bool = True,
    ):
        super().__init__(class_counts, reweight=reweight, drw_epoch=drw_epoch, epochs=epochs, cb_beta=cb_beta,
                         reduction=reduction, validate=validate)
        if weighting not in IB_WEIGHTINGS:
            raise ValueError(f'Unknown IB weighting {weighting!r}; choose one of {list(IB_WEIGHTINGS)}')
        if weighting == 'inverse' and reweight != 'none':
            raise ValueError(f"the IB loss has its own inverse-frequency class weights (weighting='inverse'); "
                             f"for reweight={reweight!r} pass weighting='none'")
        self.alpha = check_finite('alpha', alpha, positive=True)
        self.epsilon = check_finite('epsilon', epsilon)
        self.gamma = check_finite('gamma', gamma)
        self.weighting = weighting
        self.start_epoch = resolve_ib_start_epoch(start_epoch, epochs)
        if weighting == 'inverse':
            self.class_weight = ib_class_weights(self.class_counts)
        self.ce = CrossEntropyLoss(self.class_counts, reduction=reduction, validate=validate)

    @property
    def active(self) -> bool:
        """Whether the IB loss (not CE) applies at the current epoch."""
        return self.epoch >= self.start_epoch

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` ``l_ik``: ``-log p_ik``, times ``(1 - p_ik)^gamma`` when ``gamma > 0``."""
        return focal_class_losses(logits, self.gamma)

    def _check_features(self, features, logits: torch.Tensor) -> torch.Tensor:
        if features is None:
            raise ValueError(_NEEDS_FEATURES)
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise ValueError(f'features must be a floating-point tensor, got {type(features).__name__}')
        if features.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise ValueError(f'features must be the (B, D) pooled pre-logit features of the batch of '
                             f'{logits.shape[0]}, got shape {tuple(features.shape)}')
        return features.to(logits.dtype)

    def numerators(self, logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor,
                   weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B,)`` ``n_i = (sum_k t_ik w_k l_ik) * influence factor`` for ``(B, C)`` float targets ``t``."""
        tw = target if weight is None else target * weight
        loss = (tw * self.class_losses(logits)).sum(dim=1)
        factor = influence_factor(F.softmax(logits, dim=1), target, features, self.alpha, self.epsilon)
        return loss * factor

    def forward(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None,
                features: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.active:
            return self.ce(logits, target, mix=mix)
        logits = self._check_logits(logits)
        features = self._check_features(features, logits)
        if isinstance(target, MixInfo):
            mix = target
        weight = self.weight
        if weight is not None:
            weight = weight.to(logits)
        C = self.num_classes
        if mix is None:
            t = self._check_target(target, logits)
            if not t.is_floating_point():
                t = F.one_hot(t, C).to(logits.dtype)
            per_sample = self.numerators(logits, t, features, weight)
        else:
            terms, smoothing = self.mix_terms(logits, mix)
            per_sample = 0.
            for y, share in terms:
                t = soft_target(y, C, smoothing).to(logits.dtype)
                per_sample = per_sample + share * self.numerators(logits, t, features, weight)
        if self.reduction == 'none':
            return per_sample
        total = per_sample.sum()
        return total if self.reduction == 'sum' else total / logits.shape[0]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.ce.set_epoch(epoch)

    def extra_repr(self) -> str:
        s = (f'alpha={self.alpha}, epsilon={self.epsilon}, start_epoch={self.start_epoch}, '
             f'weighting={self.weighting!r}')
        if self.gamma:
            s += f', gamma={self.gamma}'
        return s + ', ' + super().extra_repr()


@register_loss('ib_focal')
class IBFocalLoss(IBLoss):
    """IB with the focal per-class loss ``(1 - p)^gamma (-log p)`` (the authors' ``IBFocal``, gamma 1).

    Args: as :class:`IBLoss`, with ``gamma`` defaulting to 1.
    """

    def __init__(self, class_counts: ClassCounts, gamma: float = 1., **kwargs):
        super().__init__(class_counts, gamma=gamma, **kwargs)
