"""Long-tail evaluation: per-class top-1 / top-5 counters, calibration and the many / medium / few summary.

:class:`ClassAccuracy` accumulates per-class sample, top-1 and top-5 counts and the calibration
statistics (per confidence bin: samples, correct, summed confidence; the summed NLL) on the evaluation
device (no host sync per batch), sums them across ranks with :meth:`ClassAccuracy.all_reduce` and reduces
them to the numbers of a long-tail results table with :meth:`ClassAccuracy.summary` (ECE, MCE and NLL
included) and to a reliability-diagram table with :meth:`ClassAccuracy.calibration`.

Calibration follows MiSLAS's ``utils/metric.py`` (Zhong et al., CVPR 2021): the confidence is the largest
softmax probability, binned into 15 equal-width bins ``(k/15, (k+1)/15]`` (right-closed, as
``np.digitize(..., right=True)``), ``ECE = sum_b |B_b| / N |acc(B_b) - conf(B_b)|`` and ``MCE = max_b
|acc(B_b) - conf(B_b)|`` over the non-empty bins, both in %; the NLL is the mean cross-entropy in nats.
"""
import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data.dataset import shot_groups

__all__ = ['ClassAccuracy', 'head_middle_tail']

_COUNT, _TOP1, _TOP5 = range(3)
_BIN_COUNT, _BIN_CORRECT, _BIN_CONF = range(3)


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
    """Per-class top-1 / top-5 accuracy and calibration counters for long-tailed evaluation.

    Counters live on ``device`` (with ``device=None``, on the device of the first ``update``'s logits):
    a (3, C) int64 tensor (samples, top-1 correct, top-k correct, k = min(5, C)), a (3, num_bins) float64
    tensor (samples, top-1 correct, summed confidence per confidence bin) and a float64 NLL sum.

    Calibration and NLL use ``softmax(logit_scale * logits)``. A cosine-normalised head
    (:class:`~timm_cmo.models.NormedLinear`, LDAM models) outputs cosines in [-1, 1] whose softmax is
    nearly flat: pass the scale its loss trained with (LDAM's ``s``, 30) to measure the model's actual
    probabilities; the default 1.0 takes the logits as given. Top-1 / top-5 do not depend on it.

    Args:
        num_classes: Number of classes C.
        device: Device of the counters. Default: that of the first batch.
        logit_scale: Positive factor applied to the logits before the softmax of the calibration / NLL.
            Default 1.0.
        num_bins: Confidence bins of ECE / MCE. Default 15.
    """

    def __init__(self, num_classes: int, device=None, logit_scale: float = 1.0, num_bins: int = 15) -> None:
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f'logit_scale must be finite and > 0, got {logit_scale!r}')
        if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(f'num_bins must be a positive integer, got {num_bins!r}')
        self.num_classes = num_classes
        self.topk = min(5, num_classes)
        self.logit_scale = float(logit_scale)
        self.num_bins = int(num_bins)
        self.device = torch.device(device) if device is not None else None
        self._counts: Optional[torch.Tensor] = None
        self._bins: Optional[torch.Tensor] = None
        self._nll: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self._counts = self._bins = self._nll = None
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device) -> None:
        self._counts = torch.zeros(3, self.num_classes, dtype=torch.int64, device=device)
        self._bins = torch.zeros(3, self.num_bins, dtype=torch.float64, device=device)
        self._nll = torch.zeros(1, dtype=torch.float64, device=device)

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
            self._allocate(logits.device)
        device = self._counts.device
        target = target.to(device=device, dtype=torch.int64, non_blocking=True).reshape(-1)
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f'target has {target.shape[0]} entries for {logits.shape[0]} logits')
        logits = logits.detach().to(device, non_blocking=True)
        pred = logits.topk(self.topk, dim=1).indices  # (B, k)
        correct = pred.eq(target[:, None])
        hits = torch.stack([torch.ones_like(correct[:, 0]), correct[:, 0], correct.any(dim=1)])  # (3, B)
        if valid is not None:
            valid = valid.to(device=device, dtype=torch.bool, non_blocking=True).reshape(1, -1)
            hits = hits & valid
        self._counts.scatter_add_(1, target.expand(3, -1), hits.to(torch.int64))

        # calibration: max softmax probability per sample, binned (k/n, (k+1)/n]; NLL of the target
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.logit_scale != 1.:
            z = z * self.logit_scale
        logp = F.log_softmax(z, dim=1)
        conf = logp.max(dim=1).values.exp().to(torch.float64)
        nll = -logp.gather(1, target[:, None]).squeeze(1).to(torch.float64)
        index = (conf * self.num_bins).ceil().to(torch.int64).sub_(1).clamp_(0, self.num_bins - 1)
        weight = hits[0].to(torch.float64)  # 1 for counted samples
        stats = torch.stack([weight, weight * hits[1].to(torch.float64), weight * conf])  # (3, B)
        self._bins.index_add_(1, index, stats)
        self._nll.add_((weight * nll).sum())

    def all_reduce(self) -> None:
        """Sum the counters across ranks when torch.distributed is initialised (no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._counts is None:
            self._allocate('cuda' if dist.get_backend() == 'nccl' else 'cpu')
        if dist.get_backend() == 'nccl' and self._counts.device.type != 'cuda':
            device = torch.device('cuda', torch.cuda.current_device())
            self._counts, self._bins, self._nll = (t.to(device) for t in (self._counts, self._bins, self._nll))
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)
        stats = torch.cat([self._bins.reshape(-1), self._nll])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        self._bins = stats[:-1].reshape(3, self.num_bins)
        self._nll = stats[-1:].clone()

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

    def calibration(self) -> Dict[str, Any]:
        """The reliability-diagram table (e.g. for :func:`timm_cmo.plot.plot_reliability` and results.json).

        Returns:
            ``edges`` (num_bins + 1,) bin edges in [0, 1] (bins are right-closed ``(lo, hi]``);
            ``count`` (num_bins,) int samples per bin (summing to ``samples``);
            ``accuracy`` and ``confidence`` (num_bins,) top-1 accuracy and mean confidence per bin as
            fractions in [0, 1], NaN for empty bins;
            ``ece``, ``mce`` in % and ``nll`` in nats (NaN before any sample); ``samples``;
            ``logit_scale``.
        """
        if self._bins is None:
            stats, nll = np.zeros((3, self.num_bins)), 0.
        else:
            stats, nll = self._bins.cpu().numpy(), float(self._nll.cpu())
        n = stats[_BIN_COUNT]
        samples = int(round(n.sum()))
        with np.errstate(divide='ignore', invalid='ignore'):
            accuracy = np.where(n > 0, stats[_BIN_CORRECT] / n, np.nan)
            confidence = np.where(n > 0, stats[_BIN_CONF] / n, np.nan)
        gaps = np.abs(accuracy - confidence)[n > 0]
        return dict(
            edges=np.linspace(0., 1., self.num_bins + 1),
            count=np.rint(n).astype(np.int64),
            accuracy=accuracy,
            confidence=confidence,
            ece=float(100. * np.sum(gaps * n[n > 0]) / samples) if samples else float('nan'),
            mce=float(100. * gaps.max()) if samples else float('nan'),
            nll=nll / samples if samples else float('nan'),
            samples=samples,
            logit_scale=self.logit_scale,
        )

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
            ``ece``, ``mce``: expected / maximum calibration error in % (15 bins, see
            :meth:`calibration`), ``nll``: mean negative log-likelihood in nats (NaN before any sample);
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
        calibration = self.calibration()
        for key in ('ece', 'mce', 'nll'):
            out[key] = calibration[key]
        out['samples'] = samples
        return out

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, topk={self.topk}, '
                f'logit_scale={self.logit_scale}, num_bins={self.num_bins}, device={self.device})')
