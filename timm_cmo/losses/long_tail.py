"""Long-tail losses: CE, LDAM, Balanced Softmax, focal and logit adjustment.

Every loss is an ``nn.Module`` called as ``loss(logits, target)`` with

* ``logits``: ``(B, C)`` float (float16/bfloat16 are computed in float32 and give a float32
  result; float32/float64 keep their dtype);
* ``target``: ``(B,)`` integer class indices (any integer dtype), or ``(B, C)`` float soft
  targets (CMO, timm Mixup/CutMix, label smoothing), non-negative.

Integer targets reproduce the LDAM-DRW / CMO code exactly (``F.cross_entropy`` on the
adjusted logits with ``weight=``). A soft target ``t`` gives the target-weighted sum of the
per-class losses ``l_ik`` (the loss sample ``i`` would get with integer target ``k``).

Normalisation (``reduction='mean'``), with ``w_k`` the current class weights (1 if none):

* integer targets: ``sum_i w_{y_i} l_{i y_i} / sum_i w_{y_i}`` (``F.cross_entropy``'s weighted
  mean; the plain batch mean when unweighted);
* soft targets: ``sum_i sum_k t_ik w_k l_ik / sum_i sum_k t_ik w_k`` (the batch mean of
  ``sum_k t_ik l_ik`` when unweighted and every row of ``t`` sums to 1).

``'sum'`` drops the denominator; ``'none'`` returns the ``(B,)`` numerators
(``w_{y_i} l_{i y_i}``, resp. ``sum_k t_ik w_k l_ik``).

CMO's loss: ``loss(logits, target, mix=info)`` with the batch's
:class:`~timm_cmo.data.cmo.MixInfo` (``loader.mix_info``: ``y_b``, ``y_f``, ``lam`` scalar or
``(B,)``, label ``smoothing``) computes the paper's ``lam * L(x, y_b) + (1 - lam) * L(x, y_f)``
with each term normalised by its own class weights, generalised to per-sample ``lam_i`` (elem
mode, Remix) and label smoothing as::

    L = sum_i lam_i n_i(y_b) / sum_i d_i(y_b) + sum_i (1 - lam_i) n_i(y_f) / sum_i d_i(y_f)

where ``n_i(y) = sum_k t_ik w_k l_ik`` and ``d_i(y) = sum_k t_ik w_k`` for the (smoothed)
one-hot target ``t`` of ``y`` (``w_{y_i} l_{i y_i}`` and ``w_{y_i}`` without smoothing). Without
class weights this equals the soft-target loss of ``mix.target(C)``; with them (``cb``, or
``drw`` once active) the soft target alone would be normalised jointly, which is not the
paper's loss. ``target`` may also be the ``MixInfo`` itself. ``'sum'`` gives the numerators'
sum, ``'none'`` the ``(B,)`` per-sample numerators of both terms.

Gradient accumulation (``--grad-accum-steps``): the denominators depend on the targets only, so
``loss.normalizer(target, mix)`` gives a batch's ``(2,)`` denominators ``[sum_i d_i(y_b), sum_i
d_i(y_f)]`` (an unmixed batch counts as ``y_f = y_b``), and ``loss(logits, target, mix=, norm=N)``
divides the batch's numerators by a given ``N`` instead of its own. With ``N`` the sum of the
micro-batches' normalizers, the micro-batch losses add up to the loss of their concatenation
(logits, labels and a per-sample ``lam`` concatenated; an unmixed micro-batch as ``lam = 1``), and
so do their gradients.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.cmo import MixInfo, soft_target
from .registry import register_loss
from .reweight import (
    REWEIGHT_CHOICES, ClassCounts, check_class_counts, check_finite, class_balanced_weights, resolve_drw_epoch)

__all__ = [
    'LongTailLoss', 'CrossEntropyLoss', 'LDAMLoss', 'BalancedSoftmaxLoss', 'FocalLoss',
    'LogitAdjustedLoss', 'ldam_margins',
]

_REDUCTIONS = ('mean', 'sum', 'none')


def ldam_margins(class_counts: ClassCounts, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins ``m_k ∝ n_k^(-1/4)``, scaled so the largest (rarest class) is ``max_m``.

    Returns a ``(C,)`` float32 tensor (computed in float64 as in the paper code's numpy).
    """
    counts = check_class_counts(class_counts)
    m = 1.0 / np.sqrt(np.sqrt(counts))
    m = m * (max_m / np.max(m))
    return torch.tensor(m, dtype=torch.float32)


def _check_values(ok: torch.Tensor, message, static_message: str) -> None:
    """Raise ``ValueError(message())`` unless ``ok`` is all true. No host sync on CUDA."""
    if ok.device.type == 'cuda':
        torch._assert_async(ok.all(), static_message)
    elif not bool(ok.all()):
        raise ValueError(message())


def _reduce(per_sample: torch.Tensor, norm: Union[torch.Tensor, int], reduction: str) -> torch.Tensor:
    if reduction == 'none':
        return per_sample
    total = per_sample.sum()
    return total if reduction == 'sum' else total / norm


def reduce_hard(
        losses: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], reduction: str,
) -> torch.Tensor:
    """Reduce ``(B,)`` unweighted losses of integer targets like ``F.cross_entropy(weight=)``."""
    if weight is None:
        return _reduce(losses, losses.numel(), reduction)
    w = weight[target]
    return _reduce(w * losses, w.sum(), reduction)


def reduce_soft(
        class_losses: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
        reduction: str,
) -> torch.Tensor:
    """Reduce ``(B, C)`` per-class losses ``l_ik`` with soft targets ``t_ik`` and weights ``w_k``.

    ``mean``: ``sum_ik t_ik w_k l_ik / sum_ik t_ik w_k``; ``sum``: the numerator;
    ``none``: ``(B,)`` ``sum_k t_ik w_k l_ik``.
    """
    tw = target if weight is None else target * weight
    return _reduce((tw * class_losses).sum(dim=1), tw.sum(), reduction)


class LongTailLoss(nn.Module):
    """Base class: class counts, re-weighting (none / cb / drw), input checks and reduction.

    Subclasses define :meth:`class_losses` (``(B, C)`` per-class losses ``l_ik``) and may
    override :meth:`hard_loss` (integer targets; default gathers ``l_{i y_i}``).

    Args:
        class_counts: ``(C,)`` per-class training image counts, all positive; kept as the
            float32 buffer ``class_counts``.
        reweight: ``'none'``; ``'cb'``: class-balanced weights (effective number, ``cb_beta``,
            summing to ``C``) throughout; ``'drw'``: no weights for ``epoch < drw_epoch``, the
            class-balanced weights from ``drw_epoch`` on (epoch set by :meth:`set_epoch`).
        drw_epoch: 0-based DRW epoch (``'drw'`` only). Default ``int(0.8 * epochs)``.
        epochs: total training epochs, used for the default ``drw_epoch``.
        cb_beta: effective-number beta. Default 0.9999.
        reduction: ``'mean'`` (default): ``sum_i w_{y_i} l_{i y_i} / sum_i w_{y_i}`` for integer
            targets, ``sum_ik t_ik w_k l_ik / sum_ik t_ik w_k`` for soft targets (``w_k = 1``
            when unweighted); ``'sum'``: the numerator; ``'none'``: its ``(B,)`` per-sample terms.
            With class weights, a soft target alone is normalised jointly; pass ``mix=`` for the
            paper's per-term form (see the module docstring).
        validate: check target values (range, non-negativity); shape checks always run. On
            CUDA the value checks are asynchronous asserts (no host sync). Turn off for a
            compiled fast path.

    ``needs_experts`` (class attribute, False here): True for losses that take a multi-expert model's
    training output instead of (B, C) logits (RIDE's); switch it on with ``model.set_expert_training(True)``.
    """
    needs_experts = False

    def __init__(
            self,
            class_counts: ClassCounts,
            reweight: str = 'none',
            drw_epoch: Optional[int] = None,
            epochs: Optional[int] = None,
            cb_beta: float = 0.9999,
            reduction: str = 'mean',
            validate: bool = True,
    ):
        super().__init__()
        counts = check_class_counts(class_counts)
        if reweight not in REWEIGHT_CHOICES:
            raise ValueError(f'Unknown reweight {reweight!r}; choose one of {list(REWEIGHT_CHOICES)}')
        if reduction not in _REDUCTIONS:
            raise ValueError(f'Unknown reduction {reduction!r}; choose one of {list(_REDUCTIONS)}')
        self.num_classes = len(counts)
        self.reweight = reweight
        self.cb_beta = float(cb_beta)
        self.drw_epoch = resolve_drw_epoch(drw_epoch, epochs) if reweight == 'drw' else None
        self.reduction = reduction
        self.validate = validate
        self.epoch = 0
        self.register_buffer('class_counts', torch.tensor(counts, dtype=torch.float32))
        weight = class_balanced_weights(counts, cb_beta) if reweight != 'none' else None
        self.register_buffer('class_weight', weight)
        self.graph_safe = False  # see make_graph_safe
        self.register_buffer('drw_weight', None, persistent=False)

    @property
    def log_prior(self) -> torch.Tensor:
        """``(C,)`` ``log(n_k / N)``."""
        counts = self.class_counts.double()
        return torch.log(counts / counts.sum()).float()

    @property
    def weight(self) -> Optional[torch.Tensor]:
        """The class weights in force at the current epoch: None or a ``(C,)`` tensor (graph-safe DRW: always the
        ``(C,)`` buffer ``drw_weight``, ones before the switch; see :meth:`make_graph_safe`)."""
        if self.graph_safe and self.drw_weight is not None:
            return self.drw_weight
        return self.class_weight if self.weights_in_force else None

    @property
    def weights_in_force(self) -> bool:
        """Whether class weights apply at the current epoch (``cb``; ``drw`` from ``drw_epoch`` on)."""
        return self.class_weight is not None and (self.drw_epoch is None or self.epoch >= self.drw_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the (0-based) training epoch; only DRW depends on it."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f'epoch must be a non-negative integer, got {epoch!r}')
        self.epoch = int(epoch)
        if self.graph_safe:
            self._update_graph_state()

    def make_graph_safe(self) -> 'LongTailLoss':
        """Keep the epoch-dependent state in device buffers that :meth:`set_epoch` updates in place, so that a step
        captured once (a CUDA graph, ``torch.compile(fullgraph=True)``) follows it: with DRW the weights in force
        become the (C,) buffer ``drw_weight``, ones before ``drw_epoch`` (the unweighted loss, to float round-off)
        and the class-balanced weights from it on. The target value checks (``validate``), which read the targets
        on the host, are switched off. Call after moving the loss to its device; returns the loss."""
        self.graph_safe = True
        self.validate = False
        if self.drw_epoch is not None and self.class_weight is not None and self.drw_weight is None:
            self.drw_weight = torch.ones_like(self.class_weight)
        self._update_graph_state()
        return self

    def _update_graph_state(self) -> None:
        """The graph-safe buffers of the current epoch, written in place (no new tensor: a graph reads them)."""
        if self.drw_weight is not None:
            if self.weights_in_force:
                self.drw_weight.copy_(self.class_weight)
            else:
                self.drw_weight.fill_(1.)

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` losses ``l_ik`` that sample ``i`` would get with integer target ``k``."""
        raise NotImplementedError

    def hard_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` unweighted losses ``l_{i y_i}`` of int64 targets."""
        return self.class_losses(logits).gather(1, target.unsqueeze(1)).squeeze(1)

    def hard_loss(
            self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Reduced loss for ``(B,)`` int64 targets."""
        return reduce_hard(self.hard_losses(logits, target), target, weight, self.reduction)

    def _term(
            self, logits: torch.Tensor, y: torch.Tensor, smoothing: float, weight: Optional[torch.Tensor],
            class_losses: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample numerators ``n_i`` and denominators ``d_i`` (see the module docstring) of target ``y``."""
        if smoothing == 0:
            losses = self.hard_losses(logits, y)
            if weight is None:
                return losses, torch.ones_like(losses)
            w = weight[y]
            return w * losses, w
        t = soft_target(y, self.num_classes, smoothing).to(logits.dtype)
        tw = t if weight is None else t * weight
        return (tw * class_losses).sum(dim=1), tw.sum(dim=1)

    def _denominator(self, y: torch.Tensor, smoothing: float, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``sum_i d_i(y)`` of integer labels ``y`` (float64 scalar), as :meth:`_term` sums them."""
        if smoothing == 0:
            return y.new_tensor(float(y.numel()), dtype=torch.float64) if weight is None else weight[y].sum()
        t = soft_target(y, self.num_classes, smoothing).to(torch.float64)
        return (t if weight is None else t * weight).sum()

    def normalizer(self, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None) -> torch.Tensor:
        """The ``(2,)`` float64 denominators of this batch's ``'mean'`` loss: ``[sum_i d_i(y_b), sum_i d_i(y_f)]``
        (module docstring; both the same for a batch without ``mix``). Sums of these over micro-batches, passed
        as ``norm=``, make the micro-batch losses add up to the loss of their concatenation."""
        if isinstance(target, MixInfo):
            mix = target
        weight = self.weight
        if mix is not None:
            device = mix.y_b.device
            weight = None if weight is None else weight.to(device, torch.float64)
            smoothing = float(getattr(mix, 'smoothing', 0.0))
            return torch.stack([self._denominator(mix.y_b.long(), smoothing, weight),
                                self._denominator(mix.y_f.long(), smoothing, weight)])
        weight = None if weight is None else weight.to(target.device, torch.float64)
        if target.is_floating_point():
            d = (target.double() if weight is None else target.double() * weight).sum()
        else:
            d = self._denominator(target.long(), 0.0, weight)
        return torch.stack([d, d])

    def mix_terms(
            self, logits: torch.Tensor, mix,
    ) -> Tuple[List[Tuple[torch.Tensor, Union[float, torch.Tensor]]], float]:
        """``([(y, share), ...], smoothing)`` of a mix: ``(y_b, lam)`` and, unless ``lam == 1``, ``(y_f, 1 - lam)``.

        ``y`` are checked ``(B,)`` int64 labels; ``share`` a float or a ``(B,)`` tensor in the logits' dtype. A tensor
        ``lam`` gives ``1 - lam`` in the wider of its dtype and the logits' (a float64 ``lam`` the shares a float
        ``lam`` gives).
        """
        y_b = self._check_target(mix.y_b, logits)
        lam = mix.lam
        smoothing = float(getattr(mix, 'smoothing', 0.0))
        terms = [(y_b, lam)]
        if isinstance(lam, torch.Tensor):
            lam = lam.to(logits.device, torch.promote_types(lam.dtype, logits.dtype)).reshape(-1)
            if lam.shape[0] != logits.shape[0]:
                raise ValueError(f'mix.lam has {lam.shape[0]} entries for a batch of {logits.shape[0]}')
            terms = [(y_b, lam.to(logits.dtype)), (self._check_target(mix.y_f, logits), (1. - lam).to(logits.dtype))]
        elif lam != 1.:
            terms.append((self._check_target(mix.y_f, logits), 1. - float(lam)))
        return terms, smoothing

    def mixed_loss(self, logits: torch.Tensor, mix, weight: Optional[torch.Tensor],
                   norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-term loss of a mix (module docstring); ``logits`` already checked and promoted; ``norm``: the
        ``(2,)`` denominators to divide the two terms by instead of their own (``'mean'`` only)."""
        terms, smoothing = self.mix_terms(logits, mix)
        class_losses = self.class_losses(logits) if smoothing else None
        per_sample, total = 0., 0.
        for i, (y, share) in enumerate(terms):
            num, den = self._term(logits, y, smoothing, weight, class_losses)
            num = share * num
            per_sample = per_sample + num
            if self.reduction == 'mean':
                total = total + num.sum() / (den.sum() if norm is None else norm[i].to(num))
        if self.reduction == 'none':
            return per_sample
        return per_sample.sum() if self.reduction == 'sum' else total

    def _check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise ValueError(f'logits must be a floating-point tensor, got {_describe(logits)}')
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f'logits must have shape (B, {self.num_classes}) (batch, classes), got shape '
                f'{tuple(logits.shape)}')
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _check_target(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, torch.Tensor):
            raise ValueError(f'target must be a tensor, got {_describe(target)}')
        C = self.num_classes
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(
                    f'soft targets must have the shape of the logits {tuple(logits.shape)}, '
                    f'got {tuple(target.shape)}')
            if self.validate:
                _check_values(
                    target >= 0,
                    lambda: f'soft targets must be non-negative; found {target.min().item():g}',
                    'soft targets must be non-negative')
            return target.to(logits.dtype)
        if target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f'target must be integer class indices or float soft targets, got {target.dtype}')
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f'integer targets must have shape ({logits.shape[0]},) to match logits '
                f'{tuple(logits.shape)}, got {tuple(target.shape)}')
        if self.validate:
            _check_values(
                (target >= 0) & (target < C),
                lambda: f'target class indices must be in [0, {C}); got '
                        f'{target[(target < 0) | (target >= C)][0].item()}',
                f'target class indices must be in [0, {C})')
        return target.long()

    def forward(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo],
                mix: Optional[MixInfo] = None, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Loss of ``(B, C)`` logits against ``(B,)`` integer or ``(B, C)`` soft targets.

        With ``mix`` (or a :class:`~timm_cmo.data.cmo.MixInfo` as ``target``) the loss is the
        paper's per-term CMO loss of the mix; ``target`` is then not read. ``norm``: ``(2,)``
        denominators (sums of :meth:`normalizer`) that replace the batch's own (``'mean'`` only).
        """
        logits = self._check_logits(logits)
        if isinstance(target, MixInfo):
            mix = target
        weight = self.weight
        if weight is not None:
            weight = weight.to(logits)
        if norm is not None and self.reduction != 'mean':
            raise ValueError(f"norm= applies to reduction='mean', not {self.reduction!r}")
        if mix is not None:
            return self.mixed_loss(logits, mix, weight, norm)
        target = self._check_target(target, logits)
        if norm is not None:
            if target.is_floating_point():
                num = reduce_soft(self.class_losses(logits), target, weight, 'sum')
            else:
                num = reduce_hard(self.hard_losses(logits, target), target, weight, 'sum')
            return num / norm[0].to(num)
        if target.is_floating_point():
            return reduce_soft(self.class_losses(logits), target, weight, self.reduction)
        return self.hard_loss(logits, target, weight)

    def extra_repr(self) -> str:
        s = f'num_classes={self.num_classes}, reweight={self.reweight!r}'
        if self.reweight != 'none':
            s += f', cb_beta={self.cb_beta}'
        if self.drw_epoch is not None:
            s += f', drw_epoch={self.drw_epoch}'
        return s + f', reduction={self.reduction!r}'


def _describe(x) -> str:
    return f'{type(x).__name__} of dtype {x.dtype}' if isinstance(x, torch.Tensor) else repr(type(x))


class _OffsetCrossEntropy(LongTailLoss):
    """Cross-entropy on ``logits + offset`` (a fixed ``(C,)`` buffer, or None for plain CE)."""

    offset: Optional[torch.Tensor]

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.offset is None else logits + self.offset.to(logits)

    def hard_loss(self, logits, target, weight):
        return F.cross_entropy(self._adjusted(logits), target, weight=weight, reduction=self.reduction)

    def hard_losses(self, logits, target):
        return F.cross_entropy(self._adjusted(logits), target, reduction='none')

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        return -F.log_softmax(self._adjusted(logits), dim=1)


@register_loss('ce')
class CrossEntropyLoss(_OffsetCrossEntropy):
    """Cross-entropy, optionally with per-class weights.

    ``l_ik = -log softmax(x_i)_k``. Class weights come either from ``reweight`` ('cb', 'drw')
    or from an explicit ``weight`` (then ``reweight`` must be 'none'); weighted losses
    normalise as ``F.cross_entropy(weight=)`` (see the module docstring).

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        weight: optional explicit ``(C,)`` non-negative class weights, used as given.
        **kwargs: :class:`LongTailLoss` options (reweight, drw_epoch, epochs, cb_beta,
            reduction, validate).
    """

    def __init__(
            self,
            class_counts: ClassCounts,
            weight: Optional[Union[Sequence[float], torch.Tensor]] = None,
            **kwargs,
    ):
        super().__init__(class_counts, **kwargs)
        self.register_buffer('offset', None)
        if weight is not None:
            if self.reweight != 'none':
                raise ValueError(
                    f"pass either an explicit weight or reweight={self.reweight!r}, not both")
            w = torch.as_tensor(weight, dtype=torch.float32).detach().cpu()
            if w.shape != (self.num_classes,):
                raise ValueError(f'weight must have shape ({self.num_classes},), got {tuple(w.shape)}')
            if not bool((torch.isfinite(w) & (w >= 0)).all()):
                raise ValueError(f'weight must be finite and non-negative, got {w.tolist()}')
            self.class_weight = w.clone()


@register_loss('ldam')
class LDAMLoss(LongTailLoss):
    """LDAM loss (Cao et al., NeurIPS 2019), as in the LDAM-DRW / CMO code.

    Margins ``m_k = c / n_k^(1/4)`` with ``c`` such that ``max_k m_k = max_m``. For integer
    targets the target logit is lowered by its margin and the result scaled by ``s``:
    ``F.cross_entropy(s * (x - m_y e_y), y, weight=w)``. Meant for a cosine-normalised
    classifier (logits in [-1, 1]). For soft targets ``l_ik = -log softmax(s (x_i - m_k e_k))_k``
    (the margin applies to class ``k`` only), computed stably in O(B C). Weighted losses
    normalise as described in the module docstring.

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        max_m: largest margin (rarest class). Default 0.5.
        s: logit scale. Default 30.
        **kwargs: :class:`LongTailLoss` options.
    """

    def __init__(self, class_counts: ClassCounts, max_m: float = 0.5, s: float = 30.0, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.max_m = check_finite('max_m', max_m)
        self.s = check_finite('s', s, positive=True)
        self.register_buffer('margins', ldam_margins(self.class_counts, max_m))

    def _margin_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the paper code's forward, with the one-hot matmul written as a gather (exact)
        index = F.one_hot(target, self.num_classes).bool()
        batch_m = self.margins.to(logits)[target].unsqueeze(1)
        return self.s * torch.where(index, logits - batch_m, logits)

    def hard_loss(self, logits, target, weight):
        return F.cross_entropy(self._margin_logits(logits, target), target, weight=weight, reduction=self.reduction)

    def hard_losses(self, logits, target):
        return F.cross_entropy(self._margin_logits(logits, target), target, reduction='none')

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        # With d = x - max_j x_j <= 0 and z = s d (the max entry is 0), the loss of class k is
        #   l_ik = log(1 + others_ik * exp(s (m_k - d_ik))) = softplus(s (m_k - d_ik) + log others_ik),
        # others_ik = sum_{j != k} exp(z_ij). For k not the argmax, others = S - exp(z_ik) >= 1
        # (no cancellation); for the argmax it is a logsumexp over the other columns.
        s, C = self.s, self.num_classes
        top, argmax = logits.detach().max(dim=1, keepdim=True)  # shift only: the loss is invariant
        d = logits - top
        z = s * d
        e = torch.exp(z)
        is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, argmax, True)
        log_others = torch.log((e.sum(dim=1, keepdim=True) - e).clamp_min(torch.finfo(e.dtype).tiny))
        if C > 1:
            top_others = z.masked_fill(is_top, float('-inf')).logsumexp(dim=1, keepdim=True)
            log_others = torch.where(is_top, top_others, log_others)
        else:  # a single class: the loss is 0
            log_others = torch.full_like(z, float('-inf'))
        return F.softplus(s * (self.margins.to(logits) - d) + log_others)

    def extra_repr(self) -> str:
        return f'max_m={self.max_m}, s={self.s}, ' + super().extra_repr()


@register_loss('bs')
class BalancedSoftmaxLoss(_OffsetCrossEntropy):
    """Balanced Softmax (Ren et al., NeurIPS 2020): cross-entropy on ``logits + log(n_k / N)``.

    Weighted losses normalise as described in the module docstring.

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        **kwargs: :class:`LongTailLoss` options.
    """

    def __init__(self, class_counts: ClassCounts, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.register_buffer('offset', self.log_prior)


@register_loss('la')
class LogitAdjustedLoss(_OffsetCrossEntropy):
    """Logit-adjusted loss (Menon et al., ICLR 2021): cross-entropy on ``logits + tau * log(n_k / N)``.

    Weighted losses normalise as described in the module docstring.

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        tau: adjustment strength. Default 1.0 (= Balanced Softmax).
        **kwargs: :class:`LongTailLoss` options.
    """

    def __init__(self, class_counts: ClassCounts, tau: float = 1.0, **kwargs):
        super().__init__(class_counts, **kwargs)
        if not np.isfinite(tau):
            raise ValueError(f'tau must be finite, got {tau!r}')
        self.tau = float(tau)
        self.register_buffer('offset', (self.tau * self.log_prior.double()).float())

    def extra_repr(self) -> str:
        return f'tau={self.tau}, ' + super().extra_repr()


def focal_class_losses(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(B, C)`` focal losses ``-(1 - p_ik)^gamma log p_ik``, ``p = softmax(logits)`` (``-log p_ik`` at gamma 0)."""
    logp = F.log_softmax(logits, dim=1)
    if gamma == 0:
        return -logp
    one_minus_p = (-torch.expm1(logp)).clamp_min(torch.finfo(logp.dtype).tiny)
    return one_minus_p.pow(gamma) * -logp


@register_loss('focal')
class FocalLoss(LongTailLoss):
    """Focal loss (Lin et al., ICCV 2017): ``l_ik = -(1 - p_ik)^gamma log p_ik``, ``p = softmax(x)``.

    The LDAM-DRW code's extra factor of 10 is not kept. Class weights (cb / drw) act as the
    per-class ``alpha`` and normalise like the other losses (module docstring); note the paper
    code instead took ``p_t`` from the *weighted* CE and averaged without normalising.

    Args:
        class_counts: ``(C,)`` per-class training image counts.
        gamma: focusing parameter >= 0. Default 1.0 (the LDAM-DRW focal setting); 0 is CE.
        **kwargs: :class:`LongTailLoss` options.
    """

    def __init__(self, class_counts: ClassCounts, gamma: float = 1.0, **kwargs):
        super().__init__(class_counts, **kwargs)
        self.gamma = check_finite('gamma', gamma)

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        return focal_class_losses(logits, self.gamma)

    def extra_repr(self) -> str:
        return f'gamma={self.gamma}, ' + super().extra_repr()
