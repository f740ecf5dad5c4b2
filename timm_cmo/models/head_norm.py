"""Cosine-normalised classifier head (LDAM's ``NormedLinear``) and the ``head_norm`` model argument.

``NormedLinear`` keeps the layout of the LDAM-DRW / CMO code so that their checkpoints load unchanged:
``weight`` has shape ``(in_features, out_features)`` and there is no bias. Its logits are cosine
similarities in ``[-1, 1]``; LDAM/CMO scale them inside the loss (``s=30``).

:func:`add_head_norm_arg` patches a timm model class so that ``timm.create_model(name, head_norm=True)``
builds it with a ``NormedLinear`` classifier. ``import timm_cmo`` applies it to timm's ``ResNet``
(``resnet50``, ``resnet101``, ``resnet152``, ``wide_resnet50_2``, ...). The factory records
``head_norm`` in ``model._model_args``, so ``save_for_hf`` / ``push_to_hf_hub`` export it in
``config.json`` and ``create_model('local-dir:...' / 'hf-hub:...')`` rebuilds the same head.

A cosine head cannot take a per-class scale of its logits into its weights (they are normalised), so the
learnable weight scaling of a second stage (LWS, :mod:`timm_cmo.models.stage2`) is a parameter of the head
itself: ``NormedLinear(..., class_scale=True)`` (or :meth:`NormedLinear.enable_class_scale`) adds the (C,)
``lws_scale``, and ``create_model(name, head_norm=True, head_lws=True)`` builds a model with it.
"""
import functools
import inspect
from typing import Any, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import get_device_dtype

__all__ = ['NormedLinear', 'is_head_norm', 'add_head_norm_arg', 'patch_timm_resnet', 'check_head_lws']

_PATCH_FLAG = '_timm_cmo_head_norm'


class NormedLinear(nn.Module):
    """Cosine classifier: ``normalize(x, dim=-1) @ normalize(weight, dim=0)``, no bias.

    Args:
        in_features: Input feature size.
        out_features: Number of classes.
        class_scale: Multiply each class's cosine by a learnable scale, the (out_features,) parameter
            ``lws_scale`` initialised to ones (learnable weight scaling, LWS). Default False.

    Shapes: ``weight`` (in_features, out_features); input (..., in_features) -> output (..., out_features),
    values in [-1, 1] (times ``lws_scale`` with ``class_scale``).
    """

    def __init__(self, in_features: int, out_features: int, class_scale: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.register_parameter('lws_scale', None)
        self.reset_parameters()
        if class_scale:
            self.enable_class_scale()

    def enable_class_scale(self) -> nn.Parameter:
        """Add the (out_features,) ``lws_scale`` of ones if the head has none; return it."""
        if self.lws_scale is None:
            self.lws_scale = nn.Parameter(torch.ones(self.out_features, device=self.weight.device,
                                                     dtype=self.weight.dtype))
        return self.lws_scale

    def reset_parameters(self) -> None:
        """LDAM init: uniform(-1, 1), then every column (class vector) renormed to norm 1; ``lws_scale`` ones."""
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
            if self.lws_scale is not None:
                self.lws_scale.fill_(1.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(F.normalize(x, dim=-1), F.normalize(self.weight, dim=0))
        return out if self.lws_scale is None else out * self.lws_scale

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, bias=False'
                + (', class_scale=True' if self.lws_scale is not None else ''))


def model_classifier(model: nn.Module) -> Optional[nn.Module]:
    """The model's classifier: ``get_classifier()``, else ``fc`` (None if neither), through DDP and torch.compile
    wrappers."""
    model = getattr(model, 'module', model)  # DDP
    model = getattr(model, '_orig_mod', model)  # torch.compile
    classifier = None
    get_classifier = getattr(model, 'get_classifier', None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except Exception:  # feature wrappers and odd models
            classifier = None
    return getattr(model, 'fc', None) if classifier is None else classifier


def is_head_norm(model: nn.Module) -> bool:
    """True if the model (or its classifier, :func:`model_classifier`) is a :class:`NormedLinear`."""
    return isinstance(model, NormedLinear) or isinstance(model_classifier(model), NormedLinear)


def _set_normed_head(model: nn.Module, classifier: str) -> None:
    """Replace ``model.<classifier>`` by a NormedLinear sized from the model (no-op when num_classes <= 0)."""
    if model.num_classes <= 0:
        return
    in_features = getattr(model, 'head_hidden_size', None) or model.num_features
    old = getattr(model, classifier)
    head = NormedLinear(in_features, model.num_classes, class_scale=getattr(model, 'head_lws', False),
                        **get_device_dtype(model))
    head.train(old.training if isinstance(old, nn.Module) else model.training)
    setattr(model, classifier, head)


def add_head_norm_arg(model_cls: Type[nn.Module], classifier: str = 'fc') -> Type[nn.Module]:
    """Make ``model_cls`` accept ``head_norm: bool = False`` and ``head_lws: bool = False`` (idempotent,
    patches the class in place).

    With ``head_norm=True`` the classifier attribute ``classifier`` is replaced by a
    ``NormedLinear(head_hidden_size or num_features, num_classes, class_scale=head_lws)`` after the original
    ``__init__``, ``model.head_norm`` is set, and ``reset_classifier`` keeps a normalised head.
    ``head_lws`` without ``head_norm`` is a ValueError.
    The class must have ``num_classes``, ``num_features`` and ``reset_classifier`` (timm convention).
    """
    init = model_cls.__dict__.get('__init__')
    if init is None or getattr(init, _PATCH_FLAG, False):
        if init is None:
            raise TypeError(f'{model_cls.__name__} does not define __init__ itself, patch its base class.')
        return model_cls
    orig_init = init
    orig_reset = model_cls.reset_classifier

    @functools.wraps(orig_init)
    def __init__(self, *args: Any, head_norm: bool = False, head_lws: bool = False, **kwargs: Any) -> None:
        check_head_lws(head_norm, head_lws)
        orig_init(self, *args, **kwargs)
        self.head_norm = bool(head_norm)
        self.head_lws = bool(head_lws)
        if self.head_norm:
            _set_normed_head(self, classifier)

    @functools.wraps(orig_reset)
    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        orig_reset(self, num_classes, *args, **kwargs)
        if getattr(self, 'head_norm', False):
            _set_normed_head(self, classifier)

    # advertise the new argument in the signature (wraps() would show the original one)
    sig = inspect.signature(orig_init)
    params = list(sig.parameters.values())
    var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
    for name in ('head_lws', 'head_norm'):
        new_param = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
        params.insert(var_kw[0] if var_kw else len(params), new_param)
    __init__.__signature__ = sig.replace(parameters=params)

    setattr(__init__, _PATCH_FLAG, True)
    setattr(reset_classifier, _PATCH_FLAG, True)
    model_cls.__init__ = __init__
    model_cls.reset_classifier = reset_classifier
    return model_cls


def check_head_lws(head_norm: bool, head_lws: bool) -> None:
    """``head_lws`` (a per-class scale inside the cosine head) needs ``head_norm``: ValueError otherwise."""
    if head_lws and not head_norm:
        raise ValueError('head_lws=True is the per-class scale of a cosine-normalised head: it needs head_norm=True '
                         '(a linear head takes the scale into its weights)')


def patch_timm_resnet() -> None:
    """Add ``head_norm`` to timm's ``ResNet`` (resnet18..152, wide_resnet50_2, ...). Idempotent."""
    from timm.models.resnet import ResNet
    add_head_norm_arg(ResNet, classifier='fc')
