""" CMO in timm's data loader factory.

``create_cmo_loader`` takes the arguments of ``timm.data.create_loader`` plus the CMO options. It
lets timm build the transforms, the (distributed) background sampler and the prefetcher, then
swaps in a batch sampler that decides, before any image is read, whether a batch is mixed and
adds foreground indices only then: a foreground image is decoded only when it will be pasted.
The mixing itself runs on the training device after the prefetcher.

How a mixed batch travels: the batch sampler yields ``[bg_0 .. bg_{B-1}, (fg, pos) ...]``; the
dataset wrapper tags foreground items with their batch position; the collate function returns
the ``B`` backgrounds followed by the ``M`` foregrounds and a (2, B) target tensor holding the
background labels and, per position, the foreground label or -1.
"""
import logging
from functools import partial
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data
from timm.data import create_loader
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import Sampler, default_collate

from .cmo import CMOConfig, CMOMixup, MixInfo
from .dataset import dataset_targets
from .sampler import ClassWeightedSampler, derive_seed
from .transforms import pad_crop_transform

_logger = logging.getLogger(__name__)

def _cycle(sampler: Sampler) -> Iterator[int]:
    while True:
        empty = True
        for idx in sampler:
            empty = False
            yield idx
        if empty:
            raise RuntimeError('A sampler yielded no indices')


class CMOBatchSampler(Sampler[List]):
    """Batches of background indices, plus tagged foreground indices for the samples to be mixed.

    The number of batches and the rank's share come from ``sampler`` (timm's random or
    distributed sampler over P). Backgrounds and foregrounds are drawn from P or Q (the
    ``weighted_sampler``) by ``config.variant``. Whether a batch (or, in elem mode, a sample)
    is mixed is drawn here with probability ``config.prob`` from a generator seeded by
    ``(seed, epoch, rank)``, so a run resumed at an epoch repeats its decisions.

    Args:
        sampler: Background order for the epoch (P).
        weighted_sampler: Class-weighted sampler (Q).
        batch_size: Backgrounds per batch.
        drop_last: Drop the last incomplete batch.
        config: The CMO options.
        seed: Base seed of the mixing decisions.
        rank: Distributed rank (seeds the decisions).
    """

    def __init__(
            self,
            sampler: Sampler,
            weighted_sampler: Sampler,
            batch_size: int,
            drop_last: bool,
            config: CMOConfig = CMOConfig(),
            seed: int = 0,
            rank: int = 0,
    ):
        self.sampler = sampler
        self.weighted_sampler = weighted_sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.config = config
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.active = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in (self.sampler, self.weighted_sampler):
            if hasattr(s, 'set_epoch'):
                s.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> Iterator[List[int]]:
        batch = []
        for idx in self.sampler:
            batch.append(idx)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __iter__(self) -> Iterator[List]:
        cfg = self.config
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, self.rank, 1))
        q_stream = _cycle(self.weighted_sampler)
        fg_stream = _cycle(self.sampler) if cfg.foreground_from_p else q_stream
        for batch in self._batches():
            if cfg.background_from_q:
                batch = [next(q_stream) for _ in batch]
            if not self.active:
                yield batch
                continue
            n = len(batch)
            if cfg.mode == 'batch':
                positions = range(n) if rng.random() < cfg.prob else ()
            else:
                positions = np.nonzero(rng.random(n) < cfg.prob)[0].tolist()
            yield batch + [(next(fg_stream), pos) for pos in positions]


class Foreground(NamedTuple):
    """A foreground item and its position in the batch."""
    img: Any
    target: int
    pos: int


class _TaggedDataset(torch.utils.data.Dataset):
    """Returns the dataset's item for an int index and a :class:`Foreground` for ``(index, pos)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        if isinstance(key, tuple):
            idx, pos = key
            img, target = self.dataset[idx][:2]
            return Foreground(img, target, pos)
        return self.dataset[key]

    def __len__(self):
        return len(self.dataset)


class CMOCollate:
    """Collate backgrounds and tagged foregrounds with ``base`` (timm's fast or torch's default collate).

    Returns ``(x, y)``: unmixed batches as the base collate does; batches with foregrounds as
    ``x`` = B backgrounds then M foregrounds, ``y`` (2, B) = background labels and per-position
    foreground labels (-1 where none).
    """

    def __init__(self, base: Callable):
        self.base = base

    def __call__(self, batch):
        bg = [b for b in batch if not isinstance(b, Foreground)]
        fg = [b for b in batch if isinstance(b, Foreground)]
        x_b, y_b = self.base(bg)
        if not fg:
            return x_b, y_b
        x_f, y_f = self.base([(f.img, f.target) for f in fg])
        y = torch.full((2, len(bg)), -1, dtype=torch.long)
        y[0] = y_b
        y[1, torch.tensor([f.pos for f in fg])] = y_f.long()
        return torch.cat([x_b, x_f]), y


def reset_reader_handles(dataset: Any) -> None:
    """Forget the file handles a timm tar reader cached in this process.

    timm's tar readers keep their archive open once an image was read; worker processes forked
    after that would share one file offset and read each other's bytes. Loader workers call this
    first, so each opens its own handle.
    """
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        state = getattr(getattr(dataset, 'reader', None), 'tar_state', None)
        if state is not None:
            for s in (state.values() if isinstance(state, dict) else [state]):
                s.reset()
                for child in s.children.values():
                    child.reset()
        dataset = getattr(dataset, 'dataset', None)


def _worker_init(worker_id: int, base: Optional[Callable] = None) -> None:
    reset_reader_handles(torch.utils.data.get_worker_info().dataset)
    if base is not None:
        base(worker_id)


class CMOLoader:
    """Iterable over ``(input, target)`` training batches with CMO applied on the device.

    With CMO on, targets are soft (B, num_classes) float32 in every epoch (one-hot, smoothed if
    asked, when a batch is not mixed), and :attr:`mix_info` holds the batch's hard labels and
    lambda for losses that need the paper's ``lam * L(x, y_b) + (1 - lam) * L(x, y_f)``.
    With CMO off, batches are exactly those of timm's loader and ``mix_info`` is None.
    Call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
            self,
            loader: Union[torch.utils.data.DataLoader, PrefetchLoader],
            batch_sampler: Optional[CMOBatchSampler] = None,
            mixer: Optional[CMOMixup] = None,
            device: Optional[torch.device] = None,
            epochs: Optional[int] = None,
            seed: int = 0,
            rank: int = 0,
    ):
        self.loader = loader
        self.batch_sampler = batch_sampler
        self.mixer = mixer
        self.device = device
        self.epochs = epochs
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.mix_info: Optional[MixInfo] = None
        self.set_epoch(0)

    @property
    def cmo(self) -> bool:
        return self.mixer is not None

    @property
    def active(self) -> bool:
        """Whether CMO mixes in the current epoch."""
        return self.cmo and self.batch_sampler.config.active(self.epoch, self.epochs)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.batch_sampler if self.batch_sampler is not None else self.loader.sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.active = self.active
            self.mixer.reseed(derive_seed(self.seed, epoch, self.rank, 2))
        elif hasattr(self.loader.sampler, 'set_epoch'):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        prefetched = isinstance(self.loader, PrefetchLoader)
        for x, y in self.loader:
            if not prefetched and self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            if self.mixer is None:
                yield x, y
                continue
            if y.ndim == 1:
                self.mix_info = MixInfo(y, y, 1.)
                yield x, self.mixer.target(y)
                continue
            b = y.shape[1]
            x_b, x_f = x[:b], x[b:]
            y_b, y_f = y[0], y[1]
            apply = None
            if x_f.shape[0] < b:  # elem mode: align the M foregrounds with their positions
                apply = y_f >= 0
                x_f = x_f[(torch.cumsum(apply, 0) - 1).clamp_(min=0)]
            x, target, lam = self.mixer.mix(x_b, y_b, x_f, y_f, apply=apply)
            self.mix_info = self.mixer.last
            yield x, target


def create_cmo_loader(
        dataset: torch.utils.data.Dataset,
        input_size: Union[int, Sequence[int]],
        batch_size: int,
        is_training: bool = False,
        num_classes: Optional[int] = None,
        label_smoothing: float = 0.0,
        cmo: bool = False,
        cmo_r: float = 1.0,
        cmo_effective: bool = False,
        cmo_prob: float = 0.5,
        cmo_beta: float = 1.0,
        cmo_start_epoch: int = 3,
        cmo_end_epochs: int = 3,
        cmo_mode: str = 'batch',
        cmo_variant: str = 'cmo',
        epochs: Optional[int] = None,
        seed: int = 0,
        train_crop_mode: Optional[str] = None,
        crop_padding: int = 4,
        **kwargs: Any,
) -> Union[CMOLoader, torch.utils.data.DataLoader, PrefetchLoader]:
    """Create a data loader like ``timm.data.create_loader``, with CMO for training.

    The ``cmo_*`` arguments are the fields of :class:`~timm_cmo.data.cmo.CMOConfig`.

    Args:
        dataset: A map-style dataset with per-sample labels (``targets`` or a timm reader).
        input_size, batch_size, is_training: As in timm's ``create_loader``.
        num_classes: Number of classes (soft targets); from ``dataset.num_classes`` when None.
        label_smoothing: Label smoothing of the soft targets (CMO on).
        cmo: Enable CMO.
        cmo_r: Foreground per-sample weight n_k^-r (1: every class equally likely).
        cmo_effective: Weight foregrounds by 1/E(k) (effective number) instead.
        cmo_prob: Probability of mixing a batch (or a sample in elem mode). Default 0.5.
        cmo_beta: lambda ~ Beta(beta, beta). Default 1.0.
        cmo_start_epoch, cmo_end_epochs: CMO mixes when ``start < epoch < epochs - end``
            (0-based epochs; default 3 and 3 as in the paper's code).
        cmo_mode: ``'batch'`` (one box per batch) or ``'elem'`` (one box and lambda per sample).
        cmo_variant: One of :data:`~timm_cmo.data.cmo.CMO_VARIANTS`.
        epochs: Total training epochs (end of the CMO window).
        seed: Seed of foreground draws and mixing randomness.
        train_crop_mode: timm's ('rrc', 'rkrc', 'rkrr') or ``'pad'``: the paper's CIFAR recipe,
            pad by ``crop_padding`` then random crop to the input size (+ timm's flips etc.).
        crop_padding: Padding of the ``'pad'`` crop mode. Default 4.
        **kwargs: Any other argument of ``timm.data.create_loader`` (augmentation, workers,
            distributed, use_prefetcher, device, ...).

    Returns:
        For training, a :class:`CMOLoader` (set its epoch with ``set_epoch``); for evaluation,
        timm's loader.
    """
    config = CMOConfig(r=cmo_r, effective=cmo_effective, prob=cmo_prob, beta=cmo_beta, start_epoch=cmo_start_epoch,
                       end_epochs=cmo_end_epochs, mode=cmo_mode, variant=cmo_variant)
    pad_crop = train_crop_mode == 'pad'
    loader = create_loader(
        dataset,
        input_size=input_size,
        batch_size=batch_size,
        is_training=is_training,
        train_crop_mode=None if pad_crop else train_crop_mode,
        **kwargs,
    )
    if pad_crop and is_training and not kwargs.get('no_aug', False):
        if kwargs.get('num_aug_splits', 0):
            raise ValueError("train_crop_mode='pad' does not support num_aug_splits")
        dataset.transform = pad_crop_transform(dataset.transform, input_size, padding=crop_padding)
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    if inner.num_workers > 0:
        inner.worker_init_fn = partial(_worker_init, base=inner.worker_init_fn)
    if not is_training:
        return loader

    device = kwargs.get('device', torch.device('cuda'))
    if not cmo:
        return CMOLoader(loader, device=device, epochs=epochs)

    if num_classes is None:
        num_classes = getattr(dataset, 'num_classes', None)
        if num_classes is None:
            raise ValueError('num_classes is needed for CMO soft targets')
    if kwargs.get('use_multi_epochs_loader', False):
        raise ValueError('use_multi_epochs_loader is not supported with CMO')
    if kwargs.get('input_size_choices') is not None:
        raise ValueError('Scheduled input sizes (input_size_choices) are not supported with CMO')

    prefetcher = loader if isinstance(loader, PrefetchLoader) else None
    distributed = kwargs.get('distributed', False)
    weighted_sampler = ClassWeightedSampler(
        dataset_targets(dataset),
        r=config.r,
        effective=config.effective,
        num_samples=len(dataset),
        seed=seed,
        num_replicas=None if distributed else 1,
        rank=None if distributed else 0,
    )
    rank = weighted_sampler.rank
    batch_sampler = CMOBatchSampler(
        inner.sampler,
        weighted_sampler,
        batch_size=batch_size,
        drop_last=inner.drop_last,
        config=config,
        seed=seed,
        rank=rank,
    )
    collate = inner.collate_fn
    if collate is None or collate is fast_collate or collate is default_collate:
        collate = CMOCollate(collate or default_collate)
    else:
        raise ValueError('A custom collate_fn cannot be combined with CMO')
    cmo_inner = torch.utils.data.DataLoader(
        _TaggedDataset(dataset),
        batch_sampler=batch_sampler,
        num_workers=inner.num_workers,
        collate_fn=collate,
        pin_memory=inner.pin_memory,
        worker_init_fn=inner.worker_init_fn,
        persistent_workers=inner.persistent_workers,
    )
    if prefetcher is not None:
        prefetcher.loader = cmo_inner
        cmo_loader = prefetcher
    else:
        cmo_loader = cmo_inner
    return CMOLoader(
        cmo_loader,
        batch_sampler=batch_sampler,
        mixer=config.mixer(num_classes, label_smoothing),
        device=device,
        epochs=epochs,
        seed=seed,
        rank=rank,
    )
