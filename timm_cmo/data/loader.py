""" CMO in timm's data loader factory.

``create_cmo_loader`` takes the arguments of ``timm.data.create_loader`` plus the CMO options. It
lets timm build the transforms, the collate function and the prefetcher, then, for training,
swaps in a batch sampler that reads the epoch plan (:mod:`timm_cmo.data.plan`): background order,
whether a batch is mixed and which foregrounds, all decided before any image is read, so a
foreground image is decoded only when it will be pasted. The mixing itself runs on the training
device after the prefetcher.

How a planned batch travels: the batch sampler yields ``[seed, bg_0 .. bg_{B-1}, (fg, pos) ...,
DualIndex(d_0) .. DualIndex(d_{B-1})]``; the dataset wrapper reads the batch with the global generators
seeded by ``seed`` and tags foreground items with their batch position and dual items as such; the
collate function returns the ``B`` backgrounds followed by the ``M`` foregrounds (and the ``B`` dual
images) and a (2, B) target tensor holding the background labels and, per position, the foreground
label or -1 (a (3, B) one, the dual labels in the last row). The dual batch of two-branch methods
(BBN) is cut off after the prefetcher (:func:`~timm_cmo.data.dual.split_dual`) and held in
``loader.dual``.
"""
import logging
import random
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from timm.data import create_loader
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import Sampler, default_collate

from .cmo import CMOConfig, CMOMixup, MixInfo
from .dataset import dataset_targets
from .dual import DualBatch, split_dual
from .mixup import MixupCutmix
from .plan import EpochPlanner
from .remix import RemixMixup
from .sampler import derive_seed
from .transforms import pad_crop_transform

_logger = logging.getLogger(__name__)

class BatchSeed(int):
    """The first item of a planned batch: the seed of its augmentation."""


class DualIndex(int):
    """A planned batch's key of a dual-batch image (BBN's re-balancing batch)."""


class PlanBatchSampler(Sampler[List]):
    """Yields the batches of an :class:`~timm_cmo.data.plan.EpochPlanner`'s plan as dataset keys.

    A batch is ``[BatchSeed(seed), bg_0 .. bg_{b-1}, (fg, pos) ..., DualIndex(d) ...]``: the
    augmentation seed, the background indices, the foreground indices tagged with their batch
    position, then the dual batch's indices (none without ``dual_r``). Call :meth:`set_epoch` every epoch.
    """

    def __init__(self, planner: EpochPlanner):
        self.planner = planner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.planner)

    def __iter__(self) -> Iterator[List]:
        for b in self.planner.plan(self.epoch):
            yield ([BatchSeed(b.seed)] + b.index.tolist() + list(zip(b.fg_index.tolist(), b.fg_pos.tolist()))
                   + [DualIndex(d) for d in b.dual_index.tolist()])


@contextmanager
def seeded_rngs(seed: int, restore: bool = False):
    """Seed torch's CPU, Python's and numpy's global generators (what image transforms draw from);
    with ``restore``, put their states back afterwards (the main process keeps its own stream)."""
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        if states is not None:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class Foreground(NamedTuple):
    """A foreground item and its position in the batch."""
    img: Any
    target: int
    pos: int


class DualItem(NamedTuple):
    """An item of the dual batch."""
    img: Any
    target: int


class _TaggedDataset(torch.utils.data.Dataset):
    """Returns the dataset's item for an int index, a :class:`Foreground` for ``(index, pos)`` and a
    :class:`DualItem` for a :class:`DualIndex`.

    A batch of keys that starts with a :class:`BatchSeed` is read with the global generators
    seeded from it, so a batch's augmentation depends on the plan alone, not on which worker
    process reads it or what that process read before.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitems__(self, keys: List) -> List:
        if not keys or not isinstance(keys[0], BatchSeed):
            return [self[k] for k in keys]
        with seeded_rngs(int(keys[0]), restore=torch.utils.data.get_worker_info() is None):
            return [self[k] for k in keys[1:]]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            idx, pos = key
            img, target = self.dataset[idx][:2]
            return Foreground(img, target, pos)
        if isinstance(key, DualIndex):
            img, target = self.dataset[int(key)][:2]
            return DualItem(img, target)
        return self.dataset[key]

    def __len__(self):
        return len(self.dataset)


class CMOCollate:
    """Collate backgrounds and tagged foregrounds with ``base`` (timm's fast or torch's default collate).

    Returns ``(x, y)``: unmixed batches as the base collate does; batches with foregrounds as
    ``x`` = B backgrounds then M foregrounds, ``y`` (2, B) = background labels and per-position
    foreground labels (-1 where none); batches with a dual batch as ``x`` = B backgrounds, M
    foregrounds (M >= 0), B dual images and ``y`` (3, B), the dual labels in the last row.
    """

    def __init__(self, base: Callable):
        self.base = base

    def __call__(self, batch):
        bg = [b for b in batch if not isinstance(b, (Foreground, DualItem))]
        fg = [b for b in batch if isinstance(b, Foreground)]
        dual = [(b.img, b.target) for b in batch if isinstance(b, DualItem)]
        x_b, y_b = self.base(bg)
        if not fg and not dual:
            return x_b, y_b
        parts = [x_b]
        y = torch.full((3 if dual else 2, len(bg)), -1, dtype=torch.long)
        y[0] = y_b
        if fg:
            x_f, y_f = self.base([(f.img, f.target) for f in fg])
            parts.append(x_f)
            y[1, torch.tensor([f.pos for f in fg])] = y_f.long()
        if dual:
            x_r, y_r = self.base(dual)
            parts.append(x_r)
            y[2] = y_r.long()
        return torch.cat(parts), y


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


def reseed_mixers(loader, epoch: int) -> None:
    """Seed a training loader's mixers for ``epoch`` from (seed, epoch, rank): CMO's, Remix's, Mixup / CutMix's."""
    planner = loader.planner
    if loader.mixer is not None:
        loader.mixer.reseed(derive_seed(planner.seed, epoch, planner.rank, 2))
    if loader.remix is not None:
        loader.remix.reseed(derive_seed(planner.seed, epoch, planner.rank, 7))
    if loader.mixup is not None:
        loader.mixup.reseed(derive_seed(planner.seed, epoch, planner.rank, 8))
        loader.mixup.set_epoch(epoch)


def check_one_mixer(cmo: bool, remix: bool, mixup: bool) -> None:
    """CMO, Remix and Mixup / CutMix are ways of mixing a batch; the paper never combines them."""
    chosen = [name for name, on in (('cmo', cmo), ('remix', remix), ('mixup/cutmix', mixup)) if on]
    if len(chosen) > 1:
        raise ValueError(f'{" and ".join(chosen)} are {len(chosen)} ways of mixing: choose one')


def mix_unplanned(loader, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch without CMO: Remix or Mixup / CutMix it, or smooth its labels (setting ``loader.mix_info``),
    else leave it."""
    batch_mixer = loader.remix if loader.remix is not None else loader.mixup
    if batch_mixer is not None:
        x, target = batch_mixer(x, y)
        loader.mix_info = batch_mixer.last
        return x, target
    if loader.label_smoothing > 0:
        loader.mix_info = MixInfo(y, y, 1., loader.label_smoothing)
        return x, loader.mix_info.target(loader.num_classes)
    return x, y


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA when available, else the CPU."""
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


class CMOLoader:
    """Iterable over ``(input, target)`` training batches of an epoch plan, mixed on the device.

    With CMO, Remix, Mixup / CutMix or label smoothing on, targets are soft (B, num_classes) float32 in every epoch
    (one-hot, smoothed if asked, when a batch is not mixed), and :attr:`mix_info` holds the batch's
    hard labels, lambda and smoothing: pass it to the loss (``loss(logits, target,
    mix=loader.mix_info)``) for the paper's ``lam * L(x, y_b) + (1 - lam) * L(x, y_f)``. Without
    either, targets are the hard labels and ``mix_info`` is None. With a dual batch in the plan
    (``dual_r``), :attr:`dual` holds the batch's :class:`~timm_cmo.data.dual.DualBatch` (images and hard
    labels, never mixed); else None. Call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
            self,
            loader: Union[torch.utils.data.DataLoader, PrefetchLoader],
            batch_sampler: PlanBatchSampler,
            mixer: Optional[CMOMixup] = None,
            device: Optional[torch.device] = None,
            num_classes: Optional[int] = None,
            label_smoothing: float = 0.0,
            remix: Optional[RemixMixup] = None,
            mixup: Optional[MixupCutmix] = None,
    ):
        check_one_mixer(mixer is not None, remix is not None, mixup is not None)
        self.loader = loader
        self.batch_sampler = batch_sampler
        self.planner = batch_sampler.planner
        self.mixer = mixer
        self.remix = remix
        self.mixup = mixup
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.device = device
        self.epoch = 0
        self.mix_info: Optional[MixInfo] = None
        self.dual: Optional[DualBatch] = None
        self.set_epoch(0)

    @property
    def cmo(self) -> bool:
        return self.mixer is not None

    @property
    def active(self) -> bool:
        """Whether CMO mixes in the current epoch."""
        return self.planner.cmo_active(self.epoch)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)
        reseed_mixers(self, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        prefetched = isinstance(self.loader, PrefetchLoader)
        for x, y in self.loader:
            if not prefetched and self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            x, y, self.dual = split_dual(x, y, self.label_smoothing)
            if self.mixer is None:
                x, y = mix_unplanned(self, x, y)
                yield x, y
                continue
            if y.ndim == 1:
                x, target = self.mixer.paste(x, y, x[:0], y)
            else:
                b = y.shape[1]
                x, target = self.mixer.paste(x[:b], y[0], x[b:], y[1])
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
        drop_last: Optional[bool] = None,
        ros_r: Optional[float] = None,
        dual_r: Optional[float] = None,
        remix: bool = False,
        remix_kappa: float = 3.0,
        remix_tau: float = 0.5,
        remix_alpha: float = 1.0,
        remix_mode: str = 'mixup',
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cutmix_minmax: Optional[Sequence[float]] = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = 'batch',
        mixup_off_epoch: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        **kwargs: Any,
) -> Union[CMOLoader, torch.utils.data.DataLoader, PrefetchLoader]:
    """Create a data loader like ``timm.data.create_loader``, with CMO for training.

    Training batches follow an :class:`~timm_cmo.data.plan.EpochPlanner` seeded by ``(seed, epoch)``
    (background order, ROS draws, CMO decisions and foregrounds, and each batch's augmentation
    seed), so an epoch is the same whatever the number of workers, and a resumed run repeats it.
    The ``cmo_*`` arguments are the fields of :class:`~timm_cmo.data.cmo.CMOConfig`.

    Args:
        dataset: A map-style dataset with per-sample labels (``targets`` or a timm reader).
        input_size, batch_size, is_training: As in timm's ``create_loader``.
        num_classes: Number of classes (soft targets); from ``dataset.num_classes`` when None.
        label_smoothing: timm's label smoothing of the (then soft) targets.
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
        seed: Seed of the epoch plan, the mixing and the augmentation.
        train_crop_mode: timm's ('rrc', 'rkrc', 'rkrr') or ``'pad'``: the paper's CIFAR recipe,
            pad by ``crop_padding`` then random crop to the input size (+ timm's flips etc.).
        crop_padding: Padding of the ``'pad'`` crop mode. Default 4.
        drop_last: Drop the last incomplete training batch; None: timm's default (True for
            training). The paper's loaders keep it (False).
        ros_r: Random oversampling of the backgrounds with per-sample weight n_k^-ros_r
            (1: class-balanced, 0.5: square-root); None: off.
        dual_r: A dual batch beside every batch (BBN's re-balancing batch, ``loader.dual``), drawn with
            per-sample weight n_k^-dual_r (2: BBN's reversed sampler); None: off.
        remix: Remix (Chou et al., 2020) every batch with a permutation of itself instead of CMO;
            ``remix_kappa``, ``remix_tau``, ``remix_alpha``, ``remix_mode`` are the arguments of
            :class:`~timm_cmo.data.remix.RemixMixup`.
        mixup, cutmix, cutmix_minmax, mixup_prob, mixup_switch_prob, mixup_mode, mixup_off_epoch: timm's
            Mixup / CutMix of each batch with itself reversed, as timm's train.py flags of these names
            (on when ``mixup`` > 0, ``cutmix`` > 0 or ``cutmix_minmax`` is set; not with CMO or Remix):
            :class:`~timm_cmo.data.mixup.MixupCutmix`.
        device: Where batches go (and are mixed); None: CUDA when available, else the CPU.
        **kwargs: Any other argument of ``timm.data.create_loader`` (augmentation, workers,
            distributed, use_prefetcher, ...).

    Returns:
        For training, a :class:`CMOLoader` (set its epoch with ``set_epoch``); for evaluation,
        timm's loader.
    """
    config = CMOConfig(r=cmo_r, effective=cmo_effective, prob=cmo_prob, beta=cmo_beta, start_epoch=cmo_start_epoch,
                       end_epochs=cmo_end_epochs, mode=cmo_mode, variant=cmo_variant)
    device = resolve_device(device)
    pad_crop = train_crop_mode == 'pad'
    loader = create_loader(
        dataset,
        input_size=input_size,
        batch_size=batch_size,
        is_training=is_training,
        train_crop_mode=None if pad_crop else train_crop_mode,
        device=device,
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

    use_mixup = mixup != 0 or cutmix != 0 or cutmix_minmax is not None
    check_one_mixer(cmo, remix, use_mixup)
    if (cmo or remix or use_mixup or label_smoothing > 0) and num_classes is None:
        num_classes = getattr(dataset, 'num_classes', None)
        if num_classes is None:
            raise ValueError('num_classes is needed for soft targets (CMO, Remix, Mixup / CutMix, label smoothing)')
    if not 0. <= label_smoothing < 1.:
        raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
    if kwargs.get('use_multi_epochs_loader', False):
        raise ValueError('use_multi_epochs_loader is not supported by the planned training loader')
    if kwargs.get('input_size_choices') is not None:
        raise ValueError('Scheduled input sizes (input_size_choices) are not supported by the planned training loader')
    if kwargs.get('num_aug_repeats', 0):
        raise ValueError('num_aug_repeats is not supported by the planned training loader')

    distributed = kwargs.get('distributed', False)
    planner = EpochPlanner(
        dataset_targets(dataset),
        batch_size,
        drop_last=inner.drop_last if drop_last is None else drop_last,
        cmo=config if cmo else None,
        epochs=epochs,
        ros_r=ros_r,
        dual_r=dual_r,
        seed=seed,
        num_replicas=None if distributed else 1,
        rank=None if distributed else 0,
    )
    batch_sampler = PlanBatchSampler(planner)
    collate = inner.collate_fn
    if collate is None or collate is fast_collate or collate is default_collate:
        collate = CMOCollate(collate or default_collate)
    else:
        raise ValueError('A custom collate_fn cannot be combined with the planned training loader')
    planned = torch.utils.data.DataLoader(
        _TaggedDataset(dataset),
        batch_sampler=batch_sampler,
        num_workers=inner.num_workers,
        collate_fn=collate,
        pin_memory=inner.pin_memory,
        worker_init_fn=inner.worker_init_fn,
        persistent_workers=inner.persistent_workers,
    )
    if isinstance(loader, PrefetchLoader):
        loader.loader = planned
    else:
        loader = planned
    mean, std = kwargs.get('mean', IMAGENET_DEFAULT_MEAN), kwargs.get('std', IMAGENET_DEFAULT_STD)
    return CMOLoader(
        loader,
        batch_sampler,
        mixer=config.mixer(num_classes, label_smoothing, mean=mean, std=std) if cmo else None,
        device=device,
        num_classes=num_classes,
        label_smoothing=label_smoothing,
        remix=RemixMixup(num_classes, np.bincount(planner.targets, minlength=num_classes), kappa=remix_kappa,
                         tau=remix_tau, alpha=remix_alpha, mode=remix_mode,
                         label_smoothing=label_smoothing) if remix else None,
        mixup=MixupCutmix(num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax,
                          prob=mixup_prob, switch_prob=mixup_switch_prob, mode=mixup_mode,
                          label_smoothing=label_smoothing, off_epoch=mixup_off_epoch) if use_mixup else None,
    )
