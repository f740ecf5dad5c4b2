"""Moving logits from the label prior they were trained for to another one (test-time prior correction).

A classifier whose softmax models ``p(y | x)`` under the label prior ``p_s`` gives the posterior under a
target prior ``p_t`` (same class-conditionals) by ``logits - log p_s + log p_t``. Which ``p_s`` a model's raw
logits stand for depends on its loss: the training prior for plain cross-entropy, the uniform prior for
prior-corrected losses that add ``log p_train`` inside the loss (Balanced Softmax, LADE; a loss says so with
``logits_prior = 'uniform'``). A constant shift changes neither the argmax nor the softmax, so a uniform
prior on either side can be left out.
"""
from typing import Optional, Sequence, Union

import torch

__all__ = ['prior_corrected_logits', 'check_prior']

Prior = Union[Sequence[float], torch.Tensor]


def check_prior(prior: Prior, num_classes: int, name: str = 'prior', allow_zero: bool = False) -> torch.Tensor:
    """``prior`` (class counts or probabilities) as a ``(C,)`` float64 tensor summing to 1.

    Raises ``ValueError`` naming ``name`` for a wrong length, non-finite or negative entries (zeros too unless
    ``allow_zero``), or a zero sum.
    """
    p = torch.as_tensor(prior, dtype=torch.float64).detach().cpu()
    if p.shape != (num_classes,):
        raise ValueError(f'{name} must have one entry per class ({num_classes}), got shape {tuple(p.shape)}')
    ok = torch.isfinite(p) & ((p >= 0) if allow_zero else (p > 0))
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()[:10].tolist()
        raise ValueError(f'{name} must be finite and {"non-negative" if allow_zero else "positive"}; classes {bad} '
                         f'have {p[bad].tolist()}')
    if not float(p.sum()) > 0:
        raise ValueError(f'{name} sums to 0')
    return p / p.sum()


def prior_corrected_logits(
        logits: torch.Tensor,
        test_prior: Optional[Prior] = None,
        logits_prior: Optional[Prior] = None,
) -> torch.Tensor:
    """``logits - log p_s + log p_t``: the logits of a test set with label prior ``p_t``.

    Args:
        logits: ``(B, C)`` raw logits.
        test_prior: ``(C,)`` target prior ``p_t`` (counts or probabilities; zeros allowed: such classes are never
            predicted). None: uniform.
        logits_prior: ``(C,)`` prior ``p_s`` the logits were trained for (the training class counts for plain
            cross-entropy; None: uniform, as for LADE and Balanced Softmax).

    Returns:
        ``(B, C)`` in the logits' dtype; the logits themselves when both priors are uniform.
    """
    if logits.ndim != 2:
        raise ValueError(f'logits must have shape (B, C), got {tuple(logits.shape)}')
    C = logits.shape[1]
    shift = torch.zeros(C, dtype=torch.float64)
    if test_prior is not None:
        shift = shift + torch.log(check_prior(test_prior, C, 'test_prior', allow_zero=True))
    if logits_prior is not None:
        shift = shift - torch.log(check_prior(logits_prior, C, 'logits_prior'))
    if test_prior is None and logits_prior is None:
        return logits
    return logits + shift.to(device=logits.device, dtype=logits.dtype)
