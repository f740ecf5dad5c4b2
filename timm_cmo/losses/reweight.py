"""Class counts, class-balanced weights and the deferred re-weighting (DRW) schedule.

Follows the LDAM-DRW code (Cao et al., NeurIPS 2019) that CMO builds on: class-balanced
weights from the effective number of samples (Cui et al., CVPR 2019),
``w_k = (1 - beta) / (1 - beta ** n_k)`` normalised to sum to the number of classes ``C``,
and DRW, which trains unweighted until ``drw_epoch`` and with those weights from then on.
"""
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from timm.loss import compute_class_weights

__all__ = [
    'REWEIGHT_CHOICES', 'ClassCounts', 'check_class_counts', 'check_finite', 'class_balanced_weights',
    'resolve_drw_epoch', 'resolve_switch_epoch',
]

REWEIGHT_CHOICES = ('none', 'cb', 'drw')

ClassCounts = Union[Sequence[float], np.ndarray, torch.Tensor]

_MAX_LISTED = 10


def _listed(values) -> str:
    values = list(values)
    more = f' ... ({len(values)} in all)' if len(values) > _MAX_LISTED else ''
    return f'{values[:_MAX_LISTED]}{more}'


def check_class_counts(class_counts: ClassCounts) -> np.ndarray:
    """Validate per-class training image counts and return them as a float64 numpy array.

    Args:
        class_counts: ``(C,)`` counts in class-index order (sequence, numpy array or tensor).

    Raises:
        ValueError: if the counts are not 1-D, are empty, or hold non-finite, zero or negative
            entries (the message names the offending class indices and their counts).
    """
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().double().numpy()
    try:
        counts = np.asarray(class_counts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f'class_counts must be a sequence of numbers, got {class_counts!r}') from e
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f'class_counts must be a non-empty 1-D sequence (one count per class), '
            f'got shape {tuple(counts.shape)}')
    bad = np.flatnonzero(~(np.isfinite(counts) & (counts > 0)))
    if bad.size:
        raise ValueError(
            f'class_counts must be finite and positive; classes {_listed(bad.tolist())} have '
            f'counts {_listed(counts[bad].tolist())}')
    return counts


def class_balanced_weights(class_counts: ClassCounts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples (Cui et al., 2019).

    ``w_k = (1 - beta) / (1 - beta ** n_k)``, then ``w <- w / sum(w) * C``, exactly as the
    LDAM-DRW code computes them (float64, returned as float32). ``beta=0`` gives all ones.

    Args:
        class_counts: ``(C,)`` per-class training image counts, all positive.
        beta: effective-number hyper-parameter in ``[0, 1)``. Default 0.9999.

    Returns:
        ``(C,)`` float32 tensor of weights summing to ``C``.
    """
    counts = check_class_counts(class_counts)
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f'cb_beta must be in [0, 1), got {beta}')
    if beta == 0.0:  # every effective number is 1 (timm's helper needs beta in (0, 1))
        return torch.ones(len(counts), dtype=torch.float32)
    # timm's effective-number weights have mean 1, i.e. they sum to C as the LDAM-DRW code normalises them
    _, weights = compute_class_weights(counts, int(counts.sum()), method='effective_num', beta=beta)
    return weights


def resolve_switch_epoch(name: str, epoch: Optional[int], epochs: Optional[int], default: Callable[[int], int],
                         missing: str) -> int:
    """A 0-based epoch at which a loss switches (DRW's weights, IB's loss): ``epoch`` (argument ``name``) if given,
    else ``default(epochs)``; neither given: ``ValueError(missing)``."""
    if epoch is not None:
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f'{name} must be a non-negative integer, got {epoch!r}')
        return int(epoch)
    if epochs is not None:
        if isinstance(epochs, bool) or int(epochs) != epochs or epochs <= 0:
            raise ValueError(f'epochs must be a positive integer, got {epochs!r}')
        return default(int(epochs))
    raise ValueError(missing)


def resolve_drw_epoch(drw_epoch: Optional[int] = None, epochs: Optional[int] = None) -> int:
    """The (0-based) epoch from which DRW applies class-balanced weights.

    ``drw_epoch`` if given, else ``int(0.8 * epochs)`` (160 of 200 epochs on CIFAR-LT,
    80 of 100 on ImageNet-LT).
    """
    return resolve_switch_epoch(
        'drw_epoch', drw_epoch, epochs, lambda n: int(0.8 * n),
        "reweight='drw' needs the deferral epoch: pass drw_epoch=<0-based epoch from which "
        "class-balanced weights apply> or epochs=<total training epochs> "
        "(drw_epoch then defaults to int(0.8 * epochs))")


def check_finite(name: str, value: float, positive: bool = False) -> float:
    """``value`` as a float if finite and non-negative (``positive``: > 0), else ``ValueError`` naming ``name``."""
    if not (np.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f'{name} must be finite and {"positive" if positive else "non-negative"}, got {value!r}')
    return float(value)
