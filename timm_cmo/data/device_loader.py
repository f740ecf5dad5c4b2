""" Data on the training device: the fast path for datasets that fit in device memory (CIFAR-LT).

Images are decoded once into a uint8 (N, C, H, W) tensor on the device. Each step gathers a batch,
applies the CIFAR recipe's augmentation (zero-pad + random crop, horizontal flip) to the whole batch
on the device, normalises, and mixes with the same :class:`~timm_cmo.data.cmo.CMOMixup` as the
ordinary loader. Backgrounds follow a shuffled epoch order (split across ranks like
``DistributedSampler``), foregrounds per-sample weights n_k^-r, drawn on the device. Random numbers
come from device generators (crops, flips, sample draws) and a host generator (mixing decisions,
lambda, boxes), so no step waits on the host; every stream is seeded from (seed, epoch).
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
from .sampler import _dist_defaults, derive_seed, sample_weights

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
    b, c, h, w = x.shape
    device = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, b), device=device, generator=generator)
        rows = (offsets[0, :, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (offsets[1, :, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
        bidx = torch.arange(b, device=device)[:, None, None, None]
        cidx = torch.arange(c, device=device)[None, :, None, None]
        x = x[bidx, cidx, rows, cols]
    if hflip > 0:
        flip = torch.rand(b, device=device, generator=generator) < hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class DeviceLoader:
    """Training batches ``(input, target)`` produced on the device, with CMO.

    Behaves like :class:`~timm_cmo.data.loader.CMOLoader` (``set_epoch``, ``mix_info``, soft
    targets with CMO on, hard labels with CMO off) with the same defaults and CMO window.

    Args:
        images: uint8 (N, C, H, W) on the device.
        targets: int64 (N,) on the device.
        batch_size: Samples per batch and rank.
        mean, std: Normalisation (0-1 scale, as timm's data config).
        padding: Pad-crop padding (0 disables the crop). Default 4.
        hflip: Horizontal flip probability. Default 0.5.
        num_classes: Number of classes (soft targets).
        label_smoothing: Label smoothing of the soft targets (CMO on).
        cmo: The CMO options; None for CMO off.
        epochs: Total training epochs (end of the CMO window).
        seed: Seed of every random stream.
        num_replicas, rank: Distributed split (defaults from the process group).
        drop_last: Drop the last incomplete batch. Default True.
        channels_last: Return channels-last inputs.
        img_dtype: Dtype of the normalised inputs. Default float32.
        re_prob, re_mode, re_count: timm's random erasing on the normalised batch (off by default).
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
            channels_last: bool = False,
            img_dtype: torch.dtype = torch.float32,
            re_prob: float = 0.,
            re_mode: str = 'const',
            re_count: int = 1,
    ):
        self.images = images
        self.targets = targets
        self.device = images.device
        self.batch_size = batch_size
        self.padding = padding
        self.hflip = hflip
        self.num_classes = num_classes if num_classes is not None else int(targets.max()) + 1
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.img_dtype = img_dtype
        self.seed = seed
        self.epochs = epochs
        self.cmo = cmo
        channels = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device, dtype=img_dtype).view(1, channels, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device, dtype=img_dtype).view(1, channels, 1, 1) * 255
        self.random_erasing = RandomErasing(
            re_prob, mode=re_mode, max_count=re_count, device=self.device) if re_prob > 0 else None
        self.mixer = None
        if cmo is not None:
            self.weights = sample_weights(targets.cpu().numpy(), r=cmo.r, effective=cmo.effective).to(
                self.device, torch.float32)
            self.mixer = cmo.mixer(self.num_classes, label_smoothing)
        self.num_samples = math.ceil(len(targets) / self.num_replicas)
        self.epoch = 0
        self.mix_info: Optional[MixInfo] = None

    @property
    def active(self) -> bool:
        return self.cmo is not None and self.cmo.active(self.epoch, self.epochs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.mixer is not None:
            self.mixer.reseed(derive_seed(self.seed, epoch, self.rank, 2))

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def _generator(self, *keys: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.epoch, *keys))
        return g

    def _epoch_order(self) -> torch.Tensor:
        """This rank's share of a shuffled epoch, as torch's DistributedSampler splits it."""
        n = len(self.targets)
        perm = torch.randperm(n, device=self.device, generator=self._generator(3))
        total = self.num_samples * self.num_replicas
        if total > n:
            perm = torch.cat([perm, perm[:total - n]])
        return perm[self.rank:total:self.num_replicas]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.img_dtype).sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            x = self.random_erasing(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._epoch_order()
        aug_gen = self._generator(4, self.rank)
        draw_gen = self._generator(5, self.rank)
        decide = np.random.default_rng(derive_seed(self.seed, self.epoch, self.rank, 1))
        n_all = len(self.targets)
        active = self.active
        bg_from_q = active and self.cmo.background_from_q
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            b = idx.shape[0]
            if bg_from_q:
                idx = torch.multinomial(self.weights, b, replacement=True, generator=draw_gen)
            x = self._normalize(pad_crop_flip(self.images[idx], self.padding, self.hflip, aug_gen))
            y = self.targets[idx]
            if self.mixer is None:
                yield x, y
                continue
            apply = None
            mixed = False
            if active:
                if self.cmo.mode == 'batch':
                    mixed = decide.random() < self.cmo.prob
                else:
                    mask = decide.random(b) < self.cmo.prob
                    mixed = bool(mask.any())
                    apply = host_to_device(mask, self.device)
            if not mixed:
                self.mix_info = MixInfo(y, y, 1.)
                yield x, self.mixer.target(y)
                continue
            if self.cmo.foreground_from_p:
                fg_idx = torch.randint(0, n_all, (b,), device=self.device, generator=draw_gen)
            else:
                fg_idx = torch.multinomial(self.weights, b, replacement=True, generator=draw_gen)
            x_fg = self._normalize(pad_crop_flip(self.images[fg_idx], self.padding, self.hflip, aug_gen))
            x, target, _ = self.mixer.mix(x, y, x_fg, self.targets[fg_idx], apply=apply)
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
        channels = images.shape[1]
        self.mean = torch.tensor(mean, device=images.device, dtype=img_dtype).view(1, channels, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device, dtype=img_dtype).view(1, channels, 1, 1) * 255
        self.channels_last = channels_last
        self.img_dtype = img_dtype

    def __len__(self):
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = self.images[sl].to(self.img_dtype).sub_(self.mean).div_(self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets[sl]
