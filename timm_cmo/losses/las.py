"""Label-aware smoothing (LAS), the loss of MiSLAS's stage 2 (Zhong et al., CVPR 2021).

Class ``k`` with ``n_k`` training images gets its own smoothing ``eps_k``, from ``smooth_tail`` at the
rarest count ``n_min`` to ``smooth_head`` at the largest ``n_max``, along ``x_k = (n_k - n_min) /
(n_max - n_min)`` (classes are not sorted: ``eps_k`` is a function of ``n_k``). As MiSLAS's
``methods.py`` (``LabelAwareSmoothing``), with ``h = smooth_head``, ``t = smooth_tail``:

* ``concave`` (MiSLAS's default, used by all its configs): ``t + (h - t) sin(pi x / 2)``;
* ``linear``: ``t + (h - t) x``;
* ``convex``: ``h + (h - t) sin(3 pi / 2 + pi x / 2)`` (= ``h - (h - t) cos(pi x / 2)``);
* ``exp``: ``t + (h - t) x^power``.

The loss of a sample of class ``y`` is ``(1 - eps_y) (-log p_y) + eps_y mean_k(-log p_k)``, the
cross-entropy against ``(1 - eps_y) onehot(y) + eps_y / C``; MiSLAS averages it over the batch.
"""
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .long_tail import LongTailLoss
from .registry import register_loss
from .reweight import ClassCounts, check_class_counts

__all__ = ['LabelAwareSmoothingLoss', 'las_smoothing', 'LAS_SHAPES', 'LAS_DEFAULTS']

LAS_SHAPES = ('concave', 'linear', 'convex', 'exp')

# MiSLAS's stage-2 smoothing (dvlab-research/MiSLAS, config/<dataset>/*_stage2_mislas.yaml; no config sets
# the shape, so it is LabelAwareSmoothing's default 'concave'). CIFAR keys carry the imbalance factor
# (imb001 -> if100, imb002 -> if50, imb01 -> if10); 'cifar10' / 'cifar100' are the IF=100 settings.
LAS_DEFAULTS: Dict[str, Dict] = {
    'cifar10_if100': dict(smooth_head=0.3, smooth_tail=0.0, shape='concave'),
    'cifar10_if50': dict(smooth_head=0.2, smooth_tail=0.0, shape='concave'),
    'cifar10_if10': dict(smooth_head=0.1, smooth_tail=0.0, shape='concave'),
    'cifar100_if100': dict(smooth_head=0.4, smooth_tail=0.1, shape='concave'),
    'cifar100_if50': dict(smooth_head=0.3, smooth_tail=0.0, shape='concave'),
    'cifar100_if10': dict(smooth_head=0.2, smooth_tail=0.0, shape='concave'),
    'imagenet_lt': dict(smooth_head=0.3, smooth_tail=0.0, shape='concave'),
    'inat2018': dict(smooth_head=0.3, smooth_tail=0.0, shape='concave'),
    'places_lt': dict(smooth_head=0.4, smooth_tail=0.1, shape='concave'),
}
LAS_DEFAULTS['cifar10'] = LAS_DEFAULTS['cifar10_if100']
LAS_DEFAULTS['cifar100'] = LAS_DEFAULTS['cifar100_if100']


def las_smoothing(
        class_counts: ClassCounts,
        smooth_head: float = 0.4,
        smooth_tail: float = 0.1,
        shape: str = 'concave',
        power: Optional[float] = None,
) -> torch.Tensor:
    """Per-class smoothing ``eps_k`` of LAS (module docstring), computed in float64.

    Args:
        class_counts: (C,) training images per class, all positive.
        smooth_head: ``eps`` of the most frequent class(es), in [0, 1). Default 0.4.
        smooth_tail: ``eps`` of the rarest class(es), in [0, 1). Default 0.1.
        shape: One of :data:`LAS_SHAPES`. Default ``'concave'``.
        power: Exponent of ``'exp'`` (required there, > 0); ignored otherwise.

    Returns:
        (C,) float32 tensor. With all counts equal (MiSLAS divides by zero) every class gets ``smooth_head``.
    """
    counts = check_class_counts(class_counts)
    for name, value in (('smooth_head', smooth_head), ('smooth_tail', smooth_tail)):
        if not 0. <= float(value) < 1.:
            raise ValueError(f'{name} must be in [0, 1), got {value!r}')
    if shape not in LAS_SHAPES:
        raise ValueError(f'Unknown LAS shape {shape!r}; choose one of {list(LAS_SHAPES)}')
    if shape == 'exp' and not (power is not None and np.isfinite(power) and power > 0):
        raise ValueError(f"shape='exp' needs a finite power > 0, got power={power!r}")
    head, tail = float(smooth_head), float(smooth_tail)
    n_min, n_max = counts.min(), counts.max()
    x = (counts - n_min) / (n_max - n_min) if n_max > n_min else np.ones_like(counts)
    if shape == 'concave':
        eps = tail + (head - tail) * np.sin(x * np.pi / 2)
    elif shape == 'linear':
        eps = tail + (head - tail) * x
    elif shape == 'convex':
        eps = head + (head - tail) * np.sin(1.5 * np.pi + x * np.pi / 2)
    else:
        eps = tail + (head - tail) * np.power(x, float(power))
    return torch.tensor(eps, dtype=torch.float32)


@register_loss('las')
class LabelAwareSmoothingLoss(LongTailLoss):
    """Label-aware smoothing (MiSLAS): cross-entropy against ``(1 - eps_y) onehot(y) + eps_y / C``.

    ``l_ik = (1 - eps_k) (-log p_ik) + eps_k mean_j(-log p_ij)``, ``p = softmax(x)``, with the per-class
    ``eps`` of :func:`las_smoothing` kept as the (C,) float32 buffer ``smoothing``. Integer targets give
    MiSLAS's loss (the batch mean when unweighted); soft targets ``t`` give ``sum_k t_ik l_ik`` and
    ``mix=MixInfo`` the per-term form (see :mod:`timm_cmo.losses.long_tail`).

    Args:
        class_counts: (C,) training images per class.
        smooth_head: ``eps`` of the most frequent class, in [0, 1). Default 0.4.
        smooth_tail: ``eps`` of the rarest class, in [0, 1). Default 0.1.
        shape: ``'concave'`` (default), ``'linear'``, ``'convex'`` or ``'exp'``.
        power: Exponent of ``'exp'``.
        **kwargs: :class:`~timm_cmo.losses.long_tail.LongTailLoss` options (reweight, reduction, ...).

    MiSLAS's per-dataset settings are in :data:`LAS_DEFAULTS`:
    ``create_loss('las', counts, **LAS_DEFAULTS['cifar100_if100'])``.
    """

    def __init__(
            self,
            class_counts: ClassCounts,
            smooth_head: float = 0.4,
            smooth_tail: float = 0.1,
            shape: str = 'concave',
            power: Optional[float] = None,
            **kwargs,
    ):
        super().__init__(class_counts, **kwargs)
        self.smooth_head = float(smooth_head)
        self.smooth_tail = float(smooth_tail)
        self.shape = shape
        self.power = None if power is None else float(power)
        self.register_buffer('smoothing', las_smoothing(class_counts, smooth_head, smooth_tail, shape, power))

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        nll = -F.log_softmax(logits, dim=1)
        eps = self.smoothing.to(logits)
        return (1. - eps) * nll + eps * nll.mean(dim=1, keepdim=True)

    def hard_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nll = -F.log_softmax(logits, dim=1)
        eps = self.smoothing.to(logits)[target]
        return (1. - eps) * nll.gather(1, target.unsqueeze(1)).squeeze(1) + eps * nll.mean(dim=1)

    def extra_repr(self) -> str:
        s = f'smooth_head={self.smooth_head}, smooth_tail={self.smooth_tail}, shape={self.shape!r}'
        if self.shape == 'exp':
            s += f', power={self.power}'
        return s + ', ' + super().extra_repr()
