"""Second stages on a stage-1 model: classifier re-training (cRT), learnable weight scaling (LWS), MiSLAS's
label-aware smoothing stage (LAS) and RIDE's expert assignment (router), as entries of a small registry.

Decoupling (Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020;
facebookresearch/classifier-balancing), after a stage-1 model trained with instance-balanced sampling:

* ``crt``: the classifier re-initialised (``nn.Linear``'s default init, as the authors' ``DotProductClassifier``)
  and re-trained with cross-entropy under class-balanced sampling, everything else frozen;
* ``lws``: the stage-1 classifier frozen and a learnable (C,) scale of its logits trained the same way
  (the authors' ``TauNormClassifier``: ``logits = (W f + b) * s``, ``s`` initialised to ones).

The backbone, BatchNorm statistics included, stays exactly the stage-1 one (:func:`set_stage2_mode` with
``shift_bn=False``): the paper keeps the representation fixed. (The authors' code puts the frozen backbone in
train mode, so its BatchNorm running statistics drift under class-balanced batches; MiSLAS later made that
"shift learning" a method of its own, the ``las`` stage's ``shift_bn``.)

What MiSLAS's ``train_stage2.py`` does after a stage-1 (mixup) model is loaded (the ``las`` stage):

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

The weight scaling of an ``nn.Linear`` head is a forward hook with the parameter ``<classifier>.lws_scale``;
:func:`fold_weight_scaling` takes it into ``W`` and ``b`` (same logits), so a checkpoint with it loads into a
plain model. A cosine head (``NormedLinear``) normalises its weights, so there the scale is the head's own
parameter (``NormedLinear(class_scale=True)``, model argument ``head_lws=True``, recorded for the Hub export).

Class-balanced sampling is the plugin's ROS with ``r = 1`` (``--ros --ros-r 1``: every class drawn with
probability 1/C, images with replacement, one epoch = N draws). The authors' ``ClassAwareSampler`` (4 images
per visited class, classes and each class's images cycled in reshuffled order, epochs of ``int(N / batch)``
steps) has the same class frequencies in expectation; it differs in the order within an epoch, which a
linear classifier on frozen features hardly feels.

Registry: :func:`get_stage2` / :func:`list_stage2` / :func:`register_stage2` (the ``--stage2`` choices of
``train_cmo.py``); each :class:`Stage2` names the loss it trains with, how it freezes the model and what its
training mode is.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from timm.models._input import update_model_args

from .head_norm import NormedLinear

__all__ = [
    'prepare_classifier_retraining', 'set_stage2_mode', 'fold_weight_scaling', 'fold_weight_scaling_state_dict',
    'get_weight_scaling', 'add_weight_scaling', 'match_weight_scaling', 'MISLAS_STAGE2', 'DECOUPLING_STAGE2',
    'Stage2', 'register_stage2', 'get_stage2', 'list_stage2',
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

# Kang et al.'s classifier learning (facebookresearch/classifier-balancing: config/<dataset>/cls_crt.yaml and
# cls_lws.yaml, run_networks.py): SGD momentum 0.9 (no Nesterov), lr 0.2 for every trained parameter, batch 512,
# cosine to 0 over the epochs (CosineAnnealingLR, eta_min 0), ClassAwareSampler with 4 images per class, the
# classifier re-initialised (cRT) or frozen under a learnable scale (LWS), cross-entropy. Their stage 1 is 90
# epochs of instance-balanced sampling (cosine, lr 0.2, batch 512; 200 epochs for the iNaturalist models behind
# the 68.2 / 69.5 the CMO paper cites).
_KANG = dict(lr=0.2, batch_size=512, momentum=0.9, sampler='class_aware', samples_per_class=4, scheduler='cosine',
             loss='ce')
DECOUPLING_STAGE2: Dict[str, Dict[str, Any]] = {
    'imagenet_lt_crt': dict(_KANG, epochs=10, weight_decay=5e-4),
    'imagenet_lt_lws': dict(_KANG, epochs=5, weight_decay=5e-4),
    'inat2018_crt': dict(_KANG, epochs=30, weight_decay=1e-4),
    'inat2018_lws': dict(_KANG, epochs=5, weight_decay=1e-4),
    'places_lt_crt': dict(_KANG, epochs=10, weight_decay=5e-4),
    'places_lt_lws': dict(_KANG, epochs=5, weight_decay=5e-4),
}


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


def add_weight_scaling(model: nn.Module) -> nn.Parameter:
    """Give the model's classifier a learnable (C,) scale of its logits, ones (idempotent); return it.

    ``nn.Linear`` and other heads: the parameter ``lws_scale`` and a forward hook multiplying the output.
    ``NormedLinear``: the head's own ``lws_scale`` (:meth:`NormedLinear.enable_class_scale`), recorded as the
    model argument ``head_lws=True`` so that an export rebuilds it.
    """
    classifier = _classifier(model)
    if isinstance(classifier, NormedLinear):
        scale = classifier.enable_class_scale()
        if hasattr(model, 'head_lws'):
            model.head_lws = True
        update_model_args(model, head_lws=True)
        return scale
    scale = getattr(classifier, _LWS, None)
    if scale is None:
        ref = next(classifier.parameters())
        scale = nn.Parameter(torch.ones(_num_outputs(classifier), device=ref.device, dtype=ref.dtype))
        classifier.register_parameter(_LWS, scale)
        classifier.register_forward_hook(_scale_output)
    return scale


def match_weight_scaling(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Before loading ``state_dict``: a cosine head whose checkpoint carries a weight scaling gets one too (it
    cannot be folded into the weights; see :func:`fold_weight_scaling_state_dict` for linear heads)."""
    try:
        classifier = _classifier(model)
    except ValueError:
        return
    if not isinstance(classifier, NormedLinear) or classifier.lws_scale is not None:
        return
    name = next((n for n, m in model.named_modules() if m is classifier), None)
    if name is not None and f'{name}.{_LWS}' in state_dict:
        add_weight_scaling(model)


def prepare_classifier_retraining(
        model: nn.Module,
        reset_head: bool = False,
        weight_scaling: bool = True,
        lr_factor: float = 1.0,
        train_classifier: bool = True,
) -> List[Dict[str, Any]]:
    """Freeze all but the classifier (and its weight scaling) for a second stage; return the optimizer's groups.

    Every parameter outside the classifier gets ``requires_grad=False`` and its ``grad`` cleared (so SGD's
    weight decay and momentum cannot move it even if it is passed to the optimizer); BN running
    statistics are buffers and are left to :func:`set_stage2_mode`.

    Args:
        model: The stage-1 model (its classifier: ``get_classifier()`` or ``fc``; Linear or NormedLinear).
        reset_head: Re-initialise the classifier (its ``reset_parameters()``; cRT). Default False: MiSLAS
            fine-tunes the stage-1 classifier.
        weight_scaling: Add a learnable weight scaling (:func:`add_weight_scaling`: a (C,) ``lws_scale`` of ones
            multiplying the classifier's output; the state dict gains ``<classifier>.lws_scale``; see
            :func:`fold_weight_scaling`). Idempotent. Default True.
        lr_factor: ``lr_scale`` of the classifier group (MiSLAS's ``lr_factor``). Default 1.0.
        train_classifier: Train the classifier's own weights. False (LWS): only ``lws_scale`` trains, the
            classifier is frozen too (needs ``weight_scaling``). Default True.

    Returns:
        ``[{'params': classifier parameters, 'lr_scale': lr_factor}, {'params': [lws_scale], 'lr_scale': 1.0}]``
        (the first group only with ``train_classifier``, the second only with weight scaling).
    """
    if not lr_factor > 0:
        raise ValueError(f'lr_factor must be > 0, got {lr_factor}')
    if not train_classifier and not weight_scaling:
        raise ValueError('train_classifier=False trains the weight scaling only: it needs weight_scaling=True')
    classifier = _classifier(model)
    if reset_head:
        reset = getattr(classifier, 'reset_parameters', None)
        if not callable(reset):
            raise ValueError(f'reset_head=True needs a classifier with reset_parameters(); '
                             f'{type(classifier).__name__} has none')
        reset()
    scale = add_weight_scaling(model) if weight_scaling else getattr(classifier, _LWS, None)
    head = [p for name, p in classifier.named_parameters() if name != _LWS]
    trainable = {id(p) for p in (head if train_classifier else [])} | ({id(scale)} if scale is not None else set())
    for p in model.parameters():
        train = id(p) in trainable
        p.requires_grad_(train)
        if not train:
            p.grad = None
    groups = [dict(params=head, lr_scale=float(lr_factor))] if train_classifier else []
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


# --- the registry of second stages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage2:
    """A second stage started from a stage-1 model.

    Attributes:
        name: The ``--stage2`` value.
        loss: The ``--loss`` it trains with.
        trains: What it trains, for messages (``'the classifier'``).
        prepare: ``prepare(model, **options)``: freeze what the stage keeps, add what it trains; returns the
            optimizer's parameters or parameter groups.
        train_mode: ``train_mode(model, **options)`` replaces ``model.train()`` each epoch; None: ``model.train()``.
        options: ``train_cmo.py`` flag (argparse dest) -> keyword passed to ``prepare`` / ``train_mode``.
        fresh: State-dict key prefixes the stage adds to the model, absent from a stage-1 checkpoint.
        model_kwargs: Factory arguments the stage's model is built with (``router=True``).
        multi_expert: The stage needs a multi-expert (RIDE) model.
        summary: One line on what the stage is.
    """
    name: str
    loss: str
    trains: str
    prepare: Callable[..., List[Any]]
    train_mode: Optional[Callable[..., nn.Module]] = None
    options: Mapping[str, str] = field(default_factory=dict)
    fresh: Tuple[str, ...] = ()
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    multi_expert: bool = False
    summary: str = ''

    def kwargs(self, flags: Mapping[str, Any]) -> Dict[str, Any]:
        """The keywords of ``prepare`` / ``train_mode`` from a mapping of flag values (``vars(args)``)."""
        return {kw: flags[dest] for dest, kw in self.options.items() if dest in flags}


_STAGE2: Dict[str, Stage2] = {}


def register_stage2(stage: Stage2) -> Stage2:
    """Add (or replace) a second stage in the registry; returns it."""
    _STAGE2[stage.name] = stage
    return stage


def get_stage2(name: str) -> Stage2:
    """The registered second stage ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return _STAGE2[name]
    except KeyError:
        raise KeyError(f'unknown second stage {name!r}; choose from {", ".join(list_stage2())}') from None


def list_stage2() -> List[str]:
    """Names of the registered second stages, in registration order."""
    return list(_STAGE2)


def _frozen_backbone(model: nn.Module, **_: Any) -> nn.Module:
    return set_stage2_mode(model, shift_bn=False)


def _prepare_crt(model: nn.Module, **_: Any) -> List[Dict[str, Any]]:
    return prepare_classifier_retraining(model, reset_head=True, weight_scaling=False)


def _prepare_lws(model: nn.Module, **_: Any) -> List[Dict[str, Any]]:
    return prepare_classifier_retraining(model, weight_scaling=True, train_classifier=False)


def _prepare_las(model: nn.Module, lr_factor: float = 1.0, **_: Any) -> List[Dict[str, Any]]:
    from .head_norm import is_head_norm
    # MiSLAS's weight scaling is a linear head's: a cosine head trains without it, as before
    return prepare_classifier_retraining(model, weight_scaling=not is_head_norm(model), lr_factor=lr_factor)


def _las_mode(model: nn.Module, shift_bn: bool = True, **_: Any) -> nn.Module:
    return set_stage2_mode(model, shift_bn=shift_bn)


def _prepare_router(model: nn.Module, **_: Any) -> List[nn.Parameter]:
    from .ride import freeze_for_router_training
    freeze_for_router_training(model)
    return [p for p in model.parameters() if p.requires_grad]


register_stage2(Stage2(
    'crt', loss='ce', trains='the classifier', prepare=_prepare_crt, train_mode=_frozen_backbone,
    summary='classifier re-training (Kang et al. 2020): the classifier re-initialised and trained, all else frozen'))
register_stage2(Stage2(
    'lws', loss='ce', trains='the weight scaling', prepare=_prepare_lws, train_mode=_frozen_backbone,
    summary='learnable weight scaling (Kang et al. 2020): a per-class scale of the frozen logits'))
register_stage2(Stage2(
    'las', loss='las', trains='the classifier', prepare=_prepare_las, train_mode=_las_mode,
    options={'las_lr_factor': 'lr_factor', 'las_shift_bn': 'shift_bn'},
    summary="MiSLAS's label-aware smoothing: classifier and weight scaling fine-tuned, BatchNorm shifting"))
register_stage2(Stage2(
    'router', loss='ride_ea', trains='the router', prepare=_prepare_router, fresh=('router.',),
    model_kwargs={'router': True}, multi_expert=True,
    summary="RIDE's expert assignment: only the router trains"))
