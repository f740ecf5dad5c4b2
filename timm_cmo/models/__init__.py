"""Models: CIFAR ResNets, RIDE multi-expert ResNets, BBN's bilateral-branch ResNets and two classifier heads, in
timm's registry.

Importing this package registers ``resnet{20,32,44,56,110}_cifar``, ``ride_resnet{20,32,44,56,110}_cifar``,
``ride_resnet10``, ``ride_resnet50``, ``ride_resnext50_32x4d``, ``bbn_resnet32_cifar`` and ``bbn_resnet50`` with timm,
adds the ``head_norm`` argument
(cosine-normalised classifier) to timm's ``ResNet`` (``timm.create_model('resnet50', head_norm=True)``) and the
``causal_norm`` argument (Causal Norm's multi-head cosine classifier with TDE inference) to timm's ``ResNet`` and
the CIFAR ResNets (``timm.create_model('resnet32_cifar', causal_norm=True, causal_alpha=1.5)``).
:func:`logits_and_features` gives a model's logits with its penultimate features (for losses with
``needs_features``, e.g. IB).
"""
from .bbn import BBNResNet, BBNResNetCifar, bbn_checkpoint_filter_fn
from .features import LogitsAndFeatures, WithFeatures, check_feature_split, logits_and_features
from .causal_norm import (
    CAUSAL_ARGS, CausalNormClassifier, add_causal_norm_arg, is_causal_norm, patch_causal_norm, set_causal_norm_lr)
from .head_norm import NormedLinear, add_head_norm_arg, is_head_norm, patch_timm_resnet
from .resnet_cifar import CIFAR_MEAN, CIFAR_STD, ResNetCifar
from .ride import RIDEResNet, RIDEResNetCifar, freeze_for_router_training, ride_checkpoint_filter_fn

patch_timm_resnet()
patch_causal_norm()

__all__ = ['NormedLinear', 'ResNetCifar', 'is_head_norm', 'add_head_norm_arg', 'CIFAR_MEAN', 'CIFAR_STD',
           'RIDEResNet', 'RIDEResNetCifar', 'freeze_for_router_training', 'ride_checkpoint_filter_fn',
           'BBNResNetCifar', 'BBNResNet', 'bbn_checkpoint_filter_fn',
           'CausalNormClassifier', 'is_causal_norm', 'add_causal_norm_arg', 'set_causal_norm_lr', 'CAUSAL_ARGS',
           'LogitsAndFeatures', 'WithFeatures', 'check_feature_split', 'logits_and_features']
