"""CIFAR ResNets (He et al. 2016, sec. 4.2) as used by LDAM-DRW and CMO, registered with timm.

3 stages of basic blocks with 16/32/64 channels at strides 1/2/2 on a 3x3 stem, n blocks per stage
(depth = 6n + 2), parameter-free 'option A' shortcuts (subsample + zero-pad channels), global average
pool and a linear (or, with ``head_norm=True``, cosine-normalised) classifier named ``fc``.
State-dict keys match the paper code (``models/resnet_cifar.py``) except its classifier ``linear`` -> ``fc``.

Models: ``resnet20_cifar``, ``resnet32_cifar`` (CMO's CIFAR backbone, 0.46M params), ``resnet44_cifar``,
``resnet56_cifar``, ``resnet110_cifar``; 10 classes by default, pass ``num_classes=100`` for CIFAR-100.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .head_norm import NormedLinear, check_head_lws

__all__ = ['ResNetCifar', 'BasicBlockCifar', 'PadShortcut', 'CIFAR_MEAN', 'CIFAR_STD']

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class PadShortcut(nn.Module):
    """Parameter-free 'option A' shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded to ``out_chs`` channels
    (split evenly before/after, as the paper's ``F.pad(..., (0, 0, 0, 0, planes // 4, planes // 4))``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        pad = self.out_chs - self.in_chs
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))

    def extra_repr(self) -> str:
        return f'{self.in_chs}, {self.out_chs}, stride={self.stride}'


class BasicBlockCifar(nn.Module):
    """conv3x3(stride)-bn-relu-conv3x3-bn + shortcut, relu. Keys: conv1, bn1, conv2, bn2 (as the paper)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = PadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet (depth = 6 * layers_per_stage + 2).

    Args:
        layers_per_stage: Basic blocks per stage (3: ResNet-20, 5: ResNet-32, 7, 9, 18: ResNet-110).
        num_classes: Classifier outputs; 0 for no classifier (``fc`` is Identity). Default 10.
        in_chans: Input channels. Default 3.
        global_pool: Pooling type for timm's ``SelectAdaptivePool2d``; '' disables pooling. Default 'avg'.
        drop_rate: Dropout before the classifier. Default 0.
        head_norm: Use a cosine-normalised ``NormedLinear`` classifier (LDAM/CMO ``use_norm``). Default False.
        head_lws: Give the cosine head a learnable per-class scale (``fc.lws_scale``, the LWS second stage of
            a cosine-head model); needs ``head_norm``. Default False.

    Shapes: input (B, in_chans, H, W); ``forward_features`` -> (B, 64, H/4, W/4); ``forward`` -> (B, num_classes).
    """

    def __init__(
            self,
            layers_per_stage: int = 5,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_norm: bool = False,
            head_lws: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if layers_per_stage < 1:
            raise ValueError(f'layers_per_stage must be >= 1, got {layers_per_stage}')
        self.layers_per_stage = layers_per_stage
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        check_head_lws(head_norm, head_lws)
        self.head_norm = bool(head_norm)
        self.head_lws = bool(head_lws)
        self.grad_checkpointing = False
        channels = (16, 32, 64)

        # modules are registered in forward order: timm's FeatureListNet runs the children in sequence
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(channels[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module='act1')]

        in_chs, reduction = channels[0], 1
        for i, out_chs in enumerate(channels):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlockCifar(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1, **dd)
                      for j in range(layers_per_stage)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))
            in_chs = out_chs

        self.num_features = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        if self.head_norm and num_classes > 0:
            self.fc = NormedLinear(self.head_hidden_size, num_classes, class_scale=self.head_lws, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Paper init: ``kaiming_normal_`` (fan_in) on every Conv2d and Linear weight; NormedLinear keeps its own."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: Identity); stays a NormedLinear when ``head_norm``."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        if self.head_norm and num_classes > 0:
            self.fc = NormedLinear(self.head_hidden_size, num_classes, class_scale=self.head_lws, **dd)
        elif isinstance(self.fc, nn.Linear):
            nn.init.kaiming_normal_(self.fc.weight)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of stem + 3 stages (indices 0..3, as ``feature_info``); see timm's ResNet."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        for i, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop stages after the last wanted intermediate (and the head if ``prune_head`` or stages dropped)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for n in ('layer1', 'layer2', 'layer3')[max_index:]:
            setattr(self, n, nn.Sequential())
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnet_cifar(variant: str, layers_per_stage: int, pretrained: bool = False, **kwargs) -> ResNetCifar:
    return build_model_with_cfg(
        ResNetCifar,
        variant,
        pretrained,
        layers_per_stage=layers_per_stage,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),  # stem + 3 stages (timm defaults to 5 taps)
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': (8, 8),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR_MEAN,
        'std': CIFAR_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet20_cifar': _cfg(),
    'resnet32_cifar': _cfg(),
    'resnet44_cifar': _cfg(),
    'resnet56_cifar': _cfg(),
    'resnet110_cifar': _cfg(),
})


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M params)."""
    return _create_resnet_cifar('resnet20_cifar', 3, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46M params), the LDAM-DRW / CMO CIFAR-LT backbone."""
    return _create_resnet_cifar('resnet32_cifar', 5, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66M params)."""
    return _create_resnet_cifar('resnet44_cifar', 7, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85M params)."""
    return _create_resnet_cifar('resnet56_cifar', 9, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-110 for CIFAR (18 blocks per stage, 1.7M params)."""
    return _create_resnet_cifar('resnet110_cifar', 18, pretrained, **kwargs)
