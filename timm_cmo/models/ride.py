"""RIDE (Wang et al., ICLR 2021): ResNets with routed, diverse, distribution-aware experts, registered with timm.

A RIDE network shares its early layers and gives each of ``num_experts`` experts a private copy of the
later stages and its own classifier; the prediction is the mean of the experts' logits. An optional
expert-assignment module (the *router*, RIDE's stage 2) decides per sample whether to consult the next
expert, so that easy samples stop after fewer experts.

Architectures follow the RIDE code (``model/ldam_drw_resnets/ride_resnet_cifar.py``,
``model/fb_resnets/RIDEResNet.py`` / ``RIDEResNeXt.py``):

* CIFAR (``ride_resnet{20,32,44,56,110}_cifar``): shared 3x3 stem and stage 1 (16 channels); per
  expert stages 2 and 3 of 24 and 48 channels with ``reduce_dimension=True`` (RIDE's configs), 32 and
  64 without; ResNet-32 with 3 experts on CIFAR-100 has 783,856 parameters (0.78M).
* ImageNet (``ride_resnet10``, ``ride_resnet50``, ``ride_resnext50_32x4d``): shared stem, stages 1 and
  2; per expert stages 3 and 4 with ``planes`` 192 and 384 with ``reduce_dimension=True`` (256 and 512
  without), timm's ``BasicBlock`` / ``Bottleneck``.

Heads: with ``head_norm=True`` (RIDE's ``use_norm``, on in all RIDE configs) each expert has a cosine
``NormedLinear`` and the model multiplies its logits by ``head_scale`` (RIDE's ``s=30``, applied in the
model as RIDE does, so RIDE checkpoints give the same logits); plain ``nn.Linear`` heads are not scaled.

Outputs (``B`` batch, ``E`` experts, ``C`` classes), timm's contract of one logits tensor:

* ``forward``, train and eval mode: ``(B, C)``, the mean of the experts' logits (with a router: of the experts
  each sample uses; in eval mode only those are computed, :meth:`~_RIDEBase.forward_with_experts_used` also
  returns their number);
* the multi-expert training output, switched on with ``model.set_expert_training(True)`` (as timm's
  ``set_distilled_training``) and given in train mode only: ``(logits (B, C), expert_logits (B, E, C))``, plus
  ``router_logits (B, E - 1)`` when the router is enabled. The ``ride`` and ``ride_ea`` losses
  (:mod:`timm_cmo.losses.ride`, ``needs_experts``) take it; train_cmo.py switches it on for them.

timm's interfaces: ``pretrained_cfg['classifier']`` names every head (``('heads.0', 'heads.1', 'heads.2')``, the
model's own ``num_experts``), so ``num_classes`` changes at creation and head-dropping loads work;
``reset_classifier``; ``forward_intermediates`` / ``features_only=True`` (timm's ``'getter'`` feature class) give
the stem, the shared stages and the expert stages, an expert stage as the experts' maps concatenated on channels
(the layout of ``forward_features``); TorchScript and torch.fx (a traced graph routes densely, same logits).

Checkpoints: :func:`ride_checkpoint_filter_fn` maps RIDE's released state dicts (``backbone.layer2s.0.*``,
``backbone.linears.0.weight``, ``backbone.expert_help_pred_*``; ``module.`` prefixes) to this layout
(``experts.0.layer2.*``, ``heads.0.weight``, ``router.*``); it is the models' ``pretrained_filter_fn``.
"""
import inspect
import re
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # older torch
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._input import update_model_args
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from .head_norm import NormedLinear
from .resnet_cifar import CIFAR_MEAN, CIFAR_STD, BasicBlockCifar

__all__ = [
    'RIDEResNetCifar', 'RIDEResNet', 'RIDERouter', 'ride_checkpoint_filter_fn', 'ride_head_names',
    'freeze_for_router_training', 'router_parameters',
]

class RIDERouter(nn.Module):
    """RIDE's expert-assignment module: after expert ``i`` (0-based, ``i < E - 1``), predict whether expert ``i + 1``
    is worth consulting.

    Input of decision ``i``: the pooled final feature of expert ``i`` (L2-normalised, then ``hidden[i]``: Linear to
    ``hidden_dim`` + ReLU) and the ``top_k`` largest values of the mean logits of experts ``0..i``; both go,
    concatenated as ``[top_k values, hidden]``, through the shared ``fc`` (Linear to 1). The output is a logit:
    consult the next expert if ``sigmoid(logit) > threshold``. RIDE's ``expert_help_pred_hidden_fcs`` /
    ``expert_help_pred_fc``.

    Args:
        num_experts: Experts E (>= 2); there are E - 1 decisions.
        in_features: Per-expert pooled feature size.
        top_k: Number of top logits fed to ``fc`` (RIDE's ``top_choices_num``).
        hidden_dim: Hidden size. Default 16 (RIDE's).
        kaiming_init: ``kaiming_normal_`` on the weights (RIDE's CIFAR models); else PyTorch's Linear init (ImageNet).
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            top_k: int,
            hidden_dim: int = 16,
            kaiming_init: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_experts < 2:
            raise ValueError(f'a router needs num_experts >= 2, got {num_experts}')
        if top_k < 1:
            raise ValueError(f'router top_k must be >= 1, got {top_k}')
        self.num_experts = num_experts
        self.in_features = in_features
        self.top_k = top_k
        self.hidden_dim = hidden_dim
        self.hidden = nn.ModuleList([nn.Linear(in_features, hidden_dim, **dd) for _ in range(num_experts - 1)])
        self.fc = nn.Linear(hidden_dim + top_k, 1, **dd)
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight)

    def forward(self, features: torch.Tensor, mean_logits: torch.Tensor, index: int) -> torch.Tensor:
        """Decision ``index``: features (B, in_features) of expert ``index``, mean_logits (B, C) of experts
        ``0..index`` -> (B,) logits of 'consult expert index + 1'."""
        if index < 0 or index >= self.num_experts - 1:
            raise ValueError(f'router decision index must be in [0, {self.num_experts - 1}), got {index}')
        h = features
        for i, hidden in enumerate(self.hidden):  # iterated, not indexed: TorchScript indexes ModuleLists by constants
            if i == index:
                h = hidden(F.normalize(features, dim=1))
        h = F.relu(h)
        top = mean_logits.topk(self.top_k, dim=1).values
        return self.fc(torch.cat((top, h), dim=1)).squeeze(1)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, top_k={self.top_k}'


class _RIDEBase(nn.Module):
    """Shared layers + per-expert stages/heads + optional router; subclasses build the layers.

    Subclasses set ``experts`` (ModuleList of per-expert ``nn.Sequential`` stages named ``_expert_stages``),
    ``expert_features`` (channels of an expert's last stage), the shared stages named ``_shared_stages`` after a
    ``conv1`` / ``bn1`` / ``act1`` stem (and ``maxpool``, if any), implement :meth:`forward_shared`, then call
    :meth:`_init_head` and :meth:`_init_feature_info`.
    """
    _kaiming_linear = False  # RIDE's CIFAR models kaiming-init every Linear, its ImageNet models keep the default
    _default_top_k = 50
    _shared_stages = ()  # names of the shared stages after the stem
    _expert_stages = ()  # names of an expert's stages
    frozen_for_router = False

    def _init_head(
            self,
            num_classes: int,
            global_pool: str,
            drop_rate: float,
            head_norm: bool,
            head_scale: float,
            router: bool,
            router_top_k: Optional[int],
            router_hidden_dim: int,
            router_threshold: float,
            dd: Dict[str, Any],
    ) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head_norm = bool(head_norm)
        self.head_scale = float(head_scale)
        self.router_threshold = float(router_threshold)
        self.expert_training = False
        self.num_features = self.head_hidden_size = self.num_experts * self.expert_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.heads = self._make_heads(num_classes, dd)
        self.router = None
        self.frozen_for_router = False
        if router and num_classes > 0:  # without a classifier there is nothing to route (as reset_classifier(0))
            self.enable_router(router_top_k, router_hidden_dim)

    def _init_feature_info(
            self, stem: Tuple[int, int], shared: Sequence[Tuple[int, int]], expert: Sequence[Tuple[int, int]],
    ) -> None:
        """``feature_info`` from ``(channels, reduction)`` of the stem, each shared stage and each expert stage (of one
        expert: the feature map of an expert stage is the E experts' maps concatenated, E times the channels)."""
        info = [dict(num_chs=stem[0], reduction=stem[1], module='act1')]
        info += [dict(num_chs=c, reduction=r, module=n) for n, (c, r) in zip(self._shared_stages, shared)]
        info += [dict(num_chs=self.num_experts * c, reduction=r, module=f'experts.*.{n}')
                 for n, (c, r) in zip(self._expert_stages, expert)]
        self.feature_info = info

    @property
    def logit_scale(self) -> float:
        """Factor on the heads' outputs: ``head_scale`` for cosine heads, 1 for linear heads (RIDE's ``s``)."""
        return self.head_scale if self.head_norm else 1.

    def _make_heads(self, num_classes: int, dd: Dict[str, Any]) -> nn.ModuleList:
        heads = []
        for _ in range(self.num_experts):
            if num_classes <= 0:
                head = nn.Identity()
            elif self.head_norm:
                head = NormedLinear(self.expert_features, num_classes, **dd)
            else:
                head = nn.Linear(self.expert_features, num_classes, **dd)
                if self._kaiming_linear:
                    nn.init.kaiming_normal_(head.weight)
            heads.append(head)
        return nn.ModuleList(heads)

    # --- router ----------------------------------------------------------------------------------------------

    def enable_router(self, top_k: Optional[int] = None, hidden_dim: int = 16) -> RIDERouter:
        """Add a fresh :class:`RIDERouter` (stage 2) if there is none; returns the router.

        ``top_k`` defaults to RIDE's ``top_choices_num`` for the family (30 CIFAR / ResNet-10, 50 ResNet-50 /
        ResNeXt-50), capped at ``num_classes``. Recorded in the model args, so ``save_for_hf`` exports rebuild the
        router.
        """
        if self.router is not None:
            return self.router
        if self.num_experts < 2:
            raise ValueError(f'the router needs num_experts >= 2, this model has {self.num_experts}')
        if self.num_classes <= 0:
            raise ValueError('the router needs a classifier (num_classes > 0)')
        top_k = min(int(top_k or self._default_top_k), self.num_classes)
        self.router = RIDERouter(
            self.num_experts, self.expert_features, top_k, hidden_dim, kaiming_init=self._kaiming_linear,
            **get_device_dtype(self))
        self.router.train(self.training)
        update_model_args(self, router=True, router_top_k=top_k, router_hidden_dim=hidden_dim)
        return self.router

    def disable_router(self) -> None:
        """Remove the router (eval then averages all experts) and undo :func:`freeze_for_router_training`."""
        self.router = None
        self.frozen_for_router = False
        args = {k: v for k, v in getattr(self, '_model_args', {}).items()
                if k not in ('router_top_k', 'router_hidden_dim')}
        self._model_args = dict(args, router=False)

    def train(self, mode: bool = True) -> 'nn.Module':
        """As ``nn.Module.train``; after :func:`freeze_for_router_training` everything but the router stays in eval
        mode (frozen BatchNorm statistics, as RIDE's ``_hook_before_iter`` does)."""
        super().train(mode)
        if mode and self.frozen_for_router:
            for name, child in self.named_children():
                if name != 'router':
                    child.eval()
        return self

    # --- timm interface --------------------------------------------------------------------------------------

    @torch.jit.ignore
    def set_expert_training(self, enable: bool = True) -> None:
        """Switch the multi-expert training output on or off (off by default), as timm's ``set_distilled_training``.

        On, ``forward`` in train mode returns ``(logits (B, C), expert_logits (B, E, C))``, plus ``router_logits
        (B, E - 1)`` when the router is enabled: what the ``ride`` and ``ride_ea`` losses take (their
        ``needs_experts``). Off, and always in eval mode, it returns the (B, C) logits alone."""
        self.expert_training = bool(enable)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The experts' heads (a ``ModuleList``, ``'heads'``; ``pretrained_cfg['classifier']`` names each head)."""
        return 'heads' if name_only else self.heads

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New heads for ``num_classes`` (0: Identity; cosine heads when ``head_norm``). A router is rebuilt fresh
        (its input depends on the logits), or removed for ``num_classes=0``."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.heads = self._make_heads(num_classes, dd)
        self.global_pool.train(self.training)
        self.heads.train(self.training)
        if self.router is not None:
            top_k, hidden_dim, frozen = self.router.top_k, self.router.hidden_dim, self.frozen_for_router
            self.disable_router()
            if num_classes > 0:
                self.enable_router(top_k, hidden_dim)
                if frozen:
                    freeze_for_router_training(self)

    # --- feature extraction ----------------------------------------------------------------------------------

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps of the stem, the shared stages and the expert stages (``feature_info`` order), as timm's.

        The map of an expert stage is the experts' maps of that stage concatenated on channels, expert 0 first
        (E times one expert's channels): the layout of :meth:`forward_features`, whose output is the last one.
        Channels of different experts do not correspond (each expert learns its own), so they are not averaged.
        Returns ``(final map, intermediates)``, or the intermediates alone with ``intermediates_only`` (which, like
        ``stop_early``, stops after the last map asked for).
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = max_index if stop_early or intermediates_only else len(self.feature_info) - 1
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        index = 0
        for name in self._shared_stages:
            if index >= last:
                break
            if index == 0 and hasattr(self, 'maxpool'):
                x = self.maxpool(x)
            index += 1
            x = self._run_stage(getattr(self, name), x)
            if index in take_indices:
                intermediates.append(x)
        maps = [x] * self.num_experts
        for name in self._expert_stages:
            if index >= last:
                break
            index += 1
            maps = [self._run_stage(getattr(expert, name), m) for expert, m in zip(self.experts, maps)]
            x = torch.cat(maps, dim=1)
            if index in take_indices:
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
        """Replace the stages after the last wanted intermediate by ``Identity`` (in every expert) and, if
        ``prune_head`` or stages went, the heads (``reset_classifier(0, '')``). Returns the intermediates' indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = [(n, False) for n in self._shared_stages] + [(n, True) for n in self._expert_stages]
        pruned = stages[max_index:]  # stage j gives feature j + 1
        for name, per_expert in pruned:
            for owner in (self.experts if per_expert else [self]):
                setattr(owner, name, nn.Identity())
        if pruned:  # forward_features now ends at feature max_index (a shared map: each expert passes it on)
            chs = self.feature_info[max_index]['num_chs']
            self.expert_features = chs // self.num_experts if max_index > len(self._shared_stages) else chs
            self.num_features = self.head_hidden_size = self.num_experts * self.expert_features
        if prune_head or pruned:
            self.reset_classifier(0, '')
        return take_indices

    # --- forward ---------------------------------------------------------------------------------------------

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and shared stages: (B, in_chans, H, W) -> shared feature map."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the experts' final maps concatenated on channels, (B, E * expert_features, h, w)."""
        x = self.forward_shared(x)
        maps = []
        for expert in self.experts:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                maps.append(checkpoint_seq(expert, x))
            else:
                maps.append(expert(x))
        return torch.cat(maps, dim=1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x

    def _scale(self, logits: torch.Tensor) -> torch.Tensor:
        """A head's output times :attr:`logit_scale` (RIDE's ``s`` for cosine heads)."""
        scale = self.logit_scale
        return logits * scale if scale != 1. else logits

    def _expert_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, E, expert_features) pooled features -> (B, E, C) scaled logits of every expert."""
        return torch.stack([self._scale(head(features[:, i])) for i, head in enumerate(self.heads)], dim=1)

    def _router_logits(self, features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """(B, E, F), (B, E, C) -> (B, E - 1) router logits. Inputs are detached: routing never trains the experts."""
        features, expert_logits = features.detach(), expert_logits.detach()
        running = expert_logits.cumsum(dim=1)
        return torch.stack([
            self.router(features[:, i], running[:, i] / (i + 1), i) for i in range(self.num_experts - 1)], dim=1)

    def _route_dense(
            self, features: torch.Tensor, expert_logits: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Routing on all experts' outputs, (B, E, F), (B, E, C) -> (logits (B, C), experts_used (B,) int64).

        Same result as the sequential routing of :meth:`forward_with_experts_used` (which skips the work)."""
        total = expert_logits[:, 0]
        used = torch.ones_like(total[:, 0], dtype=torch.long)
        active = torch.ones_like(used, dtype=torch.bool)
        for i in range(1, self.num_experts):
            go = torch.sigmoid(self.router(features[:, i - 1], total / used.unsqueeze(1).to(total), i - 1))
            active = active & (go > self.router_threshold)
            total = total + expert_logits[:, i] * active.unsqueeze(1).to(total)
            used = used + active.long()
        return total / used.unsqueeze(1).to(total), used

    @torch.jit.ignore
    def _expert_training_output(self, features: torch.Tensor, expert_logits: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits = expert_logits.mean(dim=1)
        if self.router is not None:
            return logits, expert_logits, self._router_logits(features, expert_logits)
        return logits, expert_logits

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, E * expert_features, h, w) from :meth:`forward_features` -> (B, C) logits: the experts' mean, routed
        (densely: every expert computed) with the router. In train mode with :meth:`set_expert_training` on, the
        tuple ``(logits, expert_logits (B, E, C)[, router_logits (B, E - 1)])`` instead.

        ``pre_logits``: the pooled features (B, E * expert_features), the experts' in order. With ``num_classes=0``
        that is also the output."""
        x = self._pool(x)
        if pre_logits or self.num_classes <= 0:
            return x
        features = x.unflatten(1, (self.num_experts, self.expert_features))
        expert_logits = self._expert_logits(features)
        if self.expert_training and self.training and not torch.jit.is_scripting():
            return self._expert_training_output(features, expert_logits)
        if self.router is not None:
            return self._route_dense(features, expert_logits)[0]
        return expert_logits.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C) logits, in train and eval mode (:meth:`forward_head`); in eval mode with the
        router, computing only the experts each sample uses (:meth:`forward_with_experts_used`; dense under torch.fx
        tracing, same logits). The multi-expert training output: :meth:`set_expert_training`."""
        if not self.training and self.router is not None and self.num_classes > 0:
            sparse = True
            if not torch.jit.is_scripting():
                sparse = not is_fx_symbolic_tracing()  # a traced graph cannot hold the data-dependent routing
            if sparse:
                return self.forward_with_experts_used(x)[0]
        return self.forward_head(self.forward_features(x))

    def forward_with_experts_used(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """RIDE's routed inference: (B, in_chans, H, W) -> (logits (B, C), experts_used (B,) int64).

        Expert 0 sees every sample; after expert ``i`` the router decides, from expert ``i``'s features and the mean
        logits so far, which samples go on to expert ``i + 1`` (``sigmoid > router_threshold``, 0.5); a sample that
        stops is never reconsidered. ``logits`` is the mean over the experts each sample used, ``experts_used`` their
        number (1..E). Only the used experts are computed. Without a router every sample uses all E experts. Meant for
        eval mode (in train mode BatchNorm would see the sub-batches)."""
        if self.num_classes <= 0:
            raise ValueError('forward_with_experts_used needs a classifier (num_classes > 0)')
        shared = self.forward_shared(x)
        batch = shared.shape[0]
        index = torch.arange(batch, device=shared.device)
        used = torch.ones(batch, dtype=torch.long, device=shared.device)
        features = shared.new_empty(0)
        total = shared.new_empty(0)
        for i, (expert, head) in enumerate(zip(self.experts, self.heads)):
            if i > 0 and self.router is not None and index.numel() > 0:
                mean = total.index_select(0, index) / i
                go = torch.sigmoid(self.router(features, mean, i - 1)) > self.router_threshold
                index = index[go]
            if i == 0 or index.numel() > 0:
                sub = shared if i == 0 else shared.index_select(0, index)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    features = self._pool(checkpoint_seq(expert, sub))
                else:
                    features = self._pool(expert(sub))
                logits = self._scale(head(features))
                if i == 0:
                    total = logits
                else:
                    total = total.index_add(0, index, logits)
                    used = used.index_add(0, index, torch.ones_like(index))
        return total / used.unsqueeze(1).to(total), used


class RIDEResNetCifar(_RIDEBase):
    """RIDE CIFAR ResNet (depth 6n + 2): shared stem + stage 1, per-expert stages 2-3 and heads.

    Args:
        layers_per_stage: Basic blocks per stage n (5: ResNet-32). Default 5.
        num_experts: Experts E >= 1. Default 3.
        num_classes: Classes; 0 for no heads. Default 10.
        in_chans: Input channels. Default 3.
        reduce_dimension: Expert widths (24, 48) instead of (32, 64) (RIDE's configs). Default True.
        expert_widths: Explicit (stage 2, stage 3) widths, overriding ``reduce_dimension``.
        global_pool: timm pool type. Default 'avg'.
        drop_rate: Dropout on the pooled features. Default 0.
        head_norm: Cosine-normalised heads (RIDE's ``use_norm``). Default True.
        head_scale: Logit scale of cosine heads (RIDE's ``s``). Default 30.
        router: Build the expert-assignment router (none with ``num_classes=0``). Default False.
        router_top_k: Router's top logits (RIDE's ``top_choices_num``). Default 30 (capped at num_classes).
        router_hidden_dim: Router's hidden size. Default 16.
        router_threshold: Consult the next expert when ``sigmoid(router) >`` this. Default 0.5.

    Shapes: input (B, in_chans, H, W); ``forward_features`` -> (B, E * w3, H/4, W/4) (``w3`` = 48 reduced, else 64);
    ``forward`` -> (B, num_classes) (the multi-expert tuple with :meth:`set_expert_training`, module docstring).
    Features (``feature_info``, ``features_only=True``): the stem (act1, 16 channels, stride 1), layer1 (16, 1), then
    the experts' layer2 (E * w2, 2) and layer3 (E * w3, 4) maps concatenated.
    State-dict keys: ``conv1``, ``bn1``, ``layer1.*``, ``experts.{i}.layer2.*``, ``experts.{i}.layer3.*``,
    ``heads.{i}.*``, ``router.hidden.{i}.*``, ``router.fc.*``.
    """
    _kaiming_linear = True
    _default_top_k = 30
    _shared_stages = ('layer1',)
    _expert_stages = ('layer2', 'layer3')

    def __init__(
            self,
            layers_per_stage: int = 5,
            num_experts: int = 3,
            num_classes: int = 10,
            in_chans: int = 3,
            reduce_dimension: bool = True,
            expert_widths: Optional[Sequence[int]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_norm: bool = True,
            head_scale: float = 30.,
            router: bool = False,
            router_top_k: Optional[int] = None,
            router_hidden_dim: int = 16,
            router_threshold: float = 0.5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if layers_per_stage < 1:
            raise ValueError(f'layers_per_stage must be >= 1, got {layers_per_stage}')
        _check_num_experts(num_experts)
        self.layers_per_stage = layers_per_stage
        self.num_experts = num_experts
        self.in_chans = in_chans
        self.reduce_dimension = bool(reduce_dimension)
        self.grad_checkpointing = False
        widths = _expert_widths(expert_widths, (24, 48) if reduce_dimension else (32, 64))

        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(16, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _cifar_stage(16, 16, layers_per_stage, 1, dd)
        self.experts = nn.ModuleList([
            nn.Sequential(OrderedDict([
                ('layer2', _cifar_stage(16, widths[0], layers_per_stage, 2, dd)),
                ('layer3', _cifar_stage(widths[0], widths[1], layers_per_stage, 2, dd)),
            ])) for _ in range(num_experts)])
        self.expert_features = widths[1]
        self._init_head(
            num_classes, global_pool, drop_rate, head_norm, head_scale, router, router_top_k, router_hidden_dim,
            router_threshold, dd)
        self._init_feature_info((16, 1), [(16, 1)], [(widths[0], 2), (widths[1], 4)])
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """RIDE / LDAM init: ``kaiming_normal_`` on every Conv2d and Linear weight (NormedLinear keeps its own)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1',
            blocks=[(r'^layer(\d+)', None), (r'^experts\.\d+\.layer(\d+)', None)] if coarse else
            [(r'^layer(\d+)\.(\d+)', None), (r'^experts\.\d+\.layer(\d+)\.(\d+)', None)],
        )

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.layer1, x)
        return self.layer1(x)


class RIDEResNet(_RIDEBase):
    """RIDE ImageNet ResNet / ResNeXt: shared stem + stages 1-2, per-expert stages 3-4 and heads.

    Args:
        block: timm ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        num_experts: Experts E >= 1. Default 3.
        num_classes: Classes; 0 for no heads. Default 1000.
        in_chans: Input channels. Default 3.
        cardinality, base_width: ResNeXt groups / width per group. Default 1, 64.
        reduce_dimension: Expert stage ``planes`` (192, 384) instead of (256, 512) (RIDE's configs). Default True.
        expert_widths: Explicit (stage 3, stage 4) ``planes``, overriding ``reduce_dimension``.
        global_pool, drop_rate, head_norm, head_scale, router, router_top_k, router_hidden_dim, router_threshold: as
            :class:`RIDEResNetCifar` (``router_top_k`` default 50, RIDE's ResNet-50 / ResNeXt-50 / iNat setting).

    Shapes: input (B, in_chans, H, W); ``forward_features`` -> (B, E * 4 * 384, H/32, W/32) for a reduced ResNet-50;
    ``forward`` -> (B, num_classes) (the multi-expert tuple with :meth:`set_expert_training`). Features
    (``feature_info``, ``features_only=True``): the stem (act1, stride 2), layer1 (4), layer2 (8), then the experts'
    layer3 (16) and layer4 (32) maps concatenated.
    State-dict keys: ``conv1``, ``bn1``, ``layer1.*``, ``layer2.*``, ``experts.{i}.layer3.*``, ``experts.{i}.layer4.*``,
    ``heads.{i}.*``, ``router.*``; blocks as timm's (``conv1..3``, ``bn1..3``, ``downsample.0/1``).
    """
    _shared_stages = ('layer1', 'layer2')
    _expert_stages = ('layer3', 'layer4')

    def __init__(
            self,
            block: Type[nn.Module] = Bottleneck,
            layers: Sequence[int] = (3, 4, 6, 3),
            num_experts: int = 3,
            num_classes: int = 1000,
            in_chans: int = 3,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_dimension: bool = True,
            expert_widths: Optional[Sequence[int]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_norm: bool = True,
            head_scale: float = 30.,
            router: bool = False,
            router_top_k: Optional[int] = None,
            router_hidden_dim: int = 16,
            router_threshold: float = 0.5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f'layers must be 4 positive block counts, got {tuple(layers)}')
        _check_num_experts(num_experts)
        self.num_experts = num_experts
        self.in_chans = in_chans
        self.reduce_dimension = bool(reduce_dimension)
        self.grad_checkpointing = False
        widths = _expert_widths(expert_widths, (192, 384) if reduce_dimension else (256, 512))
        stage = dict(block=block, cardinality=cardinality, base_width=base_width, dd=dd)

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(64, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, chs1 = _resnet_stage(64, 64, layers[0], 1, **stage)
        self.layer2, chs = _resnet_stage(chs1, 128, layers[1], 2, **stage)
        experts = []
        for _ in range(num_experts):
            layer3, chs3 = _resnet_stage(chs, widths[0], layers[2], 2, **stage)
            layer4, chs4 = _resnet_stage(chs3, widths[1], layers[3], 2, **stage)
            experts.append(nn.Sequential(OrderedDict([('layer3', layer3), ('layer4', layer4)])))
        self.experts = nn.ModuleList(experts)
        self.expert_features = chs4
        self.init_weights()  # before the heads, as RIDE (Linear / NormedLinear heads keep their own init)
        self._init_head(
            num_classes, global_pool, drop_rate, head_norm, head_scale, router, router_top_k, router_hidden_dim,
            router_threshold, dd)
        self._init_feature_info((64, 2), [(chs1, 4), (chs, 8)], [(chs3, 16), (chs4, 32)])

    @torch.jit.ignore
    def init_weights(self) -> None:
        """RIDE / classifier-balancing init: conv ``normal(0, sqrt(2 / (k * k * out_channels)))``, BN (1, 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1',
            blocks=[(r'^layer(\d+)', None), (r'^experts\.\d+\.layer(\d+)', None)] if coarse else
            [(r'^layer(\d+)\.(\d+)', None), (r'^experts\.\d+\.layer(\d+)\.(\d+)', None)],
        )

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2], x, flatten=True)
        return self.layer2(self.layer1(x))


def _check_num_experts(num_experts: int) -> None:
    if isinstance(num_experts, bool) or int(num_experts) != num_experts or num_experts < 1:
        raise ValueError(f'num_experts must be an integer >= 1, got {num_experts!r}')


def _expert_widths(widths: Optional[Sequence[int]], default: Tuple[int, int]) -> Tuple[int, int]:
    if widths is None:
        return default
    widths = tuple(int(w) for w in widths)
    if len(widths) != 2 or min(widths) < 1:
        raise ValueError(f'expert_widths must be two positive widths, got {widths}')
    return widths


def _cifar_stage(in_chs: int, out_chs: int, n: int, stride: int, dd: Dict[str, Any]) -> nn.Sequential:
    return nn.Sequential(*[
        BasicBlockCifar(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1, **dd) for j in range(n)])


def _resnet_stage(
        in_chs: int, planes: int, n: int, stride: int, block: Type[nn.Module], cardinality: int, base_width: int,
        dd: Dict[str, Any],
) -> Tuple[nn.Sequential, int]:
    out_chs = planes * block.expansion
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = downsample_conv(in_chs, out_chs, 1, stride=stride, **dd)
    kw = dict(cardinality=cardinality, base_width=base_width, **dd)
    blocks = [block(in_chs, planes, stride, downsample, **kw)]
    blocks += [block(out_chs, planes, **kw) for _ in range(1, n)]
    return nn.Sequential(*blocks), out_chs


# --- router training --------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(getattr(model, 'module', None), _RIDEBase) else model


def router_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The router's parameters (for the stage-2 optimizer); ``model`` may be DDP-wrapped."""
    model = _unwrap(model)
    if getattr(model, 'router', None) is None:
        raise ValueError('the model has no router: build it with router=True or call model.enable_router()')
    return list(model.router.parameters())


def freeze_for_router_training(model: nn.Module, freeze: bool = True) -> nn.Module:
    """RIDE stage 2: train only the router.

    Sets ``requires_grad`` False on every parameter but the router's (True on those) and keeps all other modules in
    eval mode while the model trains (BatchNorm running statistics frozen, as RIDE). ``freeze=False`` undoes it
    (all parameters trainable). Call before wrapping in DistributedDataParallel. Returns ``model``.
    """
    model = _unwrap(model)
    if not isinstance(model, _RIDEBase):
        raise TypeError(f'freeze_for_router_training needs a RIDE model, got {type(model).__name__}')
    if freeze and model.router is None:
        raise ValueError('the model has no router: build it with router=True or call model.enable_router()')
    for name, param in model.named_parameters():
        param.requires_grad_(not freeze or name.startswith('router.'))
    model.frozen_for_router = bool(freeze)
    model.train(model.training)
    return model


# --- checkpoints -------------------------------------------------------------------------------------------------

_RIDE_RENAMES = (
    (re.compile(r'^layer(\d)s\.(\d+)\.'), r'experts.\2.layer\1.'),
    (re.compile(r'^linears\.(\d+)\.'), r'heads.\1.'),
    (re.compile(r'^expert_help_pred_hidden_fcs\.(\d+)\.'), r'router.hidden.\1.'),
    (re.compile(r'^expert_help_pred_fc\.'), 'router.fc.'),
)


def ride_checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module, lenient: bool = True) -> Dict[str, torch.Tensor]:
    """Map a RIDE checkpoint (or this model's own state dict) to ``model``'s keys.

    With ``lenient=False`` only the renaming below is done (a strict load then reports every difference);
    the default (timm's pretrained loading) also adapts routers and heads as listed.

    Accepts RIDE's saved checkpoint dict (``{'state_dict': ..., ...}``) or its state dict, with ``module.``
    (DataParallel) and ``backbone.`` prefixes. Renames ``layer{2,3,4}s.{i}.`` -> ``experts.{i}.layer{2,3,4}.``,
    ``linears.{i}.`` -> ``heads.{i}.``, ``expert_help_pred_hidden_fcs.{i}.`` -> ``router.hidden.{i}.``,
    ``expert_help_pred_fc.`` -> ``router.fc.``. Then:

    * router weights and a model without a router: dropped with a warning (build with ``router=True`` to keep them);
      a model with a router and a checkpoint without (stage 1): the model's fresh router is kept;
    * heads whose shape differs from the model's (another class count): the model's fresh heads (and router, whose
      input is their logits) are kept, with a warning.

    Raises ``ValueError`` for RIDE layouts this model cannot hold (``share_layer3``, unshared router fcs, a router with
    another ``top_k``).
    """
    if isinstance(state_dict, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
    model_sd = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ('module.', 'backbone.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        for pattern, repl in _RIDE_RENAMES:
            key = pattern.sub(repl, key)
        if key.startswith('expert_help_pred_fcs.'):
            raise ValueError('RIDE routers with unshared final fcs (share_expert_help_pred_fc=False) are not supported')
        if isinstance(model, RIDEResNet) and key.startswith(('layer3.', 'layer4.')):
            raise ValueError(f'RIDE checkpoint with shared {key.split(".")[0]} (share_layer3) is not supported')
        out[key] = value

    if not lenient:
        return out
    has_router = getattr(model, 'router', None) is not None
    ckpt_router = [k for k in out if k.startswith('router.')]
    mismatched = [k for k in out if k.startswith('heads.') and k in model_sd and out[k].shape != model_sd[k].shape]
    if ckpt_router and not has_router:
        warnings.warn('The checkpoint has expert-assignment (router) weights but the model has no router; dropping '
                      'them. Build the model with router=True to keep them.', stacklevel=2)
        out = {k: v for k, v in out.items() if not k.startswith('router.')}
    elif has_router and (not ckpt_router or mismatched):  # stage 1, or new heads (the router reads their logits)
        out = {k: v for k, v in out.items() if not k.startswith('router.')}
        out.update({k: v for k, v in model_sd.items() if k.startswith('router.')})
    elif has_router and out['router.fc.weight'].shape != model_sd['router.fc.weight'].shape:
        k = out['router.fc.weight'].shape[1] - model.router.hidden_dim
        raise ValueError(f'the checkpoint router takes the top {k} logits, the model {model.router.top_k}: '
                         f'build it with router_top_k={k}')

    if mismatched:
        warnings.warn(f'Checkpoint heads do not match the model ({tuple(out[mismatched[0]].shape)} vs '
                      f'{tuple(model_sd[mismatched[0]].shape)}); keeping the model\'s new heads'
                      f'{" and router" if has_router else ""}.', stacklevel=2)
        for k in [k for k in out if k.startswith('heads.')]:
            del out[k]
        out.update({k: v for k, v in model_sd.items() if k.startswith('heads.')})
    return out


# --- registration -----------------------------------------------------------------------------------------------

def ride_head_names(num_experts: int) -> Tuple[str, ...]:
    """The experts' classifier names, ``('heads.0', ..., 'heads.{E-1}')``: a RIDE model's
    ``pretrained_cfg['classifier']`` (timm's multi-head form), so that timm's loaders drop every head when the class
    count changes."""
    return tuple(f'heads.{i}' for i in range(num_experts))


def _create_ride(variant: str, cls: Type[_RIDEBase], pretrained: bool = False, **kwargs) -> _RIDEBase:
    feature_cls = kwargs.get('feature_cls', 'getter')
    if kwargs.get('features_only') and feature_cls != 'getter' and not (
            isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)):
        raise ValueError(
            f"{variant}: features_only needs feature_cls='getter' (forward_intermediates), got {feature_cls!r}: the "
            f"experts' stages run side by side, which module hooks and traced graphs cannot concatenate")
    num_maps = 1 + len(cls._shared_stages) + len(cls._expert_stages)  # features_only: every map by default
    # the registered cfgs name the default 3 experts' heads; a model with others names its own, in the cfg that
    # loads its weights (a class count change then drops every head) and in the one it records (and exports)
    num_experts = kwargs.get('num_experts', inspect.signature(cls).parameters['num_experts'].default)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if isinstance(num_experts, int):  # else the model refuses it
        overlay.setdefault('classifier', ride_head_names(num_experts))
    return build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=ride_checkpoint_filter_fn, pretrained_cfg_overlay=overlay,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_maps))), **kwargs)


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
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
        'classifier': ride_head_names(3),
        **kwargs,
    }


def _imagenet_cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1',
        'classifier': ride_head_names(3),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ride_resnet20_cifar': _cifar_cfg(),
    'ride_resnet32_cifar': _cifar_cfg(),
    'ride_resnet44_cifar': _cifar_cfg(),
    'ride_resnet56_cifar': _cifar_cfg(),
    'ride_resnet110_cifar': _cifar_cfg(),
    'ride_resnet10': _imagenet_cfg(),
    'ride_resnet50': _imagenet_cfg(),
    'ride_resnext50_32x4d': _imagenet_cfg(),
})


@register_model
def ride_resnet20_cifar(pretrained: bool = False, **kwargs) -> RIDEResNetCifar:
    """RIDE ResNet-20 for CIFAR (3 blocks per stage), 3 experts by default."""
    return _create_ride('ride_resnet20_cifar', RIDEResNetCifar, pretrained, layers_per_stage=3, **kwargs)


@register_model
def ride_resnet32_cifar(pretrained: bool = False, **kwargs) -> RIDEResNetCifar:
    """RIDE ResNet-32 for CIFAR (5 blocks per stage), RIDE's CIFAR-100-LT model: 3 experts, 0.78M params (100 cls)."""
    return _create_ride('ride_resnet32_cifar', RIDEResNetCifar, pretrained, layers_per_stage=5, **kwargs)


@register_model
def ride_resnet44_cifar(pretrained: bool = False, **kwargs) -> RIDEResNetCifar:
    """RIDE ResNet-44 for CIFAR (7 blocks per stage), 3 experts by default."""
    return _create_ride('ride_resnet44_cifar', RIDEResNetCifar, pretrained, layers_per_stage=7, **kwargs)


@register_model
def ride_resnet56_cifar(pretrained: bool = False, **kwargs) -> RIDEResNetCifar:
    """RIDE ResNet-56 for CIFAR (9 blocks per stage), 3 experts by default."""
    return _create_ride('ride_resnet56_cifar', RIDEResNetCifar, pretrained, layers_per_stage=9, **kwargs)


@register_model
def ride_resnet110_cifar(pretrained: bool = False, **kwargs) -> RIDEResNetCifar:
    """RIDE ResNet-110 for CIFAR (18 blocks per stage), 3 experts by default."""
    return _create_ride('ride_resnet110_cifar', RIDEResNetCifar, pretrained, layers_per_stage=18, **kwargs)


@register_model
def ride_resnet10(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-10 (basic blocks, 1 per stage), RIDE's small ImageNet-LT model; router top_k 30 as its config."""
    kwargs.setdefault('router_top_k', 30)
    return _create_ride('ride_resnet10', RIDEResNet, pretrained, block=BasicBlock, layers=(1, 1, 1, 1), **kwargs)


@register_model
def ride_resnet50(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-50 (ImageNet-LT, iNaturalist 2018): shared stem + stages 1-2, 3 experts of stages 3-4."""
    return _create_ride('ride_resnet50', RIDEResNet, pretrained, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


@register_model
def ride_resnext50_32x4d(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNeXt-50 32x4d (ImageNet-LT), experts as :func:`ride_resnet50`."""
    return _create_ride(
        'ride_resnext50_32x4d', RIDEResNet, pretrained, block=Bottleneck, layers=(3, 4, 6, 3), cardinality=32,
        base_width=4, **kwargs)
