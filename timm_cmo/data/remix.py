""" Remix (Chou et al., ECCV-W 2020): in-batch Mixup / CutMix with labels rebalanced towards the minority.

The images of a batch are mixed with a random permutation of the batch as in Mixup (or CutMix), with one
lambda ~ Beta(alpha, alpha) per batch, but the label weight is set per sample from the training-set sizes
``n_i = n_{y_i}`` and ``n_j = n_{y_perm(i)}`` of the two classes (the paper's Eq. 10)::

    lam_y = 0    if n_i / n_j >= kappa     and lam < tau      (the partner is the minority: its label only)
    lam_y = 1    if n_i / n_j <= 1 / kappa and 1 - lam < tau  (sample i is the minority: its label only)
    lam_y = lam  otherwise

The inequalities on the count ratio are inclusive and those on ``tau`` strict, as in the public Remix
implementations (BagofTricks-LT ``lib/core/combiner.py``, imbalanced-DL ``trainer/remix.py``); both draw
one lambda per batch. Defaults are the paper's: kappa 3, tau 0.5, alpha 1.

Like :class:`~timm_cmo.data.cmo.CMOMixup` it runs on device tensors with the random numbers (whether to
mix, lambda, the permutation, the box) drawn on the host from a seeded numpy Generator: no host sync.
"""
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..losses.reweight import ClassCounts, check_class_counts
from .cmo import MixInfo, check_batch, host_to_device, rand_bbox, soft_target

__all__ = ['RemixMixup', 'REMIX_MODES', 'remix_label_weights']

REMIX_MODES = ('mixup', 'cutmix')


def remix_label_weights(
        lam: Union[float, np.ndarray],
        n_i: torch.Tensor,
        n_j: torch.Tensor,
        kappa: float = 3.0,
        tau: float = 0.5,
) -> torch.Tensor:
    """Remix's per-sample label weights of sample i (``lam_y * y_i + (1 - lam_y) * y_j``).

    Args:
        lam: Image mixing weight of sample i (the kept fraction of it for CutMix); or an (R,) array, one per row
            of (R, B) counts (the batches of an epoch at once).
        n_i, n_j: (B,) (or (R, B)) training images of the classes of sample i and of its partner j.
        kappa: Count-ratio threshold (> 1). Default 3.
        tau: Lambda threshold in (0, 1). Default 0.5.

    Returns:
        (B,) (or (R, B)) float32 ``lam_y``. The ratio tests are done as ``n_i >= kappa n_j`` and ``kappa n_i <= n_j``
        in the dtype of the counts (float64 recommended: exact for integer counts).
    """
    if np.ndim(lam) == 0:
        lam_y = torch.full(n_i.shape, float(lam), dtype=torch.float32, device=n_i.device)
        if lam < tau:  # the partner dominates the image: give it all the label if it is the minority
            lam_y = lam_y.masked_fill(n_i >= kappa * n_j, 0.)
        if 1. - lam < tau:  # sample i dominates the image: give it all the label if it is the minority
            lam_y = lam_y.masked_fill(kappa * n_i <= n_j, 1.)
        return lam_y
    lam = np.asarray(lam, dtype=np.float64)  # the same tests, row by row
    view = (-1,) + (1,) * (n_i.ndim - 1)
    device = n_i.device
    lam_y = host_to_device(lam.astype(np.float32), device).view(view).expand(n_i.shape)
    lam_y = lam_y.masked_fill(host_to_device(lam < tau, device).view(view) & (n_i >= kappa * n_j), 0.)
    return lam_y.masked_fill(host_to_device(1. - lam < tau, device).view(view) & (kappa * n_i <= n_j), 1.)


class RemixMixup:
    """Mix a batch with a permutation of itself, labels rebalanced the Remix way.

    Call as ``x, target = remix(x, y)`` with ``x`` (B, C, H, W) float and ``y`` (B,) int64 on the device:
    with probability ``prob`` the batch is mixed, ``x`` in place (as timm's ``Mixup``), and
    ``target = lam_y * soft(y) + (1 - lam_y) * soft(y[perm])``, (B, num_classes) float32. The labels and
    per-sample label weights are in :attr:`last` (a :class:`~timm_cmo.data.cmo.MixInfo` with a (B,) ``lam``;
    ``MixInfo(y, y, 1.0, smoothing)`` for an unmixed batch), for ``loss(logits, target, mix=remix.last)``.

    Args:
        num_classes: Number of classes C.
        class_counts: (C,) training images per class, all positive.
        kappa: Count-ratio threshold, > 1. Default 3.0.
        tau: Lambda threshold, in (0, 1). Default 0.5.
        alpha: lambda ~ Beta(alpha, alpha), > 0. Default 1.0.
        mode: ``'mixup'``: ``x = lam * x + (1 - lam) * x[perm]``; ``'cutmix'``: a box of ``x[perm]``
            (:func:`~timm_cmo.data.cmo.rand_bbox`) pasted into ``x``, lambda re-set to the kept area.
        prob: Probability of mixing a batch. Default 1.0.
        label_smoothing: timm-style label smoothing of the soft targets. Default 0.
        seed: Seed of the host random generator; reset it with :meth:`reseed`.
    """

    def __init__(
            self,
            num_classes: int,
            class_counts: ClassCounts,
            kappa: float = 3.0,
            tau: float = 0.5,
            alpha: float = 1.0,
            mode: str = 'mixup',
            prob: float = 1.0,
            label_smoothing: float = 0.0,
            seed: Optional[int] = None,
    ):
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        counts = check_class_counts(class_counts)
        if len(counts) != num_classes:
            raise ValueError(f'class_counts has {len(counts)} entries for num_classes={num_classes}')
        if not kappa > 1:
            raise ValueError(f'kappa must be > 1, got {kappa}')
        if not 0. < tau < 1.:
            raise ValueError(f'tau must be in (0, 1), got {tau}')
        if not alpha > 0:
            raise ValueError(f'alpha must be > 0, got {alpha}')
        if mode not in REMIX_MODES:
            raise ValueError(f'mode must be one of {REMIX_MODES}, got {mode!r}')
        if not 0. <= prob <= 1.:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        if not 0. <= label_smoothing < 1.:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        self.num_classes = num_classes
        self.class_counts = counts  # float64 (C,)
        self.kappa = float(kappa)
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.mode = mode
        self.prob = float(prob)
        self.label_smoothing = float(label_smoothing)
        self.last: Optional[MixInfo] = None
        self._device_counts: Optional[torch.Tensor] = None
        self.reseed(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Reset the host random generator (mixing decisions, lambda, permutations, boxes)."""
        self.rng = np.random.default_rng(seed)

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """Soft targets (B, C) of unmixed labels."""
        return soft_target(y, self.num_classes, self.label_smoothing)

    def _counts_on(self, device: torch.device) -> torch.Tensor:
        if self._device_counts is None or self._device_counts.device != device:
            self._device_counts = host_to_device(self.class_counts, device)
        return self._device_counts

    def draw(self, batch_size: int, img_shape: Tuple[int, int]) -> Optional[Dict[str, Any]]:
        """The host random numbers of one batch, drawn from :attr:`rng` in the order :meth:`__call__` uses them
        (the graph-safe batches of :mod:`~timm_cmo.data.device_draws` read the same ones): None for a batch left
        unmixed, else ``lam`` (float; the kept area for CutMix), ``perm`` ((B,) int64 partners) and, for CutMix,
        ``box`` = (y0, y1, x0, x1)."""
        if self.prob < 1. and self.rng.random() >= self.prob:
            return None
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = self.rng.permutation(batch_size)
        if self.mode == 'mixup':
            return dict(lam=lam, perm=perm)
        img_h, img_w = img_shape
        y0, y1, x0, x1 = rand_bbox((img_h, img_w), lam, self.rng)
        return dict(lam=1. - (y1 - y0) * (x1 - x0) / float(img_h * img_w), perm=perm, box=(y0, y1, x0, x1))

    def label_weights(self, lam: Union[float, np.ndarray], y: torch.Tensor, y_perm: torch.Tensor) -> torch.Tensor:
        """(B,) float32 Remix label weights of labels ``y`` mixed with ``y_perm`` at image weight ``lam`` (or
        (R, B) of R batches, ``lam`` (R,): see :func:`remix_label_weights`)."""
        counts = self._counts_on(y.device)
        return remix_label_weights(lam, counts[y], counts[y_perm], self.kappa, self.tau)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix with probability ``prob``; returns (x (B, C, H, W), target (B, num_classes) float32)."""
        check_batch(x, y)
        drawn = self.draw(x.shape[0], tuple(x.shape[-2:]))
        if drawn is None:
            self.last = MixInfo(y, y, 1., self.label_smoothing)
            return x, self.target(y)
        lam = drawn['lam']
        perm = host_to_device(drawn['perm'], x.device)
        if self.mode == 'mixup':
            partner = x[perm]  # gathered before x is scaled in place
            x.mul_(lam).add_(partner, alpha=1. - lam)
        else:
            y0, y1, x0, x1 = drawn['box']
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        y_perm = y[perm.to(y.device)]
        lam_y = self.label_weights(drawn['lam'], y, y_perm)
        self.last = MixInfo(y, y_perm, lam_y, self.label_smoothing)
        return x, self.last.target(self.num_classes)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, kappa={self.kappa}, tau={self.tau}, '
                f'alpha={self.alpha}, mode={self.mode!r}, prob={self.prob}, '
                f'label_smoothing={self.label_smoothing})')
