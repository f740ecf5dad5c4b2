"""Long-tail evaluation: per-class top-1 / top-5 counters and the many / medium / few summary.

:class:`ClassAccuracy` accumulates per-class sample, top-1 and top-5 counts on the evaluation
device (no host sync per batch), sums them across ranks with :meth:`ClassAccuracy.all_reduce`
and reduces them to the numbers of a long-tail results table with :meth:`ClassAccuracy.summary`.
"""
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data.dataset import shot_groups

__all__ = ['ClassAccuracy', 'head_middle_tail']

_COUNT, _TOP1, _TOP5 = range(3)


def head_middle_tail(train_class_counts: Sequence[int], head: float = 0.3, tail: float = 0.3) -> Dict[str, np.ndarray]:
    """Split classes sorted by training images (descending, stable) into head / middle / tail.

    Head is the first ``int(head * C)`` classes, tail the last ``int(tail * C)``, middle the rest
    (CIFAR-10-LT: classes 0-2 / 3-6 / 7-9). Returns class-index arrays, possibly empty.
    """
    counts = np.asarray(train_class_counts, dtype=np.int64)
    num_classes = len(counts)
    order = np.argsort(-counts, kind='stable')
    n_head, n_tail = int(head * num_classes), int(tail * num_classes)
    return dict(
        head=order[:n_head],
        middle=order[n_head:num_classes - n_tail],
        tail=order[num_classes - n_tail:],
    )


def _group_mean(accuracy: np.ndarray, classes: Sequence[int]) -> Optional[float]:
    """Mean of per-class accuracies over ``classes`` that have test samples; None if there are none."""
    values = accuracy[np.asarray(classes, dtype=np.int64)]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


class ClassAccuracy:
    """Per-class top-1 / top-5 accuracy counters for long-tailed evaluation.

    Counters are a (3, C) int64 tensor (samples, top-1 correct, top-k correct, k = min(5, C)) kept on
    ``device``; with ``device=None`` they live on the device of the first ``update``'s logits.

    Args:
        num_classes: Number of classes C.
        device: Device of the counters. Default: that of the first batch.
    """

    def __init__(self, num_classes: int, device=None) -> None:
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes = num_classes
        self.topk = min(5, num_classes)
        self.device = torch.device(device) if device is not None else None
        self._counts: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self._counts = None if self.device is None else self._zeros(self.device)

    def _zeros(self, device) -> torch.Tensor:
        return torch.zeros(3, self.num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Accumulate a batch, on the counters' device and without host synchronisation.

        Args:
            logits: (B, C) scores.
            target: (B,) integer class labels.
            valid: Optional (B,) bool mask; False entries (e.g. padded duplicates of a distributed
                sampler) are not counted.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f'logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}')
        if self._counts is None:
            self._counts = self._zeros(logits.device)
        device = self._counts.device
        target = target.to(device=device, dtype=torch.int64, non_blocking=True).reshape(-1)
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f'target has {target.shape[0]} entries for {logits.shape[0]} logits')
        pred = logits.detach().to(device, non_blocking=True).topk(self.topk, dim=1).indices  # (B, k)
        correct = pred.eq(target[:, None])
        hits = torch.stack([torch.ones_like(correct[:, 0]), correct[:, 0], correct.any(dim=1)])  # (3, B)
        if valid is not None:
            hits = hits & valid.to(device=device, dtype=torch.bool, non_blocking=True).reshape(1, -1)
        self._counts.scatter_add_(1, target.expand(3, -1), hits.to(torch.int64))

    def all_reduce(self) -> None:
        """Sum the counters across ranks when torch.distributed is initialised (no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._counts is None:
            self._counts = self._zeros('cuda' if dist.get_backend() == 'nccl' else 'cpu')
        if dist.get_backend() == 'nccl' and self._counts.device.type != 'cuda':
            self._counts = self._counts.to(torch.device('cuda', torch.cuda.current_device()))
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)

    def counts(self) -> np.ndarray:
        """(3, C) int64 array of samples, top-1 correct and top-k correct per class."""
        if self._counts is None:
            return np.zeros((3, self.num_classes), dtype=np.int64)
        return self._counts.cpu().numpy()

    def per_class(self) -> Dict[str, np.ndarray]:
        """Per-class ``count`` (C,) int and ``top1`` / ``top5`` (C,) accuracy in %, NaN without test samples."""
        counts = self.counts()
        n = counts[_COUNT]
        with np.errstate(divide='ignore', invalid='ignore'):
            top1 = np.where(n > 0, 100. * counts[_TOP1] / n, np.nan)
            top5 = np.where(n > 0, 100. * counts[_TOP5] / n, np.nan)
        return dict(count=n, top1=top1, top5=top5)

    def summary(self, train_class_counts: Sequence[int], many: int = 100, few: int = 20) -> Dict[str, Any]:
        """The numbers of a long-tail results table, accuracies in %.

        Args:
            train_class_counts: (C,) training images per class.
            many: Many-shot classes have more than ``many`` training images. Default 100.
            few: Few-shot classes have fewer than ``few`` training images. Default 20.

        Returns:
            ``top1``, ``top5``: sample-level accuracy (NaN before any sample);
            ``many``, ``medium``, ``few``: mean per-class top-1 over the shot groups
            (many > 100, 20 <= medium <= 100, few < 20 training images);
            ``head``, ``middle``, ``tail``: mean per-class top-1 over the 30% / 40% / 30% split of the
            classes sorted by training images (see :func:`head_middle_tail`);
            group values are None when the group has no class with test samples;
            ``samples``: number of evaluated samples.
        """
        if len(train_class_counts) != self.num_classes:
            raise ValueError(f'train_class_counts has {len(train_class_counts)} entries for {self.num_classes} classes')
        counts = self.counts()
        samples = int(counts[_COUNT].sum())
        acc = self.per_class()['top1']
        out: Dict[str, Any] = dict(
            top1=100. * counts[_TOP1].sum() / samples if samples else float('nan'),
            top5=100. * counts[_TOP5].sum() / samples if samples else float('nan'),
        )
        out = {k: float(v) for k, v in out.items()}
        for name, classes in shot_groups(train_class_counts, many=many, few=few)._asdict().items():
            out[name] = _group_mean(acc, classes)
        for name, classes in head_middle_tail(train_class_counts).items():
            out[name] = _group_mean(acc, classes)
        out['samples'] = samples
        return out

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_classes={self.num_classes}, topk={self.topk}, device={self.device})'
