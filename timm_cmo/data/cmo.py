""" The CMO mixing step: paste a minority foreground onto a context-rich background.

``CMOMixup`` is the companion of timm's ``Mixup`` for two batches: backgrounds drawn from the data
distribution P and foregrounds drawn from the minority-weighted distribution Q. It runs on device
tensors, after timm's prefetcher; the random numbers (whether to mix, lambda, the box, the blur and
jitter of the Table 12 variants) are drawn on the host from a seeded numpy Generator, so mixing never
waits for the device.

The paper's Table 12 asks whether CMO's gain comes from pasting the minority image onto a majority
context or merely from augmenting the oversampled minority image. Its variants keep CMO's sampling
(backgrounds ~ P, foregrounds ~ Q, the same batches and positions chosen with ``prob`` inside the
same epoch window) and change what is done with the Q-drawn image: ``mixup`` blends it into the
background (lambda ~ Beta(beta, beta)); ``blur`` and ``jitter`` use no second image: the Q-drawn
image, augmented with a Gaussian blur (sigma ~ U(0.1, 2), SimCLR's range, as the CMO code's
``GaussianBlur``) or a colour jitter (brightness, contrast and saturation factors ~ U(0.6, 1.4), in
a random order, as torchvision's ``ColorJitter(0.4, 0.4, 0.4)``: timm's ``--color-jitter`` default
and the CMO code's ImageNet jitter), *replaces* the sample at its position, label and all (lambda 0).
The paper's own text on these rows could not be read here, and its code has no such variant; what
is implemented follows the description "the Q-drawn minority image is augmented and oversampled,
no second image", placed in CMO's epoch plan: where CMO would paste, the augmented Q image is used.
"""
from dataclasses import dataclass, fields
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import one_hot

from .transforms import color_jitter_batch, gaussian_blur_batch, normalization

MIX_MODES = ('batch', 'elem')
CMO_VARIANTS = ('cmo', 'back', 'minor', 'mixup', 'blur', 'jitter')
"""cmo: background ~ P, foreground ~ Q, paste; back: background ~ Q, foreground ~ P;
minor: both ~ Q; mixup: background ~ P, foreground ~ Q, blend instead of paste; blur / jitter:
the foreground ~ Q, Gaussian-blurred / colour-jittered, replaces the background (module docstring)."""
AUGMENT_VARIANTS = ('blur', 'jitter')
BLUR_SIGMA = (0.1, 2.0)
"""Range of the blur variant's sigma (pixels), drawn uniformly per image."""
JITTER_STRENGTH = 0.4
"""The jitter variant's brightness, contrast and saturation factors are drawn from U(1 - s, 1 + s)."""


def check_mix_options(prob: float, beta: float, mode: str) -> None:
    """Raise ``ValueError`` naming a mixing probability, Beta parameter or mode out of range."""
    if not 0. <= prob <= 1.:
        raise ValueError(f'prob must be in [0, 1], got {prob}')
    if not beta > 0:
        raise ValueError(f'beta must be > 0, got {beta}')
    if mode not in MIX_MODES:
        raise ValueError(f'mode must be one of {MIX_MODES}, got {mode!r}')


def cmo_active(epoch: int, epochs: Optional[int], start_epoch: int = 3, end_epochs: int = 3) -> bool:
    """Whether CMO mixes in (0-based) ``epoch``: ``start_epoch < epoch < epochs - end_epochs``.

    With ``epochs=None`` only the start of the window applies.
    """
    if epoch <= start_epoch:
        return False
    return epochs is None or epoch < epochs - end_epochs


@dataclass(frozen=True)
class CMOConfig:
    """The CMO options, named like the ``--cmo-*`` flags without the prefix.

    Args:
        r: Foreground per-sample weight n_k^-r (1: every class equally likely). Default 1.
        effective: Weight foregrounds by 1/E(k) (effective number) instead.
        prob: Probability of mixing a batch (or a sample in elem mode). Default 0.5.
        beta: lambda ~ Beta(beta, beta). Default 1.
        start_epoch, end_epochs: CMO mixes when ``start < epoch < epochs - end`` (0-based). Default 3, 3.
        mode: ``'batch'`` (one box per batch, as the paper) or ``'elem'`` (one per sample).
        variant: One of :data:`CMO_VARIANTS`.
    """
    r: float = 1.0
    effective: bool = False
    prob: float = 0.5
    beta: float = 1.0
    start_epoch: int = 3
    end_epochs: int = 3
    mode: str = 'batch'
    variant: str = 'cmo'

    def __post_init__(self):
        if not self.r >= 0:
            raise ValueError(f'r must be >= 0, got {self.r}')
        check_mix_options(self.prob, self.beta, self.mode)
        if self.variant not in CMO_VARIANTS:
            raise ValueError(f'variant must be one of {CMO_VARIANTS}, got {self.variant!r}')

    @classmethod
    def from_flags(cls, **flags: Any) -> 'CMOConfig':
        """From ``cmo_r=..., cmo_prob=...`` keywords (other keywords are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k[4:]: v for k, v in flags.items() if k.startswith('cmo_') and k[4:] in names})

    @property
    def background_from_q(self) -> bool:
        """Backgrounds drawn class-weighted (the 'back' and 'minor' ablations)."""
        return self.variant in ('back', 'minor')

    @property
    def foreground_from_p(self) -> bool:
        """Foregrounds drawn from the data distribution (the 'back' ablation)."""
        return self.variant == 'back'

    def active(self, epoch: int, epochs: Optional[int]) -> bool:
        return cmo_active(epoch, epochs, self.start_epoch, self.end_epochs)

    def mixer(self, num_classes: int, label_smoothing: float = 0.0, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> 'CMOMixup':
        """The mixing step of this config; ``mean`` / ``std`` (0-1 scale) are the loader's normalisation."""
        return CMOMixup(num_classes, prob=self.prob, beta=self.beta, mode=self.mode,
                        label_smoothing=label_smoothing, blend=self.variant == 'mixup',
                        augment=self.variant if self.variant in AUGMENT_VARIANTS else None, mean=mean, std=std)


class MixInfo(NamedTuple):
    """Hard labels and mixing weight of a batch: target = lam * soft(y_b) + (1 - lam) * soft(y_f).

    ``lam`` is a float in batch mode (1.0 for an unmixed batch) and a (B,) tensor in elem mode
    (or for Remix's per-sample label weights); ``soft`` is the one-hot target with timm's label
    smoothing ``smoothing``. Losses take it as ``loss(logits, target, mix=info)`` to compute the
    paper's ``lam * L(y_b) + (1 - lam) * L(y_f)``, each term normalised by its own class weights.
    """
    y_b: torch.Tensor
    y_f: torch.Tensor
    lam: Union[float, torch.Tensor]
    smoothing: float = 0.0

    def target(self, num_classes: int) -> torch.Tensor:
        """The soft targets (B, num_classes) float32 this mix stands for."""
        lam = self.lam
        if isinstance(lam, torch.Tensor):
            lam = lam.to(torch.float32).unsqueeze(1)
        elif lam == 1.:
            return soft_target(self.y_b, num_classes, self.smoothing)
        return (soft_target(self.y_b, num_classes, self.smoothing) * lam
                + soft_target(self.y_f, num_classes, self.smoothing) * (1. - lam))


def rand_bbox(
        img_shape: Tuple[int, int],
        lam: Union[float, np.ndarray],
        rng: np.random.Generator,
        count: Optional[int] = None,
):
    """The CutMix box of the paper's code.

    Along each image axis of size S the cut is ``int(S * sqrt(1 - lam))``, its centre uniform in
    ``[0, S)``, and the box ``[c - cut // 2, c + cut // 2)`` clipped to the image.

    Args:
        img_shape: (H, W).
        lam: Lambda drawn from Beta(a, a), scalar or (count,).
        rng: Host random generator.
        count: Number of boxes (elem mode); None for one box.

    Returns:
        (y0, y1, x0, x1), ints or (count,) arrays.
    """
    img_h, img_w = img_shape
    ratio = np.sqrt(1. - np.asarray(lam, dtype=np.float64))
    cut_h = (img_h * ratio).astype(np.int64)
    cut_w = (img_w * ratio).astype(np.int64)
    cy = rng.integers(0, img_h, size=count)
    cx = rng.integers(0, img_w, size=count)
    y0 = np.clip(cy - cut_h // 2, 0, img_h)
    y1 = np.clip(cy + cut_h // 2, 0, img_h)
    x0 = np.clip(cx - cut_w // 2, 0, img_w)
    x1 = np.clip(cx + cut_w // 2, 0, img_w)
    if count is None:
        return int(y0), int(y1), int(x0), int(x1)
    return y0, y1, x0, x1


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is (B, C, H, W) and ``y`` its (B,) labels (the mixers' input)."""
    if x.ndim != 4:
        raise ValueError(f'x must have shape (B, C, H, W), got {tuple(x.shape)}')
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f'y must have shape ({x.shape[0]},), got {tuple(y.shape)}')


def host_to_device(array: np.ndarray, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Copy host random numbers to the device without making the host wait (pinned, non-blocking on CUDA)."""
    t = torch.from_numpy(array)
    if dtype is not None:
        t = t.to(dtype)
    if device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def box_masks(coords: torch.Tensor, img_h: int, img_w: int) -> torch.Tensor:
    """(B, H, W) bool masks of per-sample boxes ``coords`` = (4, B) int64 rows y0, y1, x0, x1 (half-open)."""
    rows = torch.arange(img_h, device=coords.device)
    cols = torch.arange(img_w, device=coords.device)
    in_y = (rows[None, :] >= coords[0, :, None]) & (rows[None, :] < coords[1, :, None])  # (B, H)
    in_x = (cols[None, :] >= coords[2, :, None]) & (cols[None, :] < coords[3, :, None])  # (B, W)
    return in_y[:, :, None] & in_x[:, None, :]


def soft_target(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (B, C) float32 targets with timm's label smoothing (off = s / C, on = 1 - s + off)."""
    off_value = smoothing / num_classes
    return one_hot(y, num_classes, on_value=1. - smoothing + off_value, off_value=off_value)


class CMOMixup:
    """Mix foreground images into background images, CutMix style (or blend them, Mixup style).

    Call as ``x, target = mixer(x_bg, y_bg, x_fg, y_fg)``: with probability ``prob`` the batch (or,
    in elem mode, each sample) is mixed: lambda ~ Beta(beta, beta), a box cut from the foreground
    and pasted into the background, lambda re-set to the exact fraction of background pixels kept,
    and ``target = lam * y_b + (1 - lam) * y_f`` as soft (B, num_classes) float32 targets.
    ``x_bg`` is modified in place, as timm's ``Mixup`` does. The hard labels and lambda of the last
    call are in :attr:`last` (a :class:`MixInfo`).

    Args:
        num_classes: Number of classes C.
        prob: Probability of mixing a batch (batch mode) or a sample (elem mode). Default 0.5.
        beta: Beta(beta, beta) parameter of lambda. Default 1.0.
        mode: ``'batch'``: one box and lambda per batch, as in the paper; ``'elem'``: per sample.
        label_smoothing: timm-style label smoothing of the soft targets. Default 0.
        blend: Blend ``lam * x_bg + (1 - lam) * x_fg`` instead of pasting a box (the paper's
            Mixup ablation); lambda is then the Beta draw itself.
        augment: ``'blur'`` or ``'jitter'``: no mixing; where a batch (or sample) is mixed, the
            foreground, Gaussian-blurred (:data:`BLUR_SIGMA`) or colour-jittered
            (:data:`JITTER_STRENGTH`), replaces the background, and lambda is 0 (Table 12's
            variants, module docstring). None (default): paste or blend.
        mean, std: The normalisation of the batches (0-1 scale, as timm's data config); the jitter
            undoes it, jitters on the 0-255 scale and redoes it. Default: timm's ImageNet values.
        seed: Seed of the host random generator; reset it with :meth:`reseed`.
    """

    def __init__(
            self,
            num_classes: int,
            prob: float = 0.5,
            beta: float = 1.0,
            mode: str = 'batch',
            label_smoothing: float = 0.0,
            blend: bool = False,
            augment: Optional[str] = None,
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
            seed: Optional[int] = None,
    ):
        check_mix_options(prob, beta, mode)
        if augment not in (None,) + AUGMENT_VARIANTS:
            raise ValueError(f'augment must be one of {AUGMENT_VARIANTS} or None, got {augment!r}')
        if augment is not None and blend:
            raise ValueError(f'augment={augment!r} replaces the background: it cannot also blend')
        if not 0. <= label_smoothing < 1.:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes = num_classes
        self.prob = prob
        self.beta = beta
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.blend = blend
        self.augment = augment
        self.mean, self.std = mean, std
        self._norm = None
        self.last: Optional[MixInfo] = None
        self.reseed(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Reset the host random generator (lambda, boxes, mixing decisions)."""
        self.rng = np.random.default_rng(seed)

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """Soft targets (B, C) of unmixed labels."""
        return soft_target(y, self.num_classes, self.label_smoothing)

    def __call__(
            self,
            x_bg: torch.Tensor,
            y_bg: torch.Tensor,
            x_fg: torch.Tensor,
            y_fg: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix with probability ``prob``; returns (x (B, ...), target (B, C))."""
        if x_bg.shape != x_fg.shape:
            raise ValueError(f'Background and foreground batches differ in shape: {tuple(x_bg.shape)} vs {tuple(x_fg.shape)}')
        if self.mode == 'batch':
            if self.rng.random() >= self.prob:
                self.last = MixInfo(y_bg, y_bg, 1., self.label_smoothing)
                return x_bg, self.target(y_bg)
            apply = None
        else:
            apply = host_to_device(self.rng.random(x_bg.shape[0]) < self.prob, x_bg.device)
        x, target, _ = self.mix(x_bg, y_bg, x_fg, y_fg, apply=apply)
        return x, target

    def mix(
            self,
            x_bg: torch.Tensor,
            y_bg: torch.Tensor,
            x_fg: torch.Tensor,
            y_fg: torch.Tensor,
            apply: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Union[float, torch.Tensor]]:
        """Mix unconditionally (batch mode) or where ``apply`` (bool (B,), elem mode) is True.

        Returns:
            (x, target, lam): lam a float (batch mode) or a (B,) float32 tensor (elem mode).
        """
        drawn = self.draw(x_bg.shape[0], tuple(x_bg.shape[-2:]))
        if self.augment is not None:
            lam = self._replace(x_bg, x_fg, apply if self.mode == 'elem' else None, drawn)
        elif self.mode == 'batch':
            lam = self._mix_batch(x_bg, x_fg, drawn)
        else:
            lam = self._mix_elem(x_bg, x_fg, apply, drawn)
        if self.mode == 'elem' and apply is not None:
            y_fg = torch.where(apply, y_fg, y_bg)
        self.last = MixInfo(y_bg, y_fg, lam, self.label_smoothing)
        return x_bg, self.last.target(self.num_classes), lam

    def paste(
            self,
            x_bg: torch.Tensor,
            y_bg: torch.Tensor,
            x_fg: torch.Tensor,
            y_fg: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a planned batch: ``x_fg`` (M, ...) are the foregrounds of the positions where ``y_fg``
        (B,) is >= 0, in position order (M = B: every position; M = 0: an unmixed batch).

        This is the step both training loaders run after reading a batch of the epoch plan.
        Returns (x (B, ...), target (B, C)); the labels and lambda are in :attr:`last`.
        """
        b = x_bg.shape[0]
        m = x_fg.shape[0]
        if m == 0:
            self.last = MixInfo(y_bg, y_bg, 1., self.label_smoothing)
            return x_bg, self.target(y_bg)
        apply = None
        if m < b:  # elem mode: align the M foregrounds with their positions
            apply = y_fg >= 0
            x_fg = x_fg[(torch.cumsum(apply, 0) - 1).clamp_(min=0)]
        x, target, _ = self.mix(x_bg, y_bg, x_fg, y_fg, apply=apply)
        return x, target

    def draw(self, n: int, img_shape: Tuple[int, int]) -> Dict[str, Any]:
        """The host random numbers of one mixed batch of ``n`` samples (H, W = ``img_shape``), drawn from
        :attr:`rng` in the order :meth:`mix` uses them; :meth:`mix` and the graph-safe batches of
        :mod:`~timm_cmo.data.device_draws` both read them, so the two follow one law and one stream.

        Returns a dict of: ``sigma`` (n,) (blur); ``factors`` (n, 3), ``order`` (n, 3) int64 (jitter); else
        ``lam``, the Beta draw (a float in batch mode, (n,) float64 in elem mode) re-set to the kept area when
        a box is cut, and ``box`` = (y0, y1, x0, x1), ints (batch mode) or a (4, n) int64 array (elem mode).
        """
        if self.augment == 'blur':
            return dict(sigma=self.rng.uniform(*BLUR_SIGMA, size=n))
        if self.augment == 'jitter':
            s = JITTER_STRENGTH
            factors = self.rng.uniform(max(0., 1. - s), 1. + s, size=(n, 3))
            return dict(factors=factors, order=np.argsort(self.rng.random((n, 3)), axis=1))
        img_h, img_w = img_shape
        if self.mode == 'batch':
            lam = float(self.rng.beta(self.beta, self.beta))
            if self.blend:
                return dict(lam=lam)
            y0, y1, x0, x1 = rand_bbox((img_h, img_w), lam, self.rng)
            return dict(lam=1. - (y1 - y0) * (x1 - x0) / float(img_h * img_w), box=(y0, y1, x0, x1))
        lam = self.rng.beta(self.beta, self.beta, size=n)
        if self.blend:
            return dict(lam=lam)
        y0, y1, x0, x1 = rand_bbox((img_h, img_w), lam, self.rng, count=n)
        return dict(lam=1. - (y1 - y0) * (x1 - x0) / float(img_h * img_w), box=np.stack([y0, y1, x0, x1]))

    def augment_images(self, x: torch.Tensor) -> torch.Tensor:
        """The ``augment`` variant's blur or jitter of normalised images (N, C, H, W), each with its own draw."""
        return self._augment_drawn(x, self.draw(x.shape[0], tuple(x.shape[-2:])))

    def _augment_drawn(self, x: torch.Tensor, drawn: Dict[str, Any]) -> torch.Tensor:
        if self.augment == 'blur':
            return self.augment_tensors(x, sigma=host_to_device(drawn['sigma'], x.device, x.dtype))
        return self.augment_tensors(x, factors=host_to_device(drawn['factors'], x.device, x.dtype),
                                    order=host_to_device(drawn['order'], x.device))

    def augment_tensors(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                        factors: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``augment`` variant's blur (``sigma`` (N,)) or jitter (``factors`` (N, 3), ``order`` (N, 3)) of
        normalised images (N, C, H, W) with draws already on the device (no host work: graph-safe once the
        normalisation constants exist, i.e. after a first call on the same device and dtype)."""
        if self.augment == 'blur':
            return gaussian_blur_batch(x, sigma)
        key = (x.shape[1], x.device, x.dtype)
        if self._norm is None or self._norm[0] != key:  # made once: a tensor built on the device makes the host wait
            self._norm = (key, normalization(self.mean, self.std, *key))
        mean, std = self._norm[1]
        return color_jitter_batch(x * std + mean, factors, order, bound=255.).sub_(mean).div_(std)

    def _replace(self, x_bg: torch.Tensor, x_fg: torch.Tensor, apply: Optional[torch.Tensor], drawn: Dict[str, Any]):
        """The ``augment`` variants: the augmented foreground replaces the background (where ``apply``)."""
        x_aug = self._augment_drawn(x_fg, drawn)
        if self.mode == 'batch':
            x_bg.copy_(x_aug)
            return 0.
        if apply is None:
            apply = torch.ones(x_bg.shape[0], dtype=torch.bool, device=x_bg.device)
        x_bg.copy_(torch.where(apply.view(-1, *([1] * (x_bg.ndim - 1))), x_aug, x_bg))
        return (~apply).to(torch.float32)

    def _mix_batch(self, x_bg: torch.Tensor, x_fg: torch.Tensor, drawn: Dict[str, Any]) -> float:
        lam = drawn['lam']
        if self.blend:
            x_bg.mul_(lam).add_(x_fg, alpha=1. - lam)
            return lam
        y0, y1, x0, x1 = drawn['box']
        x_bg[..., y0:y1, x0:x1] = x_fg[..., y0:y1, x0:x1]
        return lam

    def _mix_elem(self, x_bg: torch.Tensor, x_fg: torch.Tensor, apply: Optional[torch.Tensor],
                  drawn: Dict[str, Any]) -> torch.Tensor:
        device = x_bg.device
        lam = host_to_device(drawn['lam'], device, torch.float32)
        if self.blend:
            if apply is not None:
                lam = torch.where(apply, lam, torch.ones_like(lam))
            w = lam.to(x_bg.dtype).view(-1, *([1] * (x_bg.ndim - 1)))
            x_bg.mul_(w).add_(x_fg * (1. - w))
            return lam
        img_h, img_w = x_bg.shape[-2:]
        mask = box_masks(host_to_device(drawn['box'], device), img_h, img_w)
        if apply is not None:
            mask = mask & apply[:, None, None]
            lam = torch.where(apply, lam, torch.ones_like(lam))
        x_bg.copy_(torch.where(mask.unsqueeze(1), x_fg, x_bg))
        return lam
