""" Held-out validation sets for tuning, and test sets under a shifted label prior.

Validation ("tune") sets, for choosing a post-hoc tau (:mod:`timm_cmo.posthoc`) without the test set:

* :func:`leftover_holdout_indices`: a class-balanced, seeded set of ``per_class`` images per class from the
  training images the long-tailed subsampling left out (how ImageNet-LT's validation list of 20 images per
  class was drawn from the ImageNet training images outside ImageNet-LT); the model never saw them.
* :func:`stratified_holdout`: a stratified fraction of the (long-tailed) training set, held out of training.

Shifted test priors (the test-agnostic long-tail protocol: LADE, Hong et al. CVPR 2021; SADE, Zhang et al.
NeurIPS 2022): a balanced test set subsampled, per class and seeded, to

* ``forward``: the training profile, ``n_max * (1/rho)^(r/(C-1))`` images for the class of training-frequency
  rank ``r`` (rank 0: the largest training class), rounded down as the long-tail profile is;
* ``backward``: the inverted profile, rank ``r`` getting what rank ``C-1-r`` gets in ``forward``;
* ``uniform``: ``n_max`` images for every class;
* a file of C non-negative class weights (one per line): ``int(n_max * w_k / max(w))`` images for class ``k``;

``n_max`` being the smallest class of the test set as given (its per-class size when it is balanced). On
CIFAR-LT, whose classes are ordered by training size, ``forward`` is LADE's ``IMBALANCECIFAR`` test set with
``test_imb_ratio`` and ``backward`` the ``reverse=True`` one.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .dataset import long_tail_counts, long_tail_indices

__all__ = ['TEST_PRIORS', 'leftover_holdout_indices', 'stratified_holdout', 'stratified_holdout_counts',
           'shifted_prior_counts', 'shifted_test_indices', 'describe_prior', 'read_prior_file', 'PriorFileError']

TEST_PRIORS = ('uniform', 'forward', 'backward')


class PriorFileError(ValueError):
    """A test-prior file is unreadable or malformed; the message names the file (and line)."""


def leftover_holdout_indices(
        source_targets: Sequence[int],
        used_indices: Sequence[int],
        per_class: int,
        num_classes: int,
        seed: int = 0,
) -> np.ndarray:
    """``per_class`` images of every class from the source samples outside ``used_indices``.

    For each class in index order its unused source indices (ascending) are shuffled with one
    ``numpy.random.RandomState(seed)`` and the first ``per_class`` kept, as the long-tailed subset is drawn.

    Args:
        source_targets: (N,) labels of the whole training source.
        used_indices: Source indices of the training set (the long-tailed subset).
        per_class: Images per class to hold out (>= 1).
        num_classes: Number of classes C.
        seed: Seed of the choice.

    Returns:
        (C * per_class,) int64 source indices, grouped by class. ValueError naming the classes with fewer
        than ``per_class`` unused images.
    """
    if isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1:
        raise ValueError(f'per_class must be a positive integer, got {per_class!r}')
    targets = np.asarray(source_targets, dtype=np.int64)
    unused = np.ones(len(targets), dtype=bool)
    unused[np.asarray(used_indices, dtype=np.int64)] = False
    pool = np.nonzero(unused)[0]
    available = np.bincount(targets[pool], minlength=num_classes)[:num_classes]
    short = {c: int(n) for c, n in enumerate(available) if n < per_class}
    if short:
        raise ValueError(f'{len(short)} classes have fewer than {per_class} training images outside the training set '
                         f'(class: images left) {dict(list(short.items())[:8])}'
                         f'{" ..." if len(short) > 8 else ""}')
    chosen = long_tail_indices(targets[pool], [int(per_class)] * num_classes, seed=seed)
    return pool[chosen]


def stratified_holdout_counts(class_counts: Sequence[int], fraction: float) -> List[int]:
    """Images held out of each class: ``round(fraction * n_k)``, at least 1 and at most ``n_k - 1`` (a class
    keeps one training image; a class of one image holds none out)."""
    if not 0 < fraction < 1:
        raise ValueError(f'fraction must be in (0, 1), got {fraction!r}')
    return [0 if n < 2 else int(min(n - 1, max(1, round(fraction * n)))) for n in (int(n) for n in class_counts)]


def stratified_holdout(targets: Sequence[int], fraction: float, num_classes: int,
                       seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split a training set into (kept, held-out) positions, per class (:func:`stratified_holdout_counts`).

    Each class's positions are shuffled with one ``RandomState(seed)`` (classes in index order); the first
    ``h_k`` are held out. Returns two int64 arrays of positions into ``targets``, each ascending.
    """
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=num_classes)
    held = long_tail_indices(targets, stratified_holdout_counts(counts, fraction), seed=seed)
    mask = np.zeros(len(targets), dtype=bool)
    mask[held] = True
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


def read_prior_file(path: str, num_classes: Optional[int] = None) -> np.ndarray:
    """Class weights from a text file: one non-negative number per line, class 0 first; blank lines and
    ``#`` comments are skipped. PriorFileError naming the file (and the line) for a bad entry, a count other
    than ``num_classes``, or weights all zero. Returns (C,) float64, unnormalised."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PriorFileError(f'cannot read the test-prior file {path!r}: {e}') from None
    values = []
    for lineno, line in enumerate(lines, 1):
        text = line.split('#', 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise PriorFileError(f'{path}, line {lineno}: {text!r} is not a number') from None
        if not np.isfinite(value) or value < 0:
            raise PriorFileError(f'{path}, line {lineno}: {text!r}: class weights must be finite and >= 0')
        values.append(value)
    if num_classes is not None and len(values) != num_classes:
        raise PriorFileError(f'{path}: {len(values)} class weights for {num_classes} classes (one line per class)')
    weights = np.asarray(values, dtype=np.float64)
    if not len(weights) or weights.sum() <= 0:
        raise PriorFileError(f'{path}: the class weights are all zero (or there are none)')
    return weights


def shifted_prior_counts(
        profile: Union[str, Sequence[float]],
        test_counts: Sequence[int],
        train_counts: Optional[Sequence[int]] = None,
        imb_ratio: Optional[float] = None,
) -> List[int]:
    """Per-class image counts of a test set under ``profile`` (see the module docstring).

    Args:
        profile: ``'uniform'``, ``'forward'``, ``'backward'`` or (C,) non-negative class weights.
        test_counts: (C,) images per class of the test set as given; ``n_max`` is their minimum.
        train_counts: (C,) training images per class, ranking the classes for ``forward`` / ``backward``
            (largest first, ties by class index); None: class index order (CIFAR-LT).
        imb_ratio: rho = n_max / n_min of ``forward`` / ``backward`` (>= 1).
    """
    test_counts = [int(n) for n in test_counts]
    num_classes = len(test_counts)
    n_max = min(test_counts)
    if n_max < 1:
        raise ValueError(f'class {test_counts.index(n_max)} has no test images: no profile can be drawn')
    if isinstance(profile, str):
        if profile not in TEST_PRIORS:
            raise ValueError(f'unknown test prior {profile!r}; choose from {", ".join(TEST_PRIORS)} or give a file')
        if profile == 'uniform':
            return [n_max] * num_classes
        if imb_ratio is None:
            raise ValueError(f'the {profile} profile needs an imbalance ratio')
        by_rank = long_tail_counts(n_max, num_classes, imb_ratio)
        if profile == 'backward':
            by_rank = by_rank[::-1]
        order = (np.argsort(-np.asarray(train_counts), kind='stable') if train_counts is not None
                 else np.arange(num_classes))
        if len(order) != num_classes:
            raise ValueError(f'{len(order)} training class counts for {num_classes} test classes')
        counts = [0] * num_classes
        for rank, c in enumerate(order):
            counts[int(c)] = int(by_rank[rank])
        if min(counts) < 1:
            raise ValueError(f'the {profile} profile with imbalance ratio {imb_ratio:g} leaves classes without test '
                             f'images (the test set has {n_max} per class): lower the ratio')
        return counts
    weights = np.asarray(profile, dtype=np.float64)
    if weights.shape != (num_classes,):
        raise ValueError(f'{weights.size} class weights for {num_classes} classes')
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError('class weights must be finite, >= 0 and not all zero')
    return [int(n_max * w / weights.max()) for w in weights]


def shifted_test_indices(targets: Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Positions of a seeded per-class subsample of ``targets`` with ``counts[c]`` images of class ``c``
    (:func:`timm_cmo.data.long_tail_indices`), ascending."""
    return np.sort(long_tail_indices(np.asarray(targets), counts, seed=seed))


def describe_prior(counts: Sequence[int]) -> Dict[str, object]:
    """``{'class_counts', 'prior', 'images', 'measured_imb_ratio'}`` of a test profile (the ratio of the largest to
    the smallest non-empty class)."""
    counts = np.asarray(counts, dtype=np.int64)
    nonzero = counts[counts > 0]
    return dict(class_counts=counts.tolist(), prior=(counts / counts.sum()).tolist(), images=int(counts.sum()),
                measured_imb_ratio=float(nonzero.max() / nonzero.min()) if len(nonzero) else None)
