""" timm's Mixup / CutMix (``--mixup``, ``--cutmix``, ``--mixup-mode`` ...) on device tensors, with host draws.

:class:`MixupCutmix` follows the law of ``timm.data.Mixup`` (the ``mixup_fn`` of timm's train.py): each
sample is mixed with the batch reversed (sample i with sample B - 1 - i); with probability ``prob`` a
batch (``'batch'`` mode), a pair i, B - 1 - i (``'pair'``) or a sample (``'elem'``) is mixed; lambda ~
Beta(mixup_alpha, mixup_alpha) for Mixup, Beta(cutmix_alpha, cutmix_alpha) for CutMix, CutMix chosen with
probability ``switch_prob`` when both are on; the CutMix box is timm's (:func:`cutmix_box`: timm's
``rand_bbox``, or ``rand_bbox_minmax`` with ``cutmix_minmax``), not the CMO paper's
(:func:`~timm_cmo.data.cmo.rand_bbox`), and lambda is corrected to the kept area (``correct_lam``, always
with ``cutmix_minmax``). Mixing stops from epoch ``off_epoch`` on (timm's ``--mixup-off-epoch``; 0: never).

The random numbers come from a private ``numpy.random.RandomState`` drawn in the order timm's Mixup draws
from numpy's global generator, so with the same generator state the two give the same batches and targets
(tested bit for bit); the generator is seeded per epoch from (seed, epoch, rank), so a resumed run repeats
its epochs. Nothing waits for the device. The mixed batch's labels and lambda are in :attr:`MixupCutmix.last`
(a :class:`~timm_cmo.data.cmo.MixInfo` with ``y_f = y.flip(0)``), for the per-term loss
``loss(logits, target, mix=last)`` under class weights and DRW, as CMO's and Remix's batches.

Differences from timm: timm asserts an even batch; here an odd batch (the last incomplete one of a
``--no-drop-last`` run) mixes its middle sample with itself (batch, elem) or leaves it unmixed (pair).
timm's prefetcher path (``FastCollateMixup``) blends uint8 images with rounding before normalisation and
random erasing; this, like timm's ``Mixup``, mixes the normalised (and erased) batch.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .cmo import MixInfo, box_masks, check_batch, host_to_device, soft_target

__all__ = ['MixupCutmix', 'MIXUP_MODES', 'cutmix_box']

MIXUP_MODES = ('batch', 'pair', 'elem')


def cutmix_box(
        img_shape: Tuple[int, int],
        lam: Union[float, np.floating],
        rng: np.random.RandomState,
        minmax: Optional[Sequence[float]] = None,
        correct_lam: bool = True,
) -> Tuple[Tuple[int, int, int, int], Union[float, np.floating]]:
    """timm's CutMix box and corrected lambda (``timm.data.mixup.cutmix_bbox_and_lam``), drawn from ``rng``.

    Without ``minmax``: along each axis of size S the cut is ``int(S * sqrt(1 - lam))`` with its centre
    ``c`` uniform in [0, S), the box ``[c - cut // 2, c + (cut + 1) // 2)`` clipped to the image (the
    CMO paper's box ends at ``c + cut // 2``). With ``minmax`` = (lo, hi): a rectangle whose sides are
    uniform integers in ``[int(S * lo), int(S * hi))``, placed uniformly inside the image; lambda is
    not used. The draws are timm's, in timm's order (centre y, centre x; or height, width, top, left).

    Args:
        img_shape: (H, W).
        lam: The Beta draw (a float32 scalar in timm's per-sample modes, where it sets the arithmetic).
        rng: Host generator.
        minmax: timm's ``cutmix_minmax``, or None.
        correct_lam: Re-set lambda to the kept-area ratio (always with ``minmax``).

    Returns:
        ((y0, y1, x0, x1), lam): the half-open box and lambda.
    """
    img_h, img_w = img_shape
    if minmax is not None:
        lo_h, hi_h, lo_w, hi_w = int(img_h * minmax[0]), int(img_h * minmax[1]), int(img_w * minmax[0]), int(img_w * minmax[1])
        if not (lo_h < hi_h and lo_w < hi_w):
            raise ValueError(f'cutmix_minmax {tuple(minmax)} leaves no box size for {img_h}x{img_w} images')
        cut_h = rng.randint(lo_h, hi_h)
        cut_w = rng.randint(lo_w, hi_w)
        y0 = rng.randint(0, img_h - cut_h + 1)
        x0 = rng.randint(0, img_w - cut_w + 1)
        y1, x1 = y0 + cut_h, x0 + cut_w
    else:
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
        cy = rng.randint(0, img_h)
        cx = rng.randint(0, img_w)
        y0, y1 = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + (cut_h + 1) // 2, 0, img_h)
        x0, x1 = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + (cut_w + 1) // 2, 0, img_w)
    if correct_lam or minmax is not None:
        lam = 1. - (y1 - y0) * (x1 - x0) / float(img_h * img_w)
    return (int(y0), int(y1), int(x0), int(x1)), lam


class MixupCutmix:
    """timm's Mixup / CutMix of a batch with itself reversed, on the device, labels in :attr:`last`.

    Call as ``x, target = mixer(x, y)`` with ``x`` (B, C, H, W) float and ``y`` (B,) int64 on the device:
    ``x`` is mixed in place (as timm's), ``target = lam * soft(y) + (1 - lam) * soft(y.flip(0))``,
    (B, num_classes) float32 (timm's ``mixup_target``); ``last`` is ``MixInfo(y, y.flip(0), lam,
    smoothing)``, ``lam`` a float in batch mode and a (B,) float32 tensor in pair / elem mode
    (``MixInfo(y, y, 1.0, smoothing)`` for a batch left unmixed). Call :meth:`set_epoch` every epoch
    (after :meth:`reseed`) for ``off_epoch``.

    Args:
        num_classes: Number of classes C.
        mixup_alpha: Mixup's Beta parameter; Mixup is on if > 0 (timm's ``--mixup``). Default 1.0.
        cutmix_alpha: CutMix's Beta parameter; CutMix is on if > 0 (``--cutmix``). Default 0.
        cutmix_minmax: (lo, hi) box-side fractions, 0 <= lo < hi <= 1; turns CutMix on and sets its
            alpha to 1 (``--cutmix-minmax``). Default None.
        prob: Probability of mixing a batch / pair / sample (``--mixup-prob``). Default 1.0.
        switch_prob: Probability of CutMix instead of Mixup when both are on (``--mixup-switch-prob``).
            Default 0.5.
        mode: ``'batch'``, ``'pair'`` or ``'elem'`` (``--mixup-mode``): one draw per batch, per pair
            (i, B - 1 - i), or per sample. Default ``'batch'``.
        correct_lam: Lambda = kept-area ratio of the clipped box (timm's default). Default True.
        label_smoothing: timm-style label smoothing of the soft targets (``--smoothing``). Default 0
            (timm's class defaults to 0.1).
        off_epoch: No mixing from this (0-based) epoch on; 0: mix every epoch (``--mixup-off-epoch``).
        seed: Seed of the host generator; reset it with :meth:`reseed`.
    """

    def __init__(
            self,
            num_classes: int,
            mixup_alpha: float = 1.0,
            cutmix_alpha: float = 0.0,
            cutmix_minmax: Optional[Sequence[float]] = None,
            prob: float = 1.0,
            switch_prob: float = 0.5,
            mode: str = 'batch',
            correct_lam: bool = True,
            label_smoothing: float = 0.0,
            off_epoch: int = 0,
            seed: Optional[int] = None,
    ):
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        for name, value in (('mixup_alpha', mixup_alpha), ('cutmix_alpha', cutmix_alpha)):
            if not value >= 0:
                raise ValueError(f'{name} must be >= 0, got {value}')
        if cutmix_minmax is not None:
            minmax = tuple(float(v) for v in cutmix_minmax)
            if len(minmax) != 2 or not 0. <= minmax[0] < minmax[1] <= 1.:
                raise ValueError(f'cutmix_minmax must be two fractions 0 <= min < max <= 1, got {list(cutmix_minmax)}')
            cutmix_minmax = minmax
            cutmix_alpha = 1.0  # as timm: the box ignores lambda, whose draw keeps the stream
        if not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError('mixup_alpha or cutmix_alpha must be > 0 (or cutmix_minmax set): nothing to mix')
        for name, value in (('prob', prob), ('switch_prob', switch_prob)):
            if not 0. <= value <= 1.:
                raise ValueError(f'{name} must be in [0, 1], got {value}')
        if mode not in MIXUP_MODES:
            raise ValueError(f'mode must be one of {MIXUP_MODES}, got {mode!r}')
        if not 0. <= label_smoothing < 1.:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        if off_epoch < 0:
            raise ValueError(f'off_epoch must be >= 0 (0: never off), got {off_epoch}')
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.cutmix_minmax = cutmix_minmax
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.correct_lam = correct_lam
        self.label_smoothing = float(label_smoothing)
        self.off_epoch = int(off_epoch)
        self.mixup_enabled = True
        self.last: Optional[MixInfo] = None
        self.reseed(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Reset the host generator (mixing decisions, lambda, Mixup / CutMix choice, boxes)."""
        self.rng = np.random.RandomState(None if seed is None else np.random.MT19937(seed))

    def set_epoch(self, epoch: int) -> None:
        """Mix in ``epoch`` unless ``off_epoch`` is set and reached (timm's ``--mixup-off-epoch``)."""
        self.mixup_enabled = self.active(epoch)

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` mixes: always, or before ``off_epoch`` when it is set."""
        return not self.off_epoch or epoch < self.off_epoch

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """Soft targets (B, C) of unmixed labels."""
        return soft_target(y, self.num_classes, self.label_smoothing)

    def _draw_lam(self, cutmix, size=None):
        """One Beta draw per entry; with both methods on, the Mixup and CutMix draws are made for every entry."""
        if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
            if size is None:
                return self.rng.beta(self.cutmix_alpha, self.cutmix_alpha) if cutmix else \
                    self.rng.beta(self.mixup_alpha, self.mixup_alpha)
            return np.where(cutmix, self.rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=size),
                            self.rng.beta(self.mixup_alpha, self.mixup_alpha, size=size))
        alpha = self.mixup_alpha if self.mixup_alpha > 0. else self.cutmix_alpha
        return self.rng.beta(alpha, alpha, size=size)

    def _params_per_batch(self) -> Tuple[float, bool]:
        lam, use_cutmix = 1., False
        if self.mixup_enabled and self.rng.rand() < self.prob:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = bool(self.rng.rand() < self.switch_prob)
            else:
                use_cutmix = self.cutmix_alpha > 0.
            lam = float(self._draw_lam(use_cutmix))
        return lam, use_cutmix

    def _params_per_elem(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        lam = np.ones(n, dtype=np.float32)
        use_cutmix = np.zeros(n, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = self.rng.rand(n) < self.switch_prob
            elif self.cutmix_alpha > 0.:
                use_cutmix = np.ones(n, dtype=bool)
            lam_mix = self._draw_lam(use_cutmix, size=n)
            lam = np.where(self.rng.rand(n) < self.prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def draw(self, batch_size: int, img_shape: Tuple[int, int]) -> Optional[Dict[str, Any]]:
        """The host random numbers of one batch, drawn from :attr:`rng` in the order :meth:`__call__` uses them
        (the graph-safe batches of :mod:`~timm_cmo.data.device_draws` read the same ones).

        Batch mode: None for a batch left unmixed, else ``lam`` (float, corrected to the kept area for CutMix),
        ``cutmix`` (bool) and ``box`` = (y0, y1, x0, x1) or None. Pair / elem mode: per sample ``lam`` (B,)
        float32 (1 where unmixed), ``blend`` / ``paste`` (B,) bool (Mixup / CutMix) and ``box`` (4, B) int64.
        """
        if self.mode == 'batch':
            lam, use_cutmix = self._params_per_batch()
            if lam == 1.:
                return None
            box = None
            if use_cutmix:
                box, lam = cutmix_box(img_shape, lam, self.rng, self.cutmix_minmax, self.correct_lam)
            return dict(lam=float(lam), cutmix=use_cutmix, box=box)
        b = batch_size
        n = b if self.mode == 'elem' else b // 2
        lam, use_cutmix = self._params_per_elem(n)
        mixed = lam != 1.
        boxes = np.zeros((4, n), dtype=np.int64)
        for i in np.nonzero(mixed & use_cutmix)[0]:  # in index order, as timm draws them
            boxes[:, i], lam[i] = cutmix_box(img_shape, lam[i], self.rng, self.cutmix_minmax, self.correct_lam)
        if self.mode == 'pair':  # pair (i, B - 1 - i) shares its draws; an odd batch's middle stays unmixed
            middle = b - 2 * n
            lam = np.concatenate([lam, np.ones(middle, np.float32), lam[::-1]])
            mixed = np.concatenate([mixed, np.zeros(middle, bool), mixed[::-1]])
            use_cutmix = np.concatenate([use_cutmix, np.zeros(middle, bool), use_cutmix[::-1]])
            boxes = np.concatenate([boxes, np.zeros((4, middle), np.int64), boxes[:, ::-1]], axis=1)
        return dict(lam=np.ascontiguousarray(lam, dtype=np.float32), blend=mixed & ~use_cutmix,
                    paste=mixed & use_cutmix, box=np.ascontiguousarray(boxes))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix as timm's Mixup does; returns (x (B, C, H, W), target (B, num_classes) float32)."""
        check_batch(x, y)
        drawn = self.draw(x.shape[0], tuple(x.shape[-2:]))
        if drawn is None:
            self.last = MixInfo(y, y, 1., self.label_smoothing)
            return x, self.target(y)
        if self.mode == 'batch':
            lam = drawn['lam']
            if drawn['cutmix']:
                y0, y1, x0, x1 = drawn['box']
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            else:
                x_flipped = x.flip(0).mul_(1. - lam)
                x.mul_(lam).add_(x_flipped)
            self.last = MixInfo(y, y.flip(0), lam, self.label_smoothing)
            return x, self.last.target(self.num_classes)
        img_shape = tuple(x.shape[-2:])
        lam, blend, paste, boxes = drawn['lam'], drawn['blend'], drawn['paste'], drawn['box']
        partner = x.flip(0)
        device = x.device
        if blend.any():
            w = host_to_device(np.where(blend, lam, 1.).astype(np.float32), device, x.dtype).view(-1, 1, 1, 1)
            where = host_to_device(blend, device).view(-1, 1, 1, 1)
            x.copy_(torch.where(where, x * w + partner * (1 - w), x))
        if paste.any():
            mask = box_masks(host_to_device(boxes, device), *img_shape)
            mask &= host_to_device(paste, device)[:, None, None]
            x.copy_(torch.where(mask.unsqueeze(1), partner, x))
        lam_t = host_to_device(np.ascontiguousarray(lam, dtype=np.float32), device)
        self.last = MixInfo(y, y.flip(0), lam_t, self.label_smoothing)
        return x, self.last.target(self.num_classes)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, '
                f'cutmix_alpha={self.cutmix_alpha}, cutmix_minmax={self.cutmix_minmax}, prob={self.prob}, '
                f'switch_prob={self.switch_prob}, mode={self.mode!r}, correct_lam={self.correct_lam}, '
                f'label_smoothing={self.label_smoothing}, off_epoch={self.off_epoch})')
