"""LADE (Hong et al., CVPR 2021): the PC softmax plus the label-distribution disentangling regulariser.

As hyperconnect/LADE trains it (``PriorCELoss`` weight 1 + ``LADELoss`` weight ``alpha``), with ``f = logits``
(B, C), training class counts ``n_c`` (prior ``p_c = n_c / N``), batch size ``B``::

    L = CE(f + log p, y) + alpha * R(f, y)                         (PC softmax = Balanced Softmax)
    R = - sum_c p_c * (T1_c - T2_c - lambda * T2_c^2)
    T1_c = mean_{i: y_i = c} f_ic                                   (0 for a class absent from the batch)
    T2_c = log( 1/B sum_i exp(f_ic - log p_c + log(1/C)) )          (over the whole batch)

``T1 - T2`` is LADE's Donsker-Varadhan lower bound of ``KL(P(x | c) || P_u(x))`` (``P_u`` the balanced
marginal) with the logit of class ``c`` as critic: ``T1`` the mean over the class's samples, ``T2`` the log-mean-exp
over the batch with the logits shifted by ``log p_u(c) - log p_s(c)`` (the authors' estimate of the balanced
expectation); ``lambda`` (``remine_lambda``) is ReMINE's penalty keeping ``T2`` near 0, and ``p_c`` LADE's class
weights.
Every class enters ``R``, present in the batch or not (as in the authors' code). Their guards
(``log(p + 1e-9)``, ``n + 1e-8``) are left out: every count here is positive.

**Evaluation.** The raw logits model the balanced posterior: LADE predicts with ``f + log p_test``, which on a
balanced test set is a constant shift, so the authors' balanced-test figures are those of the raw logits (what
train_cmo.py evaluates). For a shifted test prior use :meth:`LADELoss.prior_corrected_logits`
(:func:`~timm_cmo.losses.prior.prior_corrected_logits` with ``logits_prior=None``).

**Mixed batches** (``mix=MixInfo``): the paper's per-term form ``lam * L(y_b) + (1 - lam) * L(y_f)``. The CE
term is :class:`~timm_cmo.losses.long_tail.BalancedSoftmaxLoss`'s; in ``R`` only ``T1`` depends on the labels,
so ``T1_c = lam * T1_c(y_b) + (1 - lam) * T1_c(y_f)`` and ``T2`` enters once. Per-sample ``lam_i`` (elem mode,
Remix) generalise it as the other losses do:
``T1_c = sum_i lam_i [y_b,i = c] f_ic / n_c(y_b) + sum_i (1 - lam_i) [y_f,i = c] f_ic / n_c(y_f)``.
Label smoothing smooths the CE target only: the class membership in ``T1`` stays the labels'. A soft target
``t`` without ``mix`` is taken as soft membership, ``T1_c = sum_i t_ic f_ic / sum_i t_ic`` (so, unlike the
per-term form, a mix's soft target alone is normalised jointly, as weighted losses are; pass ``mix=``).

The authors' settings (configs and README commands of hyperconnect/LADE) are in :data:`LADE_DEFAULTS`.
Under DDP each process estimates ``R`` on its own part of the batch (the authors' DataParallel used the whole
batch).
"""
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..data.cmo import MixInfo
from .long_tail import BalancedSoftmaxLoss
from .prior import Prior, prior_corrected_logits
from .registry import register_loss
from .reweight import ClassCounts, check_finite

__all__ = ['LADELoss', 'LADE_DEFAULTS', 'lade_regularizer']

LADE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'cifar100_lt': dict(alpha=0.1, remine_lambda=0.01),
    'imagenet_lt': dict(alpha=0.05, remine_lambda=0.5),
    'inat2018': dict(alpha=0.05, remine_lambda=0.5),
    'places_lt': dict(alpha=0.005, remine_lambda=0.1),
}
"""LADE's regulariser weight and ReMINE lambda per dataset: the README's commands (CIFAR-100-LT at rho 100
``--remine_lambda 0.01 --alpha 0.1``; ImageNet-LT ``0.5 / 0.05`` with ResNeXt-50; iNaturalist ``--alpha 0.05`` with
the config's ``remine_lambda 0.5``; Places-LT ``0.1 / 0.005``). The configs alone hold ``alpha 0.1``,
``remine_lambda 0.1`` (iNaturalist 0.05 / 0.5), the class defaults here. No CIFAR-10 setting is published."""

Membership = List[Tuple[Union[float, torch.Tensor], torch.Tensor]]


def lade_regularizer(
        logits: torch.Tensor, memberships: Membership, prior: torch.Tensor, remine_lambda: float,
) -> torch.Tensor:
    """LADE's ``R`` (module docstring) of ``(B, C)`` logits.

    Args:
        logits: ``(B, C)``.
        memberships: ``[(share, M), ...]``: ``M`` (B, C) non-negative class memberships (one-hot labels), ``share``
            a float or (B,) per-sample weight; ``T1`` is the sum over the entries of
            ``sum_i share_i M_ic f_ic / sum_i M_ic``.
        prior: ``(C,)`` training prior ``p_c`` (sums to 1).
        remine_lambda: ReMINE's ``lambda``.
    """
    B, C = logits.shape
    t1 = logits.new_zeros(C)
    for share, m in memberships:
        if isinstance(share, torch.Tensor):
            share = share.reshape(-1, 1)
        num = (share * m * logits).sum(dim=0)
        den = m.sum(dim=0)
        t1 = t1 + torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    log_prior = torch.log(prior)
    t2 = torch.logsumexp(logits - log_prior - math.log(C), dim=0) - math.log(B)
    return -(prior * (t1 - t2 - remine_lambda * t2 * t2)).sum()


@register_loss('lade')
class LADELoss(BalancedSoftmaxLoss):
    """LADE: PC softmax (Balanced Softmax) + ``alpha`` * LADE regulariser (module docstring).

    Call as ``loss(logits, target, mix=None)``; returns the scalar batch loss (``reduction='mean'`` only: the
    regulariser is a statistic of the batch, not a sum over samples).

    Args:
        class_counts: ``(C,)`` training images per class.
        alpha: Weight of the regulariser. Default 0.1 (LADE's configs; 0.05 on ImageNet-LT and iNaturalist).
        remine_lambda: ReMINE penalty. Default 0.1 (LADE's configs; 0.01 in its CIFAR-100-LT command, 0.5 on
            ImageNet-LT and iNaturalist); see :data:`LADE_DEFAULTS`.
        **kwargs: :class:`~timm_cmo.losses.long_tail.LongTailLoss` options; ``reweight`` ('cb', 'drw') weighs the
            PC-softmax term only (LADE itself trains unweighted; the regulariser keeps its ``p_c``).
    """
    logits_prior = 'uniform'  # the raw logits model the balanced posterior (see prior_corrected_logits)

    # --grad-accum-steps scales each micro-batch's loss by its share of the samples: exact for the PC-softmax term,
    # while the regulariser is then computed per micro-batch (as per process under DDP)
    normalizer = None

    def __init__(self, class_counts: ClassCounts, alpha: float = 0.1, remine_lambda: float = 0.1, **kwargs):
        if kwargs.get('reduction', 'mean') != 'mean':
            raise ValueError(f"LADELoss supports reduction='mean' only, got {kwargs['reduction']!r}")
        super().__init__(class_counts, **kwargs)
        self.alpha = check_finite('alpha', alpha)
        self.remine_lambda = check_finite('remine_lambda', remine_lambda)

    def prior(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(C,)`` training prior ``n_c / N`` in ``dtype`` (computed in float64)."""
        counts = self.class_counts.double()
        return (counts / counts.sum()).to(dtype)

    def memberships(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo],
                    mix: Optional[MixInfo] = None) -> Membership:
        """The ``(share, membership)`` terms of ``R`` for a target or a mix (module docstring)."""
        if isinstance(target, MixInfo):
            mix = target
        C = self.num_classes
        if mix is None:
            t = self._check_target(target, logits)
            return [(1., t if t.is_floating_point() else F.one_hot(t, C).to(logits.dtype))]
        terms, _ = self.mix_terms(logits, mix)  # label smoothing is the CE target's, not class membership
        return [(share, F.one_hot(y, C).to(logits.dtype)) for y, share in terms]

    def regularizer(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo],
                    mix: Optional[MixInfo] = None) -> torch.Tensor:
        """LADE's ``R`` alone (unweighted by ``alpha``)."""
        logits = self._check_logits(logits)
        return lade_regularizer(logits, self.memberships(logits, target, mix), self.prior(logits.dtype).to(
            logits.device), self.remine_lambda)

    def forward(self, logits: torch.Tensor, target: Union[torch.Tensor, MixInfo],
                mix: Optional[MixInfo] = None) -> torch.Tensor:
        loss = super().forward(logits, target, mix=mix)
        if self.alpha == 0:
            return loss
        return loss + self.alpha * self.regularizer(logits, target, mix)

    def prior_corrected_logits(self, logits: torch.Tensor, test_prior: Optional[Prior] = None) -> torch.Tensor:
        """LADE's test-time correction ``logits + log p_test``; None (a balanced test set): the logits unchanged."""
        return prior_corrected_logits(logits, test_prior, logits_prior=None)

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, remine_lambda={self.remine_lambda}, ' + super().extra_repr()
