"""The logits together with the penultimate (pre-logit) features, through timm's model split.

Losses that weigh a sample by its feature (the influence-balanced loss, ``needs_features = True``) need what
the classifier sees. timm models expose it without any change to the model::

    h = model.forward_head(model.forward_features(x), pre_logits=True)   # (B, D) pooled features
    logits = model.get_classifier()(h)                                   # (B, C)

:func:`logits_and_features` does exactly that; :class:`WithFeatures` wraps a model so that its ``forward``
returns the pair (train_cmo.py trains through it, so that DDP, AMP and EMA see an ordinary module).
For timm's ResNets and the CIFAR ResNets the logits are the ones ``model(x)`` gives.
"""
import inspect
from typing import NamedTuple

import torch
import torch.nn as nn

__all__ = ['LogitsAndFeatures', 'WithFeatures', 'check_feature_split', 'logits_and_features']


class LogitsAndFeatures(NamedTuple):
    """A training output with the features: ``logits`` (B, C), ``features`` (B, D) pre-logit features."""
    logits: torch.Tensor
    features: torch.Tensor


def check_feature_split(model: nn.Module) -> None:
    """Raise ``ValueError`` (naming what is missing) unless ``model`` has timm's feature / head / classifier split.

    Needed: ``forward_features``, ``forward_head(x, pre_logits=...)`` and ``get_classifier()`` returning the
    classifier module (not an ``Identity``: ``num_classes=0``). A multi-expert (RIDE) model has one classifier
    per expert, not one feature a classifier sees, and is refused.
    """
    inner = getattr(model, '_orig_mod', model)  # torch.compile'd
    name = type(inner).__name__
    if hasattr(inner, 'num_experts'):
        raise ValueError(f'{name} is a multi-expert model (one classifier per expert); losses that use the '
                         f'penultimate feature need a single-head model')
    for attr in ('forward_features', 'forward_head', 'get_classifier'):
        if not callable(getattr(inner, attr, None)):
            raise ValueError(f'{name} has no {attr}(): the penultimate feature is taken through timm\'s '
                             f'forward_features / forward_head(x, pre_logits=True) / get_classifier() split')
    try:
        params = inspect.signature(inner.forward_head).parameters
    except (TypeError, ValueError):
        params = {}
    if 'pre_logits' not in params:
        raise ValueError(f'{name}.forward_head has no pre_logits argument: it cannot hand over the features the '
                         f'classifier sees')
    classifier = inner.get_classifier()
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ValueError(f'{name}.get_classifier() is {type(classifier).__name__}, not a classifier module '
                         f'(num_classes=0, or several heads)')


def logits_and_features(model: nn.Module, x: torch.Tensor) -> LogitsAndFeatures:
    """``(logits (B, C), features (B, D))`` of ``model`` on ``x``, through its feature / head split.

    ``features = model.forward_head(model.forward_features(x), pre_logits=True)``,
    ``logits = model.get_classifier()(features)``. Call :func:`check_feature_split` once first for a clear error.
    """
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return LogitsAndFeatures(model.get_classifier()(features), features)


class WithFeatures(nn.Module):
    """``forward(x)`` -> :class:`LogitsAndFeatures` of the wrapped model (checked at construction).

    The wrapper owns no parameters of its own; its ``state_dict`` is the model's under the prefix ``model.``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_feature_split(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> LogitsAndFeatures:
        return logits_and_features(self.model, x)
