"""Post-hoc classifier adjustments (no training): tau-normalisation, logit adjustment and the test-prior correction.

* ``tau_norm`` (Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020):
  every class vector of the linear classifier divided by its norm to the power tau,
  ``w_k <- w_k / ||w_k||^tau``, and the bias dropped, as the authors' ``tau_norm.py`` scores
  (``logits = f W~^T``, no bias). tau = 0 keeps the weights (without the bias), tau = 1 gives unit-norm classes.
* ``logit_adjust`` (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, post-hoc form):
  ``logits - tau * log pi`` with ``pi_k = n_k / N`` the training class prior, i.e. ``b_k <- b_k - tau log pi_k``.
* the test-prior correction: ``logits + log p_test - log p_train`` (the Bayes-optimal change of label prior for
  logits that estimate the training posterior, Saerens et al. 2002), or ``logits + log p_test`` for logits
  that already estimate the balanced posterior (Balanced Softmax, the logit-adjusted loss, cRT, LWS, or a
  post-hoc adjustment before it). :func:`prior_offset`.

Both adjustments act on the classifier only, so they are applied to the model itself (:func:`apply_post_hoc`):
an ``nn.Linear`` head gets the adjusted ``weight`` / ``bias`` (a plain timm model: it exports and reloads with
``timm.create_model('local-dir:...')`` and gives the adjusted logits); a cosine head (``NormedLinear``) takes a
logit offset through :class:`LogitOffset` (evaluation only; tau-normalisation is the identity on its unit-norm
classes and is refused).

tau is chosen on a held-out validation set, never on the test set: :func:`select_tau` scores a grid on the
classifier inputs of the validation images (:func:`collect_features`) by the mean per-class top-1 accuracy
(the criterion of the authors' ``tau_norm.py``), ties going to the first value of the grid. The authors'
script searches the grid on the test set itself (``--type test``) and reports the best figure, which
overstates the method; here the test split never reaches the selection.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .models.head_norm import NormedLinear

__all__ = [
    'POST_HOC', 'DEFAULT_TAU_GRID', 'PRIOR_CORRECTIONS', 'tau_normalize', 'logit_adjust', 'adjusted_classifier',
    'apply_post_hoc', 'select_tau', 'collect_features', 'class_prior', 'prior_offset', 'add_logit_offset',
    'apply_logit_offset',
    'LogitOffset', 'classifier_of', 'mean_class_accuracy',
]

# the authors' grid (tau_norm.py: np.linspace(0, 2, 21))
DEFAULT_TAU_GRID: Tuple[float, ...] = tuple(round(float(t), 2) for t in np.linspace(0., 2., 21))
PRIOR_CORRECTIONS = ('train', 'balanced')


class LogitOffset(nn.Module):
    """``head(x) + offset``: a fixed (C,) logit offset behind a head without a bias (a cosine ``NormedLinear``).

    The offset is in the head's output units (cosines for a ``NormedLinear``).
    """

    def __init__(self, head: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer('offset', offset.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.offset


def classifier_of(model: nn.Module) -> Tuple[nn.Module, nn.Module, str]:
    """``(classifier, its parent module, its attribute name)``: ``get_classifier()`` (timm), else ``fc``.

    ValueError for models without one linear or cosine classifier (multi-expert RIDE heads, ``num_classes=0``).
    """
    get_classifier = getattr(model, 'get_classifier', None)
    classifier = get_classifier() if callable(get_classifier) else getattr(model, 'fc', None)
    if not isinstance(classifier, (nn.Linear, NormedLinear, LogitOffset)):
        raise ValueError(f'post-hoc adjustments need a single nn.Linear or NormedLinear classifier; '
                         f'{type(model).__name__} has {type(classifier).__name__}')
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is classifier:
                return classifier, module, child_name
    raise ValueError(f'the classifier of {type(model).__name__} is not one of its sub-modules')


def class_prior(class_counts: Sequence[float]) -> torch.Tensor:
    """The training label prior ``pi_k = n_k / N``, (C,) float64; ValueError for a class without images."""
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any():
        raise ValueError(f'class_counts must be a 1-D sequence of non-negative counts, got {class_counts!r}')
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f'classes {empty} have no training images: log pi is -inf for them')
    return counts / counts.sum()


def _check_unscaled(classifier: nn.Module) -> None:
    if isinstance(classifier, nn.Linear) and getattr(classifier, 'lws_scale', None) is not None:
        raise ValueError('the classifier carries a learnable weight scaling (a forward hook): fold it into the weights '
                         'first (timm_cmo.models.stage2.fold_weight_scaling)')


def _check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f'tau must be a finite number >= 0, got {tau!r}')
    return float(tau)


@torch.no_grad()
def tau_normalize(classifier: nn.Linear, tau: float) -> nn.Linear:
    """A new ``nn.Linear`` with ``W_k / ||W_k||^tau`` per class row and a zero bias (Kang et al.; the authors
    score without the bias). The input classifier is not changed."""
    tau = _check_tau(tau)
    if isinstance(classifier, (NormedLinear, LogitOffset)):
        raise ValueError('tau-normalisation rescales the class vectors of a linear head; a cosine-normalised head '
                         '(NormedLinear) has unit-norm classes, on which it is the identity')
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f'tau-normalisation needs an nn.Linear classifier, got {type(classifier).__name__}')
    _check_unscaled(classifier)
    weight = classifier.weight
    norms = weight.double().norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f'classes {torch.nonzero(norms.flatten() == 0).flatten().tolist()} have a zero weight vector')
    out = nn.Linear(classifier.in_features, classifier.out_features, bias=True, device=weight.device,
                    dtype=weight.dtype)
    out.weight.copy_((weight.double() / norms.pow(tau)).to(weight.dtype))
    out.bias.zero_()
    return out


@torch.no_grad()
def add_logit_offset(classifier: nn.Module, offset: torch.Tensor) -> nn.Module:
    """A new classifier whose logits are ``classifier(x) + offset`` (offset (C,), in the head's output units).

    ``nn.Linear``: the same weight, bias ``b + offset`` (``offset`` alone without a bias). Cosine heads:
    :class:`LogitOffset` around a copy of the head.
    """
    offset = torch.as_tensor(offset)
    if isinstance(classifier, nn.Linear):
        _check_unscaled(classifier)
        weight = classifier.weight
        out = nn.Linear(classifier.in_features, classifier.out_features, bias=True, device=weight.device,
                        dtype=weight.dtype)
        out.weight.copy_(weight)
        bias = (classifier.bias.double() if classifier.bias is not None
                else torch.zeros_like(offset, dtype=torch.float64))
        out.bias.copy_((bias.to(offset.device) + offset.double()).to(weight.dtype))
        return out
    if isinstance(classifier, LogitOffset):
        return LogitOffset(classifier.head, classifier.offset + offset.to(classifier.offset))
    if isinstance(classifier, NormedLinear):
        import copy
        head = copy.deepcopy(classifier)
        return LogitOffset(head, offset.to(device=head.weight.device, dtype=head.weight.dtype))
    raise ValueError(f'cannot add a logit offset to a {type(classifier).__name__} classifier')


def logit_adjust(classifier: nn.Module, tau: float, class_counts: Sequence[float],
                 logit_scale: float = 1.) -> nn.Module:
    """A new classifier giving ``logits - tau * log pi`` (Menon et al. 2021, post-hoc), ``pi`` the training prior.

    ``logit_scale``: the factor the model's logits are trained under (a cosine head's ``s``, 30 for LDAM); the
    offset is divided by it so that ``logit_scale * logits`` is adjusted by ``-tau log pi``.
    """
    tau = _check_tau(tau)
    offset = -tau * torch.log(class_prior(class_counts)) / float(logit_scale)
    return add_logit_offset(classifier, offset)


def adjusted_classifier(kind: str, classifier: nn.Module, tau: float, class_counts: Sequence[float],
                        logit_scale: float = 1.) -> nn.Module:
    """The classifier after the post-hoc adjustment ``kind`` (a key of :data:`POST_HOC`) with ``tau``."""
    if kind not in POST_HOC:
        raise ValueError(f'unknown post-hoc adjustment {kind!r}; choose from {", ".join(POST_HOC)}')
    return POST_HOC[kind](classifier, tau, class_counts, logit_scale)


# name -> (classifier, tau, training class counts, logit scale) -> adjusted classifier
POST_HOC: Dict[str, Callable[..., nn.Module]] = {
    'tau_norm': lambda classifier, tau, counts, scale: tau_normalize(classifier, tau),
    'logit_adjust': logit_adjust,
}


def _replace_classifier(model: nn.Module, new: nn.Module) -> nn.Module:
    _, parent, name = classifier_of(model)
    setattr(parent, name, new)
    return model


def apply_post_hoc(model: nn.Module, kind: str, tau: float, class_counts: Sequence[float],
                   logit_scale: float = 1.) -> nn.Module:
    """Replace the model's classifier by its post-hoc adjusted version (in place); returns the model.

    A linear head's learnable weight scaling is folded into its weights first.
    """
    from .models.stage2 import fold_weight_scaling
    if isinstance(classifier_of(model)[0], nn.Linear):
        fold_weight_scaling(model)
    classifier, _, _ = classifier_of(model)
    new = adjusted_classifier(kind, classifier, tau, class_counts, logit_scale)
    new.train(classifier.training)
    return _replace_classifier(model, new)


def apply_logit_offset(model: nn.Module, offset: torch.Tensor, logit_scale: float = 1.) -> nn.Module:
    """Add a (C,) logit offset (in trained-logit units: divided by ``logit_scale`` for a cosine head) to the
    model's classifier, in place (:func:`add_logit_offset`); returns the model."""
    from .models.stage2 import fold_weight_scaling
    if isinstance(classifier_of(model)[0], nn.Linear):
        fold_weight_scaling(model)
    classifier, _, _ = classifier_of(model)
    new = add_logit_offset(classifier, torch.as_tensor(offset, dtype=torch.float64) / float(logit_scale))
    new.train(classifier.training)
    return _replace_classifier(model, new)


def prior_offset(test_prior: Sequence[float], train_counts: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The (C,) float64 logit offset of a change of label prior: ``log p_test - log p_train``
    (``train_counts`` given) or ``log p_test`` (None: logits of a balanced posterior).

    ``test_prior`` is normalised to sum to 1; every class needs a positive test and training prior.
    """
    p_test = torch.as_tensor(np.asarray(test_prior, dtype=np.float64))
    if p_test.ndim != 1 or len(p_test) == 0 or (p_test < 0).any() or not torch.isfinite(p_test).all():
        raise ValueError(f'the test prior must be a 1-D sequence of finite, non-negative numbers, got {test_prior!r}')
    zero = torch.nonzero(p_test == 0).flatten().tolist()
    if zero:
        raise ValueError(f'classes {zero} have test prior 0: log p_test is -inf for them')
    offset = torch.log(p_test / p_test.sum())
    if train_counts is not None:
        prior = class_prior(train_counts)
        if len(prior) != len(offset):
            raise ValueError(f'{len(prior)} training class counts for a test prior of {len(offset)} classes')
        offset = offset - torch.log(prior)
    return offset


@torch.no_grad()
def collect_features(model: nn.Module, loader, device=None, amp_autocast=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The classifier inputs and labels of every sample of ``loader`` (model in eval mode).

    Returns ``(features (N, D), targets (N,) int64)`` on ``device`` (default: where they come out).
    """
    from contextlib import suppress
    classifier, _, _ = classifier_of(model)
    captured: List[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    feats, targets = [], []
    was_training = model.training
    model.eval()
    try:
        for input, target in loader:
            if device is not None:
                input = input.to(device, non_blocking=True)
            with (amp_autocast or suppress)():
                model(input)
            feats.append(captured.pop().float())
            targets.append(target.to(feats[-1].device).long())
            captured.clear()
    finally:
        hook.remove()
        model.train(was_training)
    if not feats:
        raise ValueError('the validation loader yielded no samples')
    return torch.cat(feats), torch.cat(targets)


def mean_class_accuracy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``targets`` of their top-1 accuracy, in %."""
    pred = logits.argmax(dim=1)
    count = torch.bincount(targets, minlength=num_classes).double()
    hits = torch.bincount(targets[pred == targets], minlength=num_classes).double()
    present = count > 0
    return float(100. * (hits[present] / count[present]).mean())


@torch.no_grad()
def select_tau(kind: str, classifier: nn.Module, features: torch.Tensor, targets: torch.Tensor,
               class_counts: Sequence[float], grid: Sequence[float] = DEFAULT_TAU_GRID,
               logit_scale: float = 1.) -> Dict[str, Any]:
    """Choose tau for the post-hoc adjustment ``kind`` on validation data (never the test set).

    Args:
        kind: A key of :data:`POST_HOC`.
        classifier: The model's classifier (unchanged).
        features: (N, D) classifier inputs of the validation images (:func:`collect_features`).
        targets: (N,) their labels.
        class_counts: (C,) training images per class (the prior of ``logit_adjust``).
        grid: Candidate values of tau, in order; ties go to the first.
        logit_scale: As in :func:`logit_adjust`.

    Returns:
        ``{'tau': chosen, 'score': its mean per-class top-1 (%), 'grid': [...], 'scores': [...],
        'criterion': 'mean per-class top-1 (%)'}``.
    """
    grid = [_check_tau(t) for t in grid]
    if not grid:
        raise ValueError('the tau grid is empty')
    num_classes = len(class_counts)
    scores = []
    for tau in grid:
        head = adjusted_classifier(kind, classifier, tau, class_counts, logit_scale)
        scores.append(mean_class_accuracy(head(features.to(_device_of(head))), targets.to(_device_of(head)),
                                          num_classes))
    best = int(np.argmax(np.round(scores, 9)))  # float noise in a mean of ratios never decides a tie
    return dict(tau=grid[best], score=scores[best], grid=grid, scores=scores, criterion='mean per-class top-1 (%)')


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), next(iter(module.buffers()), torch.zeros(()))).device
