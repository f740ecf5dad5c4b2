"""Models: CIFAR ResNets registered with timm and a cosine-normalised classifier head.

Importing this package registers ``resnet{20,32,44,56,110}_cifar`` with timm and adds the
``head_norm`` argument to timm's ``ResNet`` (``timm.create_model('resnet50', head_norm=True)``).
"""
from .head_norm import NormedLinear, add_head_norm_arg, is_head_norm, patch_timm_resnet
from .resnet_cifar import CIFAR_MEAN, CIFAR_STD, ResNetCifar

patch_timm_resnet()

__all__ = ['NormedLinear', 'ResNetCifar', 'is_head_norm', 'add_head_norm_arg', 'CIFAR_MEAN', 'CIFAR_STD']
