"""BBN (Zhou et al., CVPR 2020): the Bilateral-Branch Network, registered with timm.

"BBN: Bilateral-Branch Network with Cumulative Learning for Long-Tailed Visual Recognition". A shared trunk
feeds two branches of the same shape: the *conventional* branch (``cb_block``), trained on the ordinary batch,
and the *re-balancing* branch (``rb_block``), trained on a batch of the reversed sampler (class ``k`` drawn with
probability proportional to ``n_max / n_k``, :mod:`timm_cmo.data.dual`). Each branch is the last residual block
of the last stage, duplicated; everything before it is shared. Their pooled features ``f_c``, ``f_r`` are mixed by
the cumulative-learning weight ``alpha`` and classified by one linear classifier ``fc``::

    logits = fc(2 * cat(alpha * f_c, (1 - alpha) * f_r))

``alpha = 1 - (t / T)^2`` in epoch ``t`` (:func:`timm_cmo.losses.bbn.bbn_alpha`), and the loss is
``alpha * L(logits, y_c) + (1 - alpha) * L(logits, y_r)`` (:class:`timm_cmo.losses.bbn.BBNLoss`). At test time
both branches see the same image with equal weight (alpha = 0.5, so the factor 2 cancels):
``logits = fc(cat(f_c, f_r))``.

Forward (``B`` batch, ``C`` classes, ``F`` the branch's feature size):

* ``forward(x)`` -> (B, C): both branches on ``x`` with alpha = 0.5, BBN's inference, in train and eval mode
  (timm's contract: one logits tensor);
* ``forward_bbn(x_conventional, x_rebalancing, alpha)`` -> (B, C): BBN's training forward. Each batch runs
  through the trunk on its own (BatchNorm sees each batch alone and updates its statistics twice per step, first
  with the conventional batch, as BBN's two model calls do);
* ``forward(x, x_rebalancing, alpha)`` is ``forward_bbn``: the training step calls the model through ``__call__``
  so DistributedDataParallel and ``torch.compile`` see it. A torch.fx trace records the one-batch forward (its
  inputs are proxies, not tensors).
* ``forward_features(x)`` -> (B, 2 F, h, w): the two branch maps of the same input, concatenated on channels;
  ``forward_head(features, pre_logits)`` pools, drops out and classifies them.

Architectures, from the BBN code (``lib/backbone/resnet_cifar.py`` ``bbn_res32_cifar``, ``lib/backbone/resnet.py``
``bbn_res50``, ``lib/net/network.py``, ``lib/core/combiner.py``):

* ``bbn_resnet32_cifar``: CMO's ResNet-32 (3x3 stem, stages of 5 basic blocks with 16 / 32 / 64 channels,
  option-A shortcuts), whose third stage has 4 shared blocks and the 5th block twice, once per branch; 128 pooled
  features, ``kaiming_normal_`` convolutions, the classifier with PyTorch's default ``nn.Linear`` init and a bias
  (BBN's ``_weights_init`` reaches the backbone only). 537,488 parameters before the classifier.
* ``bbn_resnet50``: ResNet-50 (timm's ``Bottleneck`` blocks, the same as BBN's) whose fourth stage has 2 shared
  blocks and the 3rd twice; 4096 pooled features; PyTorch's default initialisation everywhere, as BBN's ResNet-50
  (it sets none).

State-dict keys: ``conv1``, ``bn1``, ``layer1.*`` ... (the shared stages; the last one a block short),
``cb_block.*``, ``rb_block.*``, ``fc.*``: BBN's backbone keys, so :func:`bbn_checkpoint_filter_fn` (the models'
``pretrained_filter_fn``) loads the authors' checkpoints after dropping their ``module.`` / ``backbone.`` prefixes
and renaming ``classifier`` to ``fc``.

A note on the authors' numbers: BBN's training script evaluates on the test split after every epoch and keeps the
best epoch (``best_model.pth``), a choice made on the test set; train_cmo.py reports the last epoch.
"""
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import Bottleneck

from .resnet_cifar import CIFAR_MEAN, CIFAR_STD, BasicBlockCifar
from .ride import _cifar_stage, _resnet_stage

__all__ = ['BBNResNetCifar', 'BBNResNet', 'bbn_checkpoint_filter_fn']


class _BBNBase(nn.Module):
    """Shared trunk -> ``cb_block`` / ``rb_block`` -> one classifier ``fc``; subclasses build the layers.

    Subclasses set ``cb_block``, ``rb_block``, ``branch_features`` (channels of one branch), ``stage_names`` (the
    shared stages with an intermediate feature of their own), ``last_stage`` (the shared stage the branches end),
    ``feature_info``, implement :meth:`forward_stem` and :meth:`forward_trunk`, then call :meth:`_init_head`.
    """
    needs_dual = True  # trains on the loader's dual (re-balancing) batch: --loss bbn

    def _init_head(self, num_classes: int, global_pool: str, drop_rate: float, dd: Dict[str, Any]) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = 2 * self.branch_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.fc = self._make_fc(num_classes, dd)

    def _make_fc(self, num_classes: int, dd: Dict[str, Any]) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features * self.global_pool.feat_mult(), num_classes, **dd)

    # --- timm interface --------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Stem, the shared stages' blocks, then the two branch blocks as one group: the last stage's last block, where
        the one-branch ResNet has it (its stage's group when ``coarse``)."""
        stage = int(self.last_stage[len('layer'):])
        branches = (stage,) if coarse else (stage, len(getattr(self, self.last_stage)))
        return dict(
            stem=r'^conv1|bn1',
            blocks=[(r'^layer(\d+)', None), (r'^(?:cb|rb)_block', branches)] if coarse else
            [(r'^layer(\d+)\.(\d+)', None), (r'^(?:cb|rb)_block', branches)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` on both branches' features (0: Identity, the pooled features)."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.fc = self._make_fc(num_classes, dd)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    # --- forward ---------------------------------------------------------------------------------------------

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem up to its activation (the first intermediate feature)."""
        return self.act1(self.bn1(self.conv1(x)))

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the stem's feature before the first stage (ResNet-50's max-pool)."""
        return x

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and every shared stage: (B, in_chans, H, W) -> the map both branches start from."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> both branches on the same input, (B, 2 * branch_features, h, w)."""
        x = self.forward_trunk(x)
        return torch.cat([self.cb_block(x), self.rb_block(x)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 2 * branch_features, h, w) -> (B, num_classes); the pooled (B, 2 * branch_features) with
        ``pre_logits`` or ``num_classes=0``."""
        return self._classify(self.global_pool(x), pre_logits)

    def _classify(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward_bbn(self, x_conventional: torch.Tensor, x_rebalancing: torch.Tensor, alpha: float) -> torch.Tensor:
        """BBN's training forward: ``fc(2 * cat(alpha * f_c, (1 - alpha) * f_r))``.

        Args:
            x_conventional: (B, in_chans, H, W) the ordinary batch, for the conventional branch.
            x_rebalancing: (B, in_chans, H, W) the reversed sampler's batch, for the re-balancing branch.
            alpha: The conventional branch's weight, in [0, 1] (cumulative learning; 0.5 is the inference).

        Returns:
            (B, num_classes) logits (the mixed pooled features with ``num_classes=0``).
        """
        f_c = self.global_pool(self.cb_block(self.forward_trunk(x_conventional)))
        f_r = self.global_pool(self.rb_block(self.forward_trunk(x_rebalancing)))
        return self._classify(2. * torch.cat([alpha * f_c, (1. - alpha) * f_r], dim=1))

    def forward(self, x: torch.Tensor, x_rebalancing: Optional[torch.Tensor] = None, alpha: float = 0.5
                ) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_classes), both branches on ``x`` at equal weight; with ``x_rebalancing``,
        :meth:`forward_bbn` ``(x, x_rebalancing, alpha)``."""
        if isinstance(x_rebalancing, torch.Tensor):  # an fx trace's proxy is not: it records the one-batch forward
            return self.forward_bbn(x, x_rebalancing, alpha)
        return self.forward_head(self.forward_features(x))

    # --- intermediate features ------------------------------------------------------------------------------

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem, the shared stages and, last, both branches concatenated (as ``feature_info``);
        the final map equals :meth:`forward_features`. See timm's ResNet."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        stages = [getattr(self, n) for n in self.stage_names]
        last = len(self.feature_info) - 1
        if stop_early:
            stages = stages[:max_index]
        for i, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if not stop_early or max_index == last:
            x = getattr(self, self.last_stage)(x)
            x = torch.cat([self.cb_block(x), self.rb_block(x)], dim=1)
            if last in take_indices:
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
        """Drop the stages after the last wanted feature (the branches when that is a shared stage's) and the head
        if ``prune_head`` or stages were dropped."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = len(self.feature_info) - 1
        if max_index < last:
            for n in self.stage_names[max_index:] + (self.last_stage,):
                setattr(self, n, nn.Sequential())
            self.cb_block, self.rb_block = nn.Identity(), nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < last:
            self.reset_classifier(0, '')
        return take_indices


class BBNResNetCifar(_BBNBase):
    """BBN's CIFAR ResNet (depth 6n + 2): the CIFAR ResNet whose last block is duplicated into the two branches.

    Args:
        layers_per_stage: Basic blocks per stage n (5: BBN's ResNet-32; the third stage shares n - 1). Default 5.
        num_classes: Classes; 0 for no classifier. Default 10.
        in_chans: Input channels. Default 3.
        global_pool: timm pool type. Default 'avg'.
        drop_rate: Dropout on the pooled features. Default 0.

    Shapes: input (B, in_chans, H, W); ``forward_features`` -> (B, 128, H/4, W/4); ``forward`` and ``forward_bbn``
    -> (B, num_classes).
    """

    def __init__(
            self,
            layers_per_stage: int = 5,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if layers_per_stage < 2:
            raise ValueError(f'layers_per_stage must be >= 2 (the last block of the third stage is the branches), '
                             f'got {layers_per_stage}')
        self.layers_per_stage = layers_per_stage
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(16, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _cifar_stage(16, 16, layers_per_stage, 1, dd)
        self.layer2 = _cifar_stage(16, 32, layers_per_stage, 2, dd)
        self.layer3 = _cifar_stage(32, 64, layers_per_stage - 1, 2, dd)
        self.cb_block = BasicBlockCifar(64, 64, **dd)
        self.rb_block = BasicBlockCifar(64, 64, **dd)
        self.branch_features = 64
        self.stage_names, self.last_stage = ('layer1', 'layer2'), 'layer3'
        self.feature_info = [
            dict(num_chs=16, reduction=1, module='act1'), dict(num_chs=16, reduction=1, module='layer1'),
            dict(num_chs=32, reduction=2, module='layer2'), dict(num_chs=128, reduction=4, module='cb_block+rb_block')]
        self._init_head(num_classes, global_pool, drop_rate, dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """BBN's ``_weights_init``: ``kaiming_normal_`` (fan_in) on every convolution; the classifier keeps PyTorch's
        ``nn.Linear`` init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        return self.layer3(self.layer2(self.layer1(x)))


class BBNResNet(_BBNBase):
    """BBN's ResNet (ImageNet layout): stem and stages 1-3 shared, stage 4 a block short, its last block duplicated.

    Args:
        block: timm ``Bottleneck`` (ResNet-50) or ``BasicBlock``.
        layers: Blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50 (stage 4 shares ``layers[3] - 1``).
        num_classes: Classes; 0 for no classifier. Default 1000.
        in_chans: Input channels. Default 3.
        global_pool: timm pool type. Default 'avg'.
        drop_rate: Dropout on the pooled features. Default 0.

    Shapes: input (B, in_chans, H, W); ``forward_features`` -> (B, 4096, H/32, W/32) for ResNet-50; ``forward`` and
    ``forward_bbn`` -> (B, num_classes).
    """

    def __init__(
            self,
            block: Type[nn.Module] = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(layers) != 4 or min(layers) < 1 or layers[3] < 2:
            raise ValueError(f'layers must be 4 positive block counts, the last >= 2 (its last block is the branches), '
                             f'got {tuple(layers)}')
        self.in_chans = in_chans
        self.grad_checkpointing = False
        stage = dict(block=block, cardinality=1, base_width=64, dd=dd)
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(64, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, c1 = _resnet_stage(64, 64, layers[0], 1, **stage)
        self.layer2, c2 = _resnet_stage(c1, 128, layers[1], 2, **stage)
        self.layer3, c3 = _resnet_stage(c2, 256, layers[2], 2, **stage)
        self.layer4, c4 = _resnet_stage(c3, 512, layers[3] - 1, 2, **stage)
        self.cb_block = block(c4, 512, **dd)
        self.rb_block = block(c4, 512, **dd)
        self.branch_features = c4
        self.stage_names, self.last_stage = ('layer1', 'layer2', 'layer3'), 'layer4'
        self.feature_info = [
            dict(num_chs=64, reduction=2, module='act1'), dict(num_chs=c1, reduction=4, module='layer1'),
            dict(num_chs=c2, reduction=8, module='layer2'), dict(num_chs=c3, reduction=16, module='layer3'),
            dict(num_chs=2 * c4, reduction=32, module='cb_block+rb_block')]
        self._init_head(num_classes, global_pool, drop_rate, dd)

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(x)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.forward_stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def bbn_checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a BBN checkpoint (``{'state_dict': ...}`` or its state dict) to the model's keys: ``module.`` and
    ``backbone.`` prefixes dropped, ``classifier.`` -> ``fc.`` (the rest are BBN's backbone keys already)."""
    if isinstance(state_dict, dict) and isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', 'backbone.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith('classifier.'):
            key = 'fc.' + key[len('classifier.'):]
        out[key] = value
    return out


def _create_bbn(variant: str, cls: Type[nn.Module], pretrained: bool = False, **kwargs) -> nn.Module:
    # features_only reads forward_intermediates (timm's 'getter'): the last map joins the two branches
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=bbn_checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=tuple(range(4 if cls is BBNResNetCifar else 5)),
                                                 feature_cls='getter'), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {'url': '', 'crop_pct': 1.0, 'interpolation': 'bilinear', 'first_conv': 'conv1', 'classifier': 'fc',
            **kwargs}


default_cfgs = generate_default_cfgs({
    'bbn_resnet32_cifar': _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), mean=CIFAR_MEAN,
                               std=CIFAR_STD),
    'bbn_resnet50': _cfg(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
})


@register_model
def bbn_resnet32_cifar(pretrained: bool = False, **kwargs) -> BBNResNetCifar:
    """BBN's ResNet-32 for CIFAR (``bbn_res32_cifar``): shared stem, stages 1-2 and 4 blocks of stage 3, the 5th
    block per branch; 128 features."""
    return _create_bbn('bbn_resnet32_cifar', BBNResNetCifar, pretrained, layers_per_stage=5, **kwargs)


@register_model
def bbn_resnet50(pretrained: bool = False, **kwargs) -> BBNResNet:
    """BBN's ResNet-50 (``bbn_res50``, iNaturalist): shared stem, stages 1-3 and 2 blocks of stage 4, the 3rd
    block per branch; 4096 features."""
    return _create_bbn('bbn_resnet50', BBNResNet, pretrained, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)
