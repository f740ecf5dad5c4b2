"""Classifier re-training with BN shift learning: MiSLAS's stage 2 (Zhong et al., CVPR 2021).

What MiSLAS's ``train_stage2.py`` does after a stage-1 (mixup) model is loaded:

* the backbone is frozen: its features are computed under ``no_grad`` and only the classifier and a
  learnable weight scaling are in the SGD optimizer;
* the classifier is the stage-1 one, fine-tuned (not re-initialised), at ``lr_factor * lr``;
* learnable weight scaling (LWS): logits multiplied by a (C,) parameter initialised to ones, at ``lr``
  (weight decay applies to both groups);
* "shift learning" on BN (``shift_bn``): the backbone runs in train mode, so BatchNorm normalises with
  batch statistics and updates its running mean / variance, while its affine weight and bias stay fixed
  (not in the optimizer). Without ``shift_bn`` the backbone runs in eval mode.

Use::

    groups = prepare_classifier_retraining(model, lr_factor=0.2)   # freeze, add LWS, param groups
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=2e-4)
    for epoch ...:
        set_stage2_mode(model, shift_bn=True)                          # instead of model.train()
        ...

The groups carry timm's ``lr_scale``, which timm's schedulers apply: with
``CosineLRScheduler(optimizer, t_initial=epochs, lr_min=0)`` stepped per epoch this is MiSLAS's schedule
(``lr_e = lr (1 + cos(pi e / epochs)) / 2``; classifier at ``lr_factor * lr_e``, LWS at ``lr_e``). A
plain torch scheduler ignores ``lr_scale``: set the classifier group's ``lr`` yourself.

Works with any model whose classifier is ``get_classifier()`` (or ``fc``): timm ResNets,
``resnet*_cifar`` and ``NormedLinear`` heads. Only ``_BatchNorm`` layers (BatchNorm1d/2d/3d,
SyncBatchNorm, timm's BatchNormAct2d) are shifted; dropout and drop-path stay off (MiSLAS's backbones
have none).
"""
from typing import Any, Container, Dict, List

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    'prepare_classifier_retraining', 'set_stage2_mode', 'fold_weight_scaling', 'get_weight_scaling',
    'MISLAS_STAGE2',
]

_LWS = 'lws_scale'

_CIFAR = dict(epochs=10, lr=0.1, batch_size=128, weight_decay=2e-4, momentum=0.9, sampler='class_aware',
              samples_per_class=4, scheduler='cosine', mixup=False)
_LARGE = dict(_CIFAR, batch_size=256)

# MiSLAS's stage-2 recipes (dvlab-research/MiSLAS: config/<dataset>/*_stage2_mislas.yaml, train_stage2.py,
# datasets/sampler.py). sampler 'class_aware': ClassAwareSampler (a random class, then 4 of its images,
# cycling), an epoch being ceil(N / batch_size) + 1 iterations; scheduler 'cosine': per epoch, to 0, no
# warmup. lr_factor scales the classifier's lr (the LWS scale gets lr). The LAS smoothing of each setting
# is in timm_cmo.losses.las.LAS_DEFAULTS. Places-LT shifts only the BN of its extra last block.
MISLAS_STAGE2: Dict[str, Dict[str, Any]] = {
    'cifar10_if100': dict(_CIFAR, lr_factor=0.5, shift_bn=False),
    'cifar10_if50': dict(_CIFAR, lr_factor=0.2, shift_bn=False),
    'cifar10_if10': dict(_CIFAR, lr_factor=0.2, shift_bn=False),
    'cifar100_if100': dict(_CIFAR, lr_factor=0.2, shift_bn=True),
    'cifar100_if50': dict(_CIFAR, lr_factor=0.1, shift_bn=True),
    'cifar100_if10': dict(_CIFAR, lr_factor=0.1, shift_bn=True),
    'imagenet_lt': dict(_LARGE, lr_factor=0.05, shift_bn=True, weight_decay=5e-4),
    'inat2018': dict(_LARGE, lr_factor=0.05, shift_bn=True, weight_decay=1e-4),
    'places_lt': dict(_LARGE, lr_factor=0.05, shift_bn=True, weight_decay=5e-4),
}
MISLAS_STAGE2['cifar10'] = MISLAS_STAGE2['cifar10_if100']
MISLAS_STAGE2['cifar100'] = MISLAS_STAGE2['cifar100_if100']


def _classifier(model: nn.Module) -> nn.Module:
    """The classifier module: ``get_classifier()`` (timm), else ``fc``; it must have parameters."""
    classifier = None
    get_classifier = getattr(model, 'get_classifier', None)
    if callable(get_classifier):
        classifier = get_classifier()
    if classifier is None:
        classifier = getattr(model, 'fc', None)
    if not isinstance(classifier, nn.Module):
        raise ValueError(f'{type(model).__name__} has no classifier (get_classifier() or fc)')
    if not any(True for _ in classifier.parameters()):
        raise ValueError(f'The classifier of {type(model).__name__} ({type(classifier).__name__}) has no '
                         f'parameters (num_classes=0?)')
    return classifier


def _scale_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, _LWS)


def _num_outputs(classifier: nn.Module) -> int:
    for name in ('out_features', 'num_classes'):
        n = getattr(classifier, name, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f'Cannot tell the number of classes of the classifier {type(classifier).__name__}')


def get_weight_scaling(model: nn.Module):
    """The (C,) LWS parameter of the model's classifier, or None without weight scaling."""
    return getattr(_classifier(model), _LWS, None)


def prepare_classifier_retraining(
        model: nn.Module,
        reset_head: bool = False,
        weight_scaling: bool = True,
        lr_factor: float = 1.0,
) -> List[Dict[str, Any]]:
    """Freeze all but the classifier for MiSLAS's stage 2 and return the optimizer's parameter groups.

    Every parameter outside the classifier gets ``requires_grad=False`` and its ``grad`` cleared (so SGD's
    weight decay and momentum cannot move it even if it is passed to the optimizer); BN running
    statistics are buffers and are left to :func:`set_stage2_mode`.

    Args:
        model: The stage-1 model (its classifier: ``get_classifier()`` or ``fc``; Linear or NormedLinear).
        reset_head: Re-initialise the classifier (its ``reset_parameters()``). Default False: MiSLAS
            fine-tunes the stage-1 classifier.
        weight_scaling: Add MiSLAS's learnable weight scaling: a (C,) parameter ``lws_scale`` of ones on the
            classifier module multiplying its output (a forward hook; the state dict gains
            ``<classifier>.lws_scale``; see :func:`fold_weight_scaling`). Idempotent. Default True.
        lr_factor: ``lr_scale`` of the classifier group (MiSLAS's ``lr_factor``). Default 1.0.

    Returns:
        ``[{'params': classifier parameters, 'lr_scale': lr_factor}, {'params': [lws_scale], 'lr_scale': 1.0}]``
        (the second group only with weight scaling).
    """
    if not lr_factor > 0:
        raise ValueError(f'lr_factor must be > 0, got {lr_factor}')
    classifier = _classifier(model)
    if reset_head:
        reset = getattr(classifier, 'reset_parameters', None)
        if not callable(reset):
            raise ValueError(f'reset_head=True needs a classifier with reset_parameters(); '
                             f'{type(classifier).__name__} has none')
        reset()
    scale = getattr(classifier, _LWS, None)
    if weight_scaling and scale is None:
        ref = next(classifier.parameters())
        scale = nn.Parameter(torch.ones(_num_outputs(classifier), device=ref.device, dtype=ref.dtype))
        classifier.register_parameter(_LWS, scale)
        classifier.register_forward_hook(_scale_output)
    trainable = {id(p) for p in classifier.parameters()}
    for p in model.parameters():
        train = id(p) in trainable
        p.requires_grad_(train)
        if not train:
            p.grad = None
    head = [p for name, p in classifier.named_parameters() if name != _LWS]
    groups = [dict(params=head, lr_scale=float(lr_factor))]
    if scale is not None:
        groups.append(dict(params=[scale], lr_scale=1.0))
    return groups


def set_stage2_mode(model: nn.Module, shift_bn: bool = True) -> nn.Module:
    """Put the model in MiSLAS's stage-2 training mode (call it in place of ``model.train()``).

    Everything is in eval mode except the classifier and, with ``shift_bn``, every BatchNorm layer, which
    then normalises with batch statistics and updates its running mean / variance (its affine parameters are
    frozen by :func:`prepare_classifier_retraining`). ``shift_bn=False``: the backbone is fully in eval mode.
    Returns the model.
    """
    model.eval()
    if shift_bn:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
    _classifier(model).train()
    return model


def fold_weight_scaling_state_dict(state_dict: Dict[str, torch.Tensor], keep: Container[str] = ()) -> Dict[str, torch.Tensor]:
    """The state dict with every ``<classifier>.lws_scale`` folded into that classifier's ``weight`` / ``bias``
    (as :func:`fold_weight_scaling` does to a model), except keys in ``keep`` (a model that has the scaling).

    Lets a stage-2 checkpoint load into a plain model of the same architecture (evaluation, Hub export).
    """
    scales = [k for k in state_dict if k.endswith('.' + _LWS) and k not in keep]
    if not scales:
        return state_dict
    out = dict(state_dict)
    for key in scales:
        prefix = key[:-len(_LWS)]
        scale = out.pop(key)
        weight = out.get(prefix + 'weight')
        if weight is None or weight.ndim != 2 or weight.shape[0] != scale.shape[0]:
            raise ValueError(f'{key}: no (out_features, in_features) {prefix}weight to fold the weight scaling into '
                             f'(a cosine-normalised head keeps it)')
        out[prefix + 'weight'] = weight * scale.unsqueeze(1)
        if prefix + 'bias' in out:
            out[prefix + 'bias'] = out[prefix + 'bias'] * scale
    return out


def fold_weight_scaling(model: nn.Module) -> nn.Module:
    """Fold the LWS scale into an ``nn.Linear`` classifier (``W <- s W``, ``b <- s b``; same logits) and
    remove it, leaving a plain model whose state dict loads into a fresh one. No-op without weight scaling.

    A ``NormedLinear`` (cosine) head normalises its weights, so its scale cannot be folded: ValueError.
    """
    classifier = _classifier(model)
    scale = getattr(classifier, _LWS, None)
    if scale is None:
        return model
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f'Cannot fold the weight scaling into a {type(classifier).__name__} classifier; '
                         f'only nn.Linear (keep the lws_scale parameter otherwise)')
    with torch.no_grad():
        classifier.weight.mul_(scale.unsqueeze(1))
        if classifier.bias is not None:
            classifier.bias.mul_(scale)
    for key in [k for k, hook in classifier._forward_hooks.items() if hook is _scale_output]:
        del classifier._forward_hooks[key]
        for extra in ('_forward_hooks_with_kwargs', '_forward_hooks_always_called'):
            getattr(classifier, extra, {}).pop(key, None)
    delattr(classifier, _LWS)
    return model
