"""Causal Norm: the de-confounded multi-head cosine classifier with TDE inference (Tang et al., NeurIPS 2020).

"Long-Tailed Classification by Keeping the Good and Removing the Bad Momentum Causal Effect". The
feature ``x`` (the pooled pre-logits, ``forward_head(..., pre_logits=True)``) and each class vector
``w_i`` are split into ``K = heads`` equal parts ``x^k``, ``w_i^k``. With ``d^k`` the unit vector of
the moving-average feature ``x_bar^k``:

* training (the de-confounded logits, the paper's causal intervention)::

      y_i = tau / K * sum_k  <w_i^k, x^k> / ((||w_i^k|| + gamma) ||x^k||)

* evaluation (the total direct effect, TDE: the counterfactual logits along ``d`` removed)::

      TDE(y_i) = tau / K * sum_k  <w_i^k, x^k / ||x^k|| - alpha * cos(x^k, d^k) d^k> / (||w_i^k|| + gamma)

* the moving average of the feature, accumulated in every training-mode forward with the SGD
  momentum ``mu`` (no ``1 - mu`` factor, as in the paper and its code; only its direction is used)::

      x_bar <- mu * x_bar + mean_batch(x)

  On CIFAR the authors keep ``mu = 0.9``; on ImageNet-LT (and their other large datasets) they tie it to the
  epoch's learning rate, ``mu = 1 - (1 - 0.9) * min(50 * lr, 1)``, so the average freezes as the lr goes to 0:
  that is ``lr_scale=50`` here, applied by :func:`set_causal_norm_lr` once per epoch (``lr_scale=0``, the
  default, keeps ``mu`` constant and needs no call).

Facts from the authors' code (KaihuaTang/Long-Tailed-Recognition.pytorch, ``CausalNormClassifier.py``,
``run_networks.py``): weight ``(classes, features)`` initialised uniform(+-1/sqrt(features)), no bias; ``tau``
16, ``gamma`` 1/32, ``heads`` 2; ``alpha`` 3.0 (ImageNet-LT), 1.5 (CIFAR-100-LT), 1.0 (CIFAR-10-LT); the cosine
in the TDE term is between the per-head unit feature and the per-head unit moving average; ``alpha`` acts at
test time only, so it can be changed after training (``model.get_classifier().alpha = 1.5``).

Here the moving average is a buffer of the head (``embed_mean``): it is saved in checkpoints and state dicts,
exported to the Hub with the weights, and updated inside ``forward`` in train mode, so it follows the model
through ``torch.compile`` (a buffer mutation, like BatchNorm's running statistics) and DDP (the batch mean is
the mean over every process's samples: the sums and counts are all-reduced, so all ranks keep the same
average). The authors keep it outside the model, in the trainer, and store it beside the state dict.
Differences: a feature part of norm 0 normalises to 0 here (``F.normalize``), where the authors' division
gives NaN; the moving average of a model that never trained is 0 and its TDE logits are its training logits.
timm's ``ModelEmaV3`` averages the buffer like BatchNorm's running statistics, so an EMA model removes the
EMA of the live model's average direction.

:func:`add_causal_norm_arg` makes a timm model class accept ``causal_norm=True`` (and the ``causal_*``
hyper-parameters below); ``import timm_cmo`` applies it to timm's ``ResNet`` (resnet50, resnext50_32x4d,
wide_resnet50_2, ...) and to the CIFAR ResNets. The factory records the arguments in ``model._model_args``,
so ``save_for_hf`` exports them and ``timm.create_model('local-dir:...')`` rebuilds the same head.
"""
import functools
import inspect
import math
from typing import Any, Dict, Type

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import get_device_dtype

from .head_norm import model_classifier

__all__ = ['CausalNormClassifier', 'is_causal_norm', 'add_causal_norm_arg', 'set_causal_norm_lr', 'patch_causal_norm',
           'CAUSAL_ARGS']

_PATCH_FLAG = '_timm_cmo_causal_norm'

# model argument -> (CausalNormClassifier argument, default): the defaults of the authors' classifier
CAUSAL_ARGS: Dict[str, Any] = {
    'causal_heads': ('heads', 2),
    'causal_tau': ('tau', 16.0),
    'causal_gamma': ('gamma', 1.0 / 32),
    'causal_alpha': ('alpha', 3.0),
    'causal_momentum': ('momentum', 0.9),
    'causal_lr_scale': ('lr_scale', 0.0),
}


def _real(name: str, value: Any, ok, why: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f'{name} must be {why}, got {value!r}')
    return float(value)


class CausalNormClassifier(nn.Module):
    """Multi-head cosine classifier with a moving-average feature buffer and TDE logits in eval mode.

    Args:
        in_features: Feature size D (divisible by ``heads``).
        out_features: Number of classes C.
        heads: Number of heads K. Default 2.
        tau: Logit scale (each head contributes ``tau / K`` times its cosine). Default 16.
        gamma: Added to each per-head class-vector norm (the paper's gamma). Default 1/32.
        alpha: TDE strength at evaluation; 0 gives the training logits. Default 3.0 (ImageNet-LT).
        momentum: The moving average's decay mu (the SGD momentum). Default 0.9.
        lr_scale: 0 keeps mu constant; s > 0 makes :meth:`set_lr` use ``1 - (1 - momentum) * min(s * lr, 1)``
            (the authors' ImageNet-LT rule has s = 50). Default 0.

    Shapes: input (B, D) -> logits (B, C). Parameters: ``weight`` (C, D), no bias. Buffers: ``embed_mean`` (D,),
    saved in the state dict; ``decay`` (), the current mu of an lr-tied decay, not saved (:meth:`set_lr` sets it
    each epoch; a tensor, so a compiled model does not recompile when it changes).
    Train mode: the de-confounded logits, and ``embed_mean`` updated with the batch. Eval mode: the TDE logits.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            heads: int = 2,
            tau: float = 16.0,
            gamma: float = 1.0 / 32,
            alpha: float = 3.0,
            momentum: float = 0.9,
            lr_scale: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f'heads must be an integer >= 1, got {heads!r}')
        if in_features % heads:
            raise ValueError(f'heads {heads} must divide the feature size {in_features}')
        self.in_features = in_features
        self.out_features = out_features
        self.heads = heads
        self.tau = _real('tau', tau, lambda v: v > 0, '> 0')
        self.gamma = _real('gamma', gamma, lambda v: v >= 0, '>= 0')
        self.alpha = _real('alpha', alpha, lambda v: v >= 0, '>= 0')
        self.momentum = _real('momentum', momentum, lambda v: 0 <= v <= 1, 'in [0, 1]')
        self.lr_scale = _real('lr_scale', lr_scale, lambda v: v >= 0, '>= 0')
        dd = {'device': device, 'dtype': dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **dd))
        self.register_buffer('embed_mean', torch.zeros(in_features, **dd))
        self.register_buffer('decay', torch.tensor(self.momentum, **dd), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: weight uniform(-1/sqrt(D), 1/sqrt(D)); the moving average back to 0."""
        bound = 1. / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.embed_mean.zero_()

    def set_lr(self, lr: float) -> None:
        """Set mu for the epoch from its lr (only with ``lr_scale > 0``; otherwise mu stays ``momentum``)."""
        if self.lr_scale > 0:
            self.decay.fill_(1. - (1. - self.momentum) * min(self.lr_scale * float(lr), 1.))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.heads, self.in_features // self.heads)

    @torch.no_grad()
    def update_embed_mean(self, x: torch.Tensor) -> None:
        """``embed_mean <- mu * embed_mean + mean(x)``, the mean over the batch of every process under DDP."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.embed_mean.dtype), torch.float32)
        stats = torch.cat([x.detach().to(dtype).sum(0), x.new_full((1,), x.shape[0], dtype=dtype)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        mean = stats[:-1] / stats[-1].clamp_min(1.)
        # a constant mu stays a Python float (exact in any dtype); an lr-tied one is the buffer set by set_lr
        self.embed_mean.mul_(self.decay if self.lr_scale > 0 else self.momentum).add_(mean.to(self.embed_mean.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_embed_mean(x)
        w = self._split(self.weight)
        w = w / (w.norm(dim=-1, keepdim=True) + self.gamma)  # (C, K, D/K)
        x = F.normalize(self._split(x), dim=-1)  # (B, K, D/K)
        if not self.training and self.alpha != 0:
            d = F.normalize(self._split(self.embed_mean), dim=-1).to(x.dtype)  # (K, D/K)
            cos = (x * d).sum(-1, keepdim=True)  # (B, K, 1)
            x = x - self.alpha * cos * d
        return torch.einsum('bkd,ckd->bc', x, w.to(x.dtype)) * (self.tau / self.heads)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, heads={self.heads}, '
                f'tau={self.tau:g}, gamma={self.gamma:g}, alpha={self.alpha:g}, momentum={self.momentum:g}'
                + (f', lr_scale={self.lr_scale:g}' if self.lr_scale else ''))


def _causal_heads(model: nn.Module):
    """The :class:`CausalNormClassifier` modules of ``model`` (through compile / DDP wrappers, their submodules)."""
    return [m for m in model.modules() if isinstance(m, CausalNormClassifier)]


def is_causal_norm(model: nn.Module) -> bool:
    """True if the model (or its classifier, :func:`~timm_cmo.models.head_norm.model_classifier`) is a
    :class:`CausalNormClassifier`."""
    return isinstance(model, CausalNormClassifier) or isinstance(model_classifier(model), CausalNormClassifier)


def set_causal_norm_lr(model: nn.Module, lr: float) -> None:
    """Once per epoch: set the moving-average decay of every Causal Norm head from the epoch's lr.

    A no-op for models without such a head and for heads with ``lr_scale=0`` (constant mu, the CIFAR setting).
    """
    for head in _causal_heads(model):
        head.set_lr(lr)


def _set_causal_head(model: nn.Module, classifier: str) -> None:
    """Replace ``model.<classifier>`` by a CausalNormClassifier sized from the model (no-op when num_classes <= 0)."""
    if model.num_classes <= 0:
        return
    in_features = getattr(model, 'head_hidden_size', None) or model.num_features
    old = getattr(model, classifier)
    head = CausalNormClassifier(in_features, model.num_classes, **model.causal_norm_args, **get_device_dtype(model))
    head.train(old.training if isinstance(old, nn.Module) else model.training)
    setattr(model, classifier, head)


def add_causal_norm_arg(model_cls: Type[nn.Module], classifier: str = 'fc') -> Type[nn.Module]:
    """Make ``model_cls`` accept ``causal_norm: bool = False`` and the ``causal_*`` arguments (idempotent, in place).

    With ``causal_norm=True`` the classifier attribute ``classifier`` is replaced by a
    ``CausalNormClassifier(head_hidden_size or num_features, num_classes, heads=causal_heads, tau=causal_tau,
    gamma=causal_gamma, alpha=causal_alpha, momentum=causal_momentum, lr_scale=causal_lr_scale)`` after the
    original ``__init__``; ``model.causal_norm`` is set and ``reset_classifier`` keeps such a head. The class must
    split ``forward_features`` / ``forward_head(x, pre_logits)`` with the classifier applied last to the pooled
    features, and have ``num_classes``, ``num_features`` and ``reset_classifier`` (timm convention).
    """
    init = model_cls.__dict__.get('__init__')
    if init is None:
        raise TypeError(f'{model_cls.__name__} does not define __init__ itself, patch its base class.')
    if getattr(init, _PATCH_FLAG, False):
        return model_cls
    head_fn = getattr(model_cls, 'forward_head', None)
    if not callable(getattr(model_cls, 'forward_features', None)) or not callable(head_fn) or \
            'pre_logits' not in inspect.signature(head_fn).parameters:
        raise TypeError(f'{model_cls.__name__} does not split forward_features / forward_head(x, pre_logits): '
                        f'a Causal Norm head needs the pooled features')
    orig_init = init
    orig_reset = model_cls.reset_classifier

    @functools.wraps(orig_init)
    def __init__(self, *args: Any, causal_norm: bool = False, **kwargs: Any) -> None:
        causal = {name: kwargs.pop(key, default) for key, (name, default) in CAUSAL_ARGS.items()}
        if causal_norm and kwargs.get('head_norm'):
            raise ValueError('head_norm and causal_norm are two classifier heads: choose one')
        orig_init(self, *args, **kwargs)
        self.causal_norm = bool(causal_norm)
        self.causal_norm_args = causal
        if self.causal_norm:
            _set_causal_head(self, classifier)

    @functools.wraps(orig_reset)
    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        orig_reset(self, num_classes, *args, **kwargs)
        if getattr(self, 'causal_norm', False):
            _set_causal_head(self, classifier)

    # advertise the new arguments in the signature (wraps() would show the original one)
    sig = inspect.signature(orig_init)
    params = list(sig.parameters.values())
    new = [inspect.Parameter('causal_norm', inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)]
    new += [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=type(default))
            for key, (_, default) in CAUSAL_ARGS.items()]
    var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
    at = var_kw[0] if var_kw else len(params)
    params[at:at] = new
    __init__.__signature__ = sig.replace(parameters=params)

    setattr(__init__, _PATCH_FLAG, True)
    setattr(reset_classifier, _PATCH_FLAG, True)
    model_cls.__init__ = __init__
    model_cls.reset_classifier = reset_classifier
    return model_cls


def patch_causal_norm() -> None:
    """Add ``causal_norm`` to timm's ``ResNet`` (resnet18..152, resnext50_32x4d, wide_resnet50_2, ...) and to the
    CIFAR ResNets (``resnet*_cifar``). Idempotent."""
    from timm.models.resnet import ResNet
    from .resnet_cifar import ResNetCifar
    add_causal_norm_arg(ResNet, classifier='fc')
    add_causal_norm_arg(ResNetCifar, classifier='fc')
