""" The per-epoch sampling plan of a training loader, shared by the ordinary loader and ``--data-on-device``.

Everything random about *which* images make a batch is decided here, once per epoch, from
``(seed, epoch, rank)`` alone: the background order (a shuffled epoch split across ranks like
``DistributedSampler``, or with ROS draws with per-sample weight n_k^-r), whether CMO mixes a
batch (or, in elem mode, a sample), which foregrounds are pasted where, the dual batch of two-branch
methods (BBN's re-balancing batch, :mod:`timm_cmo.data.dual`), and a seed for each batch's
augmentation. Both loaders turn the same plan into pixels, so their sampling can not
drift apart, and a run resumed at epoch e repeats epoch e exactly, whatever the number of
loader workers.
"""
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .cmo import CMOConfig
from .sampler import ClassWeightedSampler, _dist_defaults, derive_seed

__all__ = ['BatchPlan', 'EpochPlanner']

# keys of the random streams derived from (seed, epoch, ...): one number per stream
_DECIDE, _ORDER, _BATCH_SEED = 1, 3, 6
_ROS_STREAM, _P_STREAM, _DUAL_STREAM = 11, 12, 13
_EMPTY = np.zeros(0, dtype=np.int64)


class BatchPlan(NamedTuple):
    """One batch of the plan.

    Attributes:
        index: (b,) int64 dataset indices of the backgrounds.
        fg_index: (m,) int64 dataset indices of the foregrounds (m = 0: not mixed).
        fg_pos: (m,) int64 batch positions the foregrounds are pasted onto, ascending
            (``0..b-1`` in batch mode).
        seed: Seed of this batch's augmentation (crops, flips, colour, ...).
        dual_index: (b,) int64 dataset indices of the dual batch (empty without ``dual_r``).
    """
    index: np.ndarray
    fg_index: np.ndarray
    fg_pos: np.ndarray
    seed: int
    dual_index: np.ndarray = _EMPTY


def _share(sampler: ClassWeightedSampler, epoch: int, pass_idx: int = 0) -> np.ndarray:
    """This rank's share of the sampler's draw for ``(epoch, pass_idx)``."""
    return sampler.draw(epoch, pass_idx)[sampler.rank:sampler.total_size:sampler.num_replicas].numpy()


def _stream(sampler: ClassWeightedSampler, epoch: int) -> Iterator[int]:
    """Endless draws of ``sampler`` for ``epoch``: pass 0, 1, ... of that epoch."""
    pass_idx = 0
    while True:
        yield from _share(sampler, epoch, pass_idx).tolist()
        pass_idx += 1


class EpochPlanner:
    """Plan the batches of one training epoch for this rank.

    Args:
        targets: (N,) per-sample labels.
        batch_size: Backgrounds per batch and rank.
        drop_last: Drop the last incomplete batch (timm's default for training); False keeps it,
            as the paper's loaders do.
        cmo: The CMO options; None for no CMO.
        epochs: Total epochs (end of the CMO window).
        ros_r: Random oversampling: draw backgrounds with replacement with per-sample weight
            n_k^-ros_r (1: class-balanced, 0.5: square-root sampling) instead of a shuffled epoch.
            None (default): a shuffled epoch.
        dual_r: A dual batch beside every batch, of the same size, drawn with replacement with per-sample
            weight n_k^-dual_r (2: BBN's reversed sampler, class k drawn with probability proportional to
            n_max / n_k; 1: class-balanced; 0: the data distribution). Never mixed. None (default): none.
        seed: Base seed of every stream.
        num_replicas, rank: Distributed split (defaults from the process group).
    """

    def __init__(
            self,
            targets: Sequence[int],
            batch_size: int,
            drop_last: bool = True,
            cmo: Optional[CMOConfig] = None,
            epochs: Optional[int] = None,
            ros_r: Optional[float] = None,
            dual_r: Optional[float] = None,
            seed: int = 0,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        if ros_r is not None and not ros_r >= 0:
            raise ValueError(f'ros_r must be >= 0, got {ros_r}')
        if dual_r is not None and not dual_r >= 0:
            raise ValueError(f'dual_r must be >= 0, got {dual_r}')
        self.targets = np.asarray(targets, dtype=np.int64)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.cmo = cmo
        self.epochs = epochs
        self.ros_r = ros_r
        self.dual_r = dual_r
        self.seed = seed
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        n = len(self.targets)
        self.num_samples = -(-n // self.num_replicas)  # per rank, as DistributedSampler pads
        split = dict(num_samples=n, num_replicas=self.num_replicas, rank=self.rank)
        self.ros_sampler = ClassWeightedSampler(
            self.targets, r=ros_r, seed=derive_seed(seed, _ROS_STREAM), **split) if ros_r is not None else None
        self.dual_sampler = ClassWeightedSampler(
            self.targets, r=dual_r, seed=derive_seed(seed, _DUAL_STREAM), **split) if dual_r is not None else None
        self.q_sampler = self.p_sampler = None
        if cmo is not None:
            self.q_sampler = ClassWeightedSampler(self.targets, r=cmo.r, effective=cmo.effective, seed=seed, **split)
            if cmo.foreground_from_p:
                self.p_sampler = ClassWeightedSampler(self.targets, r=0., seed=derive_seed(seed, _P_STREAM), **split)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def cmo_active(self, epoch: int) -> bool:
        """Whether CMO mixes in ``epoch``."""
        return self.cmo is not None and self.cmo.active(epoch, self.epochs)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's background indices for ``epoch`` (before batching), (num_samples,) int64."""
        if self.ros_sampler is not None:
            return _share(self.ros_sampler, epoch)
        n = len(self.targets)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch, _ORDER))
        perm = torch.randperm(n, generator=g).numpy()
        total = self.num_samples * self.num_replicas
        if total > n:
            perm = np.concatenate([perm, perm[:total - n]])
        return perm[self.rank:total:self.num_replicas]

    def plan(self, epoch: int) -> List[BatchPlan]:
        """The batches of ``epoch`` for this rank."""
        order = self.order(epoch)
        active = self.cmo_active(epoch)
        cfg = self.cmo
        decide = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, _DECIDE))
        q_stream = _stream(self.q_sampler, epoch) if active else None
        fg_stream = _stream(self.p_sampler, epoch) if active and cfg.foreground_from_p else q_stream
        dual_stream = _stream(self.dual_sampler, epoch) if self.dual_sampler is not None else None
        batches = []
        empty = _EMPTY
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            b = len(index)
            fg_pos = empty
            if active:
                if cfg.background_from_q:
                    index = np.fromiter((next(q_stream) for _ in range(b)), dtype=np.int64, count=b)
                if cfg.mode == 'batch':
                    fg_pos = np.arange(b, dtype=np.int64) if decide.random() < cfg.prob else empty
                else:
                    fg_pos = np.nonzero(decide.random(b) < cfg.prob)[0].astype(np.int64)
            fg_index = np.fromiter((next(fg_stream) for _ in range(len(fg_pos))), dtype=np.int64,
                                   count=len(fg_pos)) if len(fg_pos) else empty
            dual_index = np.fromiter((next(dual_stream) for _ in range(b)), dtype=np.int64,
                                     count=b) if dual_stream is not None else empty
            seed = derive_seed(self.seed, epoch, self.rank, _BATCH_SEED, i)
            batches.append(BatchPlan(index, fg_index, fg_pos, seed, dual_index))
        return batches
