""" Class-weighted sampling (the paper's Eq. 2, as its code applies it).

Each *sample* of class k gets the weight n_k^-r (or 1/E(k) with the effective number), and
samples are drawn with replacement in proportion to these weights. A draw therefore lands in
class k with probability n_k^(1-r) / sum_j n_j^(1-r): r=0 is the data distribution, r=1
class-balanced sampling, r=2 favours rare classes more.
"""
import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _check_counts(class_counts: Sequence[float], r: float, effective: bool) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f'class_counts must be a non-empty 1-D sequence, got shape {counts.shape}')
    if not r >= 0:
        raise ValueError(f'r must be >= 0, got {r}')
    negative = np.nonzero(counts < 0)[0]
    if len(negative):
        raise ValueError(f'class_counts has negative entries at classes {negative.tolist()}: {counts[negative].tolist()}')
    if counts.sum() <= 0:
        raise ValueError('class_counts sums to zero: the dataset is empty')
    zero = np.nonzero(counts == 0)[0]
    if len(zero) and (r > 0 or effective):
        raise ValueError(
            f'Classes {zero.tolist()} have zero training images: their sampling weight '
            f'{"1/E(0)" if effective else f"0^-{r}"} is undefined')
    return counts


def class_weights(class_counts: Sequence[float], r: float = 1.0, effective: bool = False) -> np.ndarray:
    """Per-sample weight of each class: n_k^-r, or 1/E(k) with the effective number.

    E(k) = (1 - b^n_k) / (1 - b) with b = (N - 1) / N, N = total training images.

    Returns:
        float64 array (C,), unnormalised.
    """
    counts = _check_counts(class_counts, r, effective)
    if effective:
        total = counts.sum()
        if total <= 1:
            return np.ones_like(counts)  # b = 0: E(k) = 1 for every class
        beta = (total - 1.) / total
        # 1 - b^n computed as -expm1(n log b) to keep precision when b is close to 1
        effective_num = -np.expm1(counts * np.log(beta)) / (1. - beta)
        with np.errstate(divide='ignore'):
            return np.where(counts > 0, 1. / effective_num, 0.)
    with np.errstate(divide='ignore'):
        return np.where(counts > 0, counts ** -r, 0.) if r > 0 else np.ones_like(counts)


def class_sampling_probs(class_counts: Sequence[float], r: float = 1.0, effective: bool = False) -> np.ndarray:
    """Probability that one weighted draw is of class k: proportional to n_k * w_k.

    With w_k = n_k^-r this is n_k^(1-r) / sum_j n_j^(1-r); with ``effective=True``,
    w_k = 1/E(k) and the probability is proportional to n_k / E(k).

    Args:
        class_counts: Training images per class (C,).
        r: Exponent of the per-sample weight n_k^-r (>= 0); 1 gives class-balanced draws.
        effective: Use the effective number E(k) instead of n_k^r.

    Returns:
        float64 array (C,) summing to 1.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    mass = counts * class_weights(counts, r=r, effective=effective)
    return mass / mass.sum()


def sample_weights(targets: Sequence[int], r: float = 1.0, effective: bool = False) -> torch.Tensor:
    """Per-sample weights (N,) float64 for ``targets``: each sample gets its class's weight."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 1 or len(targets) == 0:
        raise ValueError(f'targets must be a non-empty 1-D sequence of labels, got shape {targets.shape}')
    if targets.min() < 0:
        raise ValueError(f'targets holds a negative label: {int(targets.min())}')
    counts = np.bincount(targets)
    present = counts > 0
    weights = np.zeros(len(counts))
    # classes absent from targets never need a weight
    weights[present] = class_weights(counts[present], r=r, effective=effective)
    return torch.from_numpy(weights[targets])


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (same on every machine)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _dist_defaults(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f'Invalid rank {rank} for num_replicas={num_replicas}')
    return num_replicas, rank


class ClassWeightedSampler(Sampler[int]):
    """Draw sample indices with replacement, each with its class's weight n_k^-r (or 1/E(k)).

    One epoch draws ``num_samples`` indices in total (default: the dataset size), shared among
    ``num_replicas`` ranks: every rank takes a disjoint slice of the same seeded draw, so the
    ranks' shares differ and together equal the single-process draw. Draws are reproducible from
    ``(seed, epoch)``; call :meth:`set_epoch` each epoch. Iterating again within an epoch
    continues with fresh draws (pass 1, 2, ... of the epoch), still reproducible.

    Args:
        targets: Per-sample labels (N,).
        r: Weight exponent (>= 0); 1 draws every class equally often.
        effective: Weight 1/E(k) with the effective number instead of n_k^-r.
        num_samples: Draws per epoch over all ranks; defaults to N.
        seed: Base seed.
        num_replicas: Number of ranks; defaults to the process group size (1 when none).
        rank: This rank; defaults to the process group rank (0 when none).
    """

    def __init__(
            self,
            targets: Sequence[int],
            r: float = 1.0,
            effective: bool = False,
            num_samples: Optional[int] = None,
            seed: int = 0,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
    ):
        weights = sample_weights(targets, r=r, effective=effective)
        if num_samples is None:
            num_samples = len(weights)
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f'num_samples must be a positive integer, got {num_samples!r}')
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.weights = weights
        self.r = r
        self.effective = effective
        self.seed = seed
        self.epoch = 0
        self._pass = 0
        self.num_samples_total = num_samples
        self.num_samples = math.ceil(num_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._pass = 0

    def draw(self, epoch: int, pass_idx: int = 0) -> torch.Tensor:
        """The full (all-rank) draw of ``total_size`` indices for ``(epoch, pass_idx)``."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch, pass_idx))
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)

    def __iter__(self) -> Iterator[int]:
        indices = self.draw(self.epoch, self._pass)
        self._pass += 1
        return iter(indices[self.rank:self.total_size:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
