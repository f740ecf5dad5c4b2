""" Data on the training device: the fast path for datasets that fit in device memory (CIFAR-LT).

Images are decoded once into a uint8 (N, C, H, W) tensor on the device. Each step gathers a batch,
applies the CIFAR recipe's augmentation (zero-pad + random crop, horizontal flip) to the whole batch
on the device, normalises, and mixes with the same :class:`~timm_cmo.data.cmo.CMOMixup` as the
ordinary loader. Which images make each batch (background order or ROS draws, CMO decisions,
foregrounds) comes from the same :class:`~timm_cmo.data.plan.EpochPlanner` as the ordinary loader,
computed on the host at the start of the epoch and copied to the device once. Crops and flips
come from a device generator, lambda and boxes from the mixer's host generator, so no step waits
on the host; every stream is seeded from (seed, epoch).
"""
import logging
import math
import time
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from .cmo import CMOConfig, MixInfo, host_to_device
from .dual import DualBatch
from .loader import check_one_mixer, mix_unplanned, reseed_mixers
from .mixup import MixupCutmix
from .plan import EpochPlanner
from .remix import RemixMixup
from .sampler import _dist_defaults, derive_seed
from .transforms import normalization

_logger = logging.getLogger(__name__)


@torch.no_grad()
def decode_to_tensor(
        dataset,
        img_size: Tuple[int, int],
        device: torch.device,
        num_workers: int = 0,
        batch_size: int = 512,
        log_every: float = 10.,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once (resized and centre-cropped to ``img_size`` when needed).

    Returns:
        (images uint8 (N, C, H, W), targets int64 (N,)) on ``device``.
    """
    tf = transforms.Compose([
        transforms.Resize(img_size),
        transforms.CenterCrop(img_size),
        transforms.PILToTensor(),
    ])
    old_tf = dataset.transform
    dataset.transform = tf
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        images, targets = [], []
        start = last = time.time()
        for i, (x, y) in enumerate(loader):
            images.append(x)
            targets.append(torch.as_tensor(y))
            if time.time() - last > log_every:
                last = time.time()
                _logger.info(f'Decoding images: {min(len(dataset), (i + 1) * batch_size)}/{len(dataset)}')
    finally:
        dataset.transform = old_tf
    images = torch.cat(images).to(device)
    targets = torch.cat(targets).long().to(device)
    _logger.info(f'Decoded {len(targets)} images to {tuple(images.shape)} uint8 on {device} '
                 f'({images.numel() / 2 ** 20:.1f} MiB, {time.time() - start:.1f}s)')
    return images, targets


def normalize(
        x: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        random_erasing: Optional[RandomErasing] = None,
) -> torch.Tensor:
    """Model input from a (B, C, H, W) uint8 batch: ``(x - mean) / std`` in ``dtype`` (the pair from
    :func:`normalization`), then timm's random erasing if given, then channels-last if asked."""
    x = x.to(dtype).sub_(mean).div_(std)
    if random_erasing is not None:
        x = random_erasing(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def draw_crop_flip(
        batch_size: int,
        padding: int,
        hflip: float,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The random numbers of :func:`pad_crop_flip` for ``batch_size`` images: crop offsets (2, B) int64,
    uniform in [0, 2 * padding] (None without padding), then flips (B,) bool with prob ``hflip`` (None at 0)."""
    offsets = flip = None
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, batch_size), device=device, generator=generator)
    if hflip > 0:
        flip = torch.rand(batch_size, device=device, generator=generator) < hflip
    return offsets, flip


def crop_flip(
        x: torch.Tensor,
        padding: int,
        offsets: Optional[torch.Tensor] = None,
        flip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Zero-pad (B, C, H, W) ``x`` by ``padding``, crop (H, W) at ``offsets`` (2, B) and flip where ``flip``
    (B,) (each step skipped where its argument is None): no host work, graph-safe."""
    b, c, h, w = x.shape
    device = x.device
    if offsets is not None:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = (offsets[0, :, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (offsets[1, :, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
        bidx = torch.arange(b, device=device)[:, None, None, None]
        cidx = torch.arange(c, device=device)[None, :, None, None]
        x = x[bidx, cidx, rows, cols]
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def pad_crop_flip(
        x: torch.Tensor,
        padding: int,
        hflip: float,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to (H, W) at a random offset per sample, flip with prob ``hflip``.

    The offsets are uniform in [0, 2 * padding] on each axis, as torchvision's ``RandomCrop(padding=p)``.

    Args:
        x: (B, C, H, W) batch, any dtype.
    """
    offsets, flip = draw_crop_flip(x.shape[0], padding, hflip, x.device, generator)
    return crop_flip(x, padding, offsets, flip)


class DeviceLoader:
    """Training batches ``(input, target)`` produced on the device, with CMO.

    Behaves like :class:`~timm_cmo.data.loader.CMOLoader` (``set_epoch``, ``mix_info``, ``dual``, soft
    targets with a mixer or label smoothing on, hard labels without) and reads the same epoch plan.

    Args:
        images: uint8 (N, C, H, W) on the device.
        targets: int64 (N,) on the device.
        batch_size: Samples per batch and rank.
        mean, std: Normalisation (0-1 scale, as timm's data config).
        padding: Pad-crop padding (0 disables the crop). Default 4.
        hflip: Horizontal flip probability. Default 0.5.
        num_classes: Number of classes (soft targets).
        label_smoothing: timm's label smoothing of the (then soft) targets.
        cmo: The CMO options; None for CMO off.
        epochs: Total training epochs (end of the CMO window).
        seed: Seed of every random stream.
        num_replicas, rank: Distributed split (defaults from the process group).
        drop_last: Drop the last incomplete batch. Default True.
        ros_r: Random oversampling of the backgrounds (see :class:`~timm_cmo.data.plan.EpochPlanner`).
        dual_r: A dual batch beside every batch (BBN's re-balancing batch, :attr:`dual`), drawn with
            per-sample weight n_k^-dual_r (see :class:`~timm_cmo.data.plan.EpochPlanner`); None: off.
        channels_last: Return channels-last inputs.
        img_dtype: Dtype of the normalised inputs. Default float32.
        re_prob, re_mode, re_count: timm's random erasing on the normalised batch (off by default).
        remix: A :class:`~timm_cmo.data.remix.RemixMixup` for every batch (instead of CMO).
        mixup: A :class:`~timm_cmo.data.mixup.MixupCutmix` (timm's Mixup / CutMix) for every batch
            (instead of CMO or Remix).
    """

    def __init__(
            self,
            images: torch.Tensor,
            targets: torch.Tensor,
            batch_size: int,
            mean: Sequence[float],
            std: Sequence[float],
            padding: int = 4,
            hflip: float = 0.5,
            num_classes: Optional[int] = None,
            label_smoothing: float = 0.0,
            cmo: Optional[CMOConfig] = None,
            epochs: Optional[int] = None,
            seed: int = 0,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
            drop_last: bool = True,
            ros_r: Optional[float] = None,
            dual_r: Optional[float] = None,
            channels_last: bool = False,
            img_dtype: torch.dtype = torch.float32,
            re_prob: float = 0.,
            re_mode: str = 'const',
            re_count: int = 1,
            remix: Optional[RemixMixup] = None,
            mixup: Optional[MixupCutmix] = None,
    ):
        check_one_mixer(cmo is not None, remix is not None, mixup is not None)
        self.images = images
        self.targets = targets
        self.device = images.device
        self.padding = padding
        self.hflip = hflip
        self.num_classes = num_classes if num_classes is not None else int(targets.max()) + 1
        self.channels_last = channels_last
        self.img_dtype = img_dtype
        self.planner = EpochPlanner(
            targets.cpu().numpy(), batch_size, drop_last=drop_last, cmo=cmo, epochs=epochs, ros_r=ros_r,
            dual_r=dual_r, seed=seed, num_replicas=num_replicas, rank=rank)
        self.seed = seed
        self.rank = self.planner.rank
        self.mean, self.std = normalization(mean, std, images.shape[1], self.device, img_dtype)
        self.random_erasing = RandomErasing(
            re_prob, mode=re_mode, max_count=re_count, device=self.device) if re_prob > 0 else None
        self.mixer = cmo.mixer(self.num_classes, label_smoothing, mean=mean, std=std) if cmo is not None else None
        self.label_smoothing = label_smoothing
        self.remix = remix
        self.mixup = mixup
        self.epoch = 0
        self.mix_info: Optional[MixInfo] = None
        self.dual: Optional[DualBatch] = None

    @property
    def active(self) -> bool:
        return self.planner.cmo_active(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        reseed_mixers(self, epoch)

    def __len__(self) -> int:
        return len(self.planner)

    def _generator(self, *keys: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.epoch, *keys))
        return g

    def _augment(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Crop, flip and normalise the images ``idx``."""
        x = pad_crop_flip(self.images[idx], self.padding, self.hflip, generator)
        return normalize(x, self.mean, self.std, self.img_dtype, self.channels_last, self.random_erasing)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self.planner.plan(self.epoch)
        # the epoch's indices reach the device in one copy each; batches are slices of them
        bg_ends = np.cumsum([len(b.index) for b in plan])
        fg_ends = np.cumsum([len(b.fg_index) for b in plan])
        dual_ends = np.cumsum([len(b.dual_index) for b in plan])
        empty = np.zeros(0, dtype=np.int64)
        bg_all = host_to_device(np.concatenate([b.index for b in plan] or [empty]), self.device)
        fg_all = host_to_device(np.concatenate([b.fg_index for b in plan] or [empty]), self.device)
        pos_all = host_to_device(np.concatenate([b.fg_pos for b in plan] or [empty]), self.device)
        dual_all = host_to_device(np.concatenate([b.dual_index for b in plan] or [empty]), self.device)
        aug_gen = self._generator(4, self.rank)
        for i in range(len(plan)):
            b0, b1 = (bg_ends[i - 1] if i else 0), bg_ends[i]
            f0, f1 = (fg_ends[i - 1] if i else 0), fg_ends[i]
            d0, d1 = (dual_ends[i - 1] if i else 0), dual_ends[i]
            idx = bg_all[b0:b1]
            x, y = self._augment(idx, aug_gen), self.targets[idx]
            x_fg = self._augment(fg_all[f0:f1], aug_gen) if f1 > f0 else None
            if d1 > d0:  # augmented after the foregrounds, in the ordinary loader's reading order
                dual = dual_all[d0:d1]
                self.dual = DualBatch(self._augment(dual, aug_gen), self.targets[dual], self.label_smoothing)
            if self.mixer is None:
                yield mix_unplanned(self, x, y)
                continue
            if x_fg is not None:
                y_fg = torch.full_like(y, -1).index_put_((pos_all[f0:f1],), self.targets[fg_all[f0:f1]])
            else:
                x_fg, y_fg = x[:0], y
            x, target = self.mixer.paste(x, y, x_fg, y_fg)
            self.mix_info = self.mixer.last
            yield x, target


class DeviceEvalLoader:
    """Evaluation batches from decoded images on the device, in dataset order (rank r: samples r, r + W, ...)."""

    def __init__(self, images, targets, batch_size, mean, std, num_replicas=None, rank=None,
                 channels_last=False, img_dtype=torch.float32):
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.images = images[self.rank::self.num_replicas]
        self.targets = targets[self.rank::self.num_replicas]
        self.batch_size = batch_size
        self.mean, self.std = normalization(mean, std, images.shape[1], images.device, img_dtype)
        self.channels_last = channels_last
        self.img_dtype = img_dtype

    def __len__(self):
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield normalize(self.images[sl], self.mean, self.std, self.img_dtype, self.channels_last), self.targets[sl]
