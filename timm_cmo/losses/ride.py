"""RIDE's losses (Wang et al., ICLR 2021): the multi-expert training loss and the router (expert assignment) loss.

``ride`` (:class:`RIDELoss`) is RIDE's ``model/loss.py`` ``RIDELoss`` as its code runs it. For every expert ``e``
(logits ``z_e``, already scaled by the model's ``s``; ensemble ``z = mean_e z_e``)::

    L = sum_e [ base_loss_factor * LDAM(z_e / s, y; w)
                + additional_diversity_factor * mean(T)^2 * KL(softmax(z / T) || softmax(z_e / T)) ]

* LDAM: margins ``m_k ∝ n_k^(-1/4)`` (``max_m`` 0.5), scale ``s`` 30 (RIDE subtracts ``s * m_y`` from the
  already-scaled logit; dividing by ``s`` and using :class:`~timm_cmo.losses.long_tail.LDAMLoss` is the same);
  ``w``: none before the re-weighting epoch, the class-balanced (effective-number, beta 0.9999) weights from it on.
* Diversity: ``T = base_diversity_temperature`` (1) before the re-weighting epoch; from it on the per-class
  ``T_k = base * t_k`` with ``t = C * n_k / N * reweight_factor + 1 - reweight_factor`` divided by its max, and
  the factor uses the mean temperature squared. ``KL`` is ``F.kl_div(..., reduction='batchmean')`` with the
  ensemble side computed without gradient. A negative factor (RIDE's) rewards diversity.
* If ``additional_diversity_factor == 0``, RIDE's code puts the *ensemble* logits into every expert's LDAM term
  (E times the collaborative loss; see RIDE issue #7); ``zero_diversity_uses_ensemble=False`` keeps the
  individual losses instead.

The re-weighting epoch is ``drw_epoch`` (0-based): RIDE's ``reweight_epoch`` R switches with its 1-based epoch
``> R``, i.e. from 0-based epoch R (160 of 200 on CIFAR-100-LT, 80 of 100 on ImageNet-LT / iNat).

RIDE's settings (``configs/*.json`` of frank-xwang/RIDE-LongTailRecognition): see :data:`RIDE_LOSS_DEFAULTS`.

``ride_ea`` (:class:`RIDERouterLoss`) trains the router of a RIDE model (stage 2): binary cross-entropy with
``pos_weight`` on each decision, with the labels from the frozen experts (see the class).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cmo import MixInfo
from .long_tail import LDAMLoss, LongTailLoss
from .registry import register_loss
from .reweight import ClassCounts

__all__ = ['RIDELoss', 'RIDERouterLoss', 'RIDE_LOSS_DEFAULTS', 'ride_diversity_temperature', 'split_ride_output']

RIDE_LOSS_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'cifar100_lt': dict(additional_diversity_factor=-0.45, reweight_factor=0.05, drw_epoch=160),
    'imagenet_lt': dict(additional_diversity_factor=-0.2, reweight_factor=0.02, drw_epoch=80),
    'inat2018': dict(additional_diversity_factor=-0.2, reweight_factor=0.015, drw_epoch=80),
}
"""RIDE's loss settings per dataset (its ``configs/config_*_ride.json``; unset values are the class defaults
-0.2 / 0.05). RIDE has no CIFAR-10-LT setting. All use max_m 0.5, s 30, reweight on (DRW)."""

_NEEDS_EXPERTS = '--loss ride needs a multi-expert model (e.g. ride_resnet32_cifar)'
_EXPERT_TRAINING = ("turn on the model's multi-expert training output with model.set_expert_training(True) (RIDE "
                    "models; train_cmo.py does so for this loss)")

RIDEModelOutput = Union[torch.Tensor, Sequence[torch.Tensor], Dict[str, torch.Tensor]]


def ride_diversity_temperature(class_counts: ClassCounts, reweight_factor: float = 0.05) -> torch.Tensor:
    """RIDE's per-class diversity temperatures ``t`` (C,) float32, max 1.

    ``t_k = C * n_k / N * reweight_factor + 1 - reweight_factor``, divided by ``max_k t_k`` (float64 as RIDE's numpy).
    """
    counts = np.asarray(torch.as_tensor(class_counts, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
    prior = counts / counts.sum()
    t = len(counts) * prior * reweight_factor + 1 - reweight_factor
    t = t / t.max()
    if not np.all(t > 0):
        raise ValueError(f'reweight_factor {reweight_factor} is too large: some diversity temperatures are <= 0')
    return torch.tensor(t, dtype=torch.float32)


def split_ride_output(output: RIDEModelOutput) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logits (B, C), expert_logits (B, E, C), router_logits (B, E - 1) or None)`` from a RIDE model's output.

    Accepts the multi-expert training output ``(logits, expert_logits[, router_logits])`` (a RIDE model in train mode
    after ``model.set_expert_training(True)``), RIDE's dict (``output`` / ``logits`` (B, E, C), or ``expert_logits``)
    or a bare (B, E, C) tensor (the logits are then its mean over experts). A (B, C) tensor (the model's ordinary
    output) raises ``ValueError`` saying to switch the expert training output on.
    """
    router = None
    if isinstance(output, dict):
        experts = output.get('expert_logits', output.get('logits'))
        logits = output.get('output')
        router = output.get('router_logits')
    elif isinstance(output, (tuple, list)):
        if len(output) not in (2, 3):
            raise ValueError(f'{_NEEDS_EXPERTS}; got a {len(output)}-tuple, expected (logits, expert_logits[, router])')
        logits, experts = output[0], output[1]
        router = output[2] if len(output) == 3 else None
    elif isinstance(output, torch.Tensor):
        if output.ndim != 3:
            raise ValueError(f'{_NEEDS_EXPERTS}: got a single tensor of shape {tuple(output.shape)}, expected the '
                             f'multi-expert training output (logits (B, C), expert_logits (B, E, C)): '
                             f'{_EXPERT_TRAINING}')
        logits, experts = None, output
    else:
        raise ValueError(f'{_NEEDS_EXPERTS}: got {type(output).__name__}')
    if not isinstance(experts, torch.Tensor) or experts.ndim != 3:
        shape = tuple(experts.shape) if isinstance(experts, torch.Tensor) else type(experts).__name__
        raise ValueError(f'{_NEEDS_EXPERTS}: expert logits must have shape (B, E, C), got {shape}')
    if logits is None:
        logits = experts.mean(dim=1)
    if logits.shape != experts[:, 0].shape:
        raise ValueError(f'logits {tuple(logits.shape)} do not match expert logits {tuple(experts.shape)}')
    return logits, experts, router


@register_loss('ride')
class RIDELoss(LongTailLoss):
    """RIDE's loss: per-expert LDAM-DRW + distribution-aware diversity (module docstring).

    Call as ``loss(output, target, mix=None)``: ``output`` the model's multi-expert training output (train mode,
    ``model.set_expert_training(True)``; see :func:`split_ride_output`), ``target`` (B,) class indices or (B, C) soft
    targets, ``mix`` a :class:`~timm_cmo.data.cmo.MixInfo` for the per-term CMO form ``lam * L(y_b) + (1 - lam) *
    L(y_f)`` of each expert's LDAM term (the diversity term has no labels). Returns the scalar loss
    (``reduction='mean'`` only).

    Args:
        class_counts: (C,) training images per class.
        reweight: ``'drw'`` (RIDE: class-balanced LDAM weights and class-wise temperatures from ``drw_epoch``),
            ``'cb'`` (both from epoch 0), ``'none'`` (RIDE's ``reweight_epoch=-1``: no weights, T = base throughout;
            RIDE's own code does not run that way).
        drw_epoch: 0-based re-weighting epoch (RIDE's ``reweight_epoch``). Default ``int(0.8 * epochs)``.
        epochs: Total epochs, for the default ``drw_epoch``.
        cb_beta: Effective-number beta. Default 0.9999.
        max_m: Largest LDAM margin. Default 0.5.
        s: LDAM scale (the model's ``head_scale``). Default 30.
        base_diversity_temperature: Default 1.
        additional_diversity_factor: Diversity weight. Default -0.2 (RIDE's default; -0.45 on CIFAR-100-LT).
        reweight_factor: Temperature re-weighting strength. Default 0.05 (0.02 ImageNet-LT, 0.015 iNat).
        base_loss_factor: LDAM weight. Default 1.
        zero_diversity_uses_ensemble: RIDE's behaviour at factor 0 (module docstring). Default True.
        reduction: ``'mean'`` only.
        validate: Check target values (as :class:`LongTailLoss`).
    """
    needs_experts = True  # takes a multi-expert model's expert training output, never plain (B, C) logits

    def __init__(
            self,
            class_counts: ClassCounts,
            reweight: str = 'drw',
            drw_epoch: Optional[int] = None,
            epochs: Optional[int] = None,
            cb_beta: float = 0.9999,
            max_m: float = 0.5,
            s: float = 30.0,
            base_diversity_temperature: float = 1.0,
            additional_diversity_factor: float = -0.2,
            reweight_factor: float = 0.05,
            base_loss_factor: float = 1.0,
            zero_diversity_uses_ensemble: bool = True,
            reduction: str = 'mean',
            validate: bool = True,
    ):
        if reduction != 'mean':
            raise ValueError(f"RIDELoss supports reduction='mean' only, got {reduction!r}")
        super().__init__(
            class_counts, reweight=reweight, drw_epoch=drw_epoch, epochs=epochs, cb_beta=cb_beta,
            reduction=reduction, validate=validate)
        if not (np.isfinite(base_diversity_temperature) and base_diversity_temperature > 0):
            raise ValueError(f'base_diversity_temperature must be positive, got {base_diversity_temperature!r}')
        self.ldam = LDAMLoss(
            self.class_counts, max_m=max_m, s=s, reweight=reweight, drw_epoch=drw_epoch, epochs=epochs,
            cb_beta=cb_beta, validate=validate)
        self.s = float(s)
        self.base_diversity_temperature = float(base_diversity_temperature)
        self.additional_diversity_factor = float(additional_diversity_factor)
        self.reweight_factor = float(reweight_factor)
        self.base_loss_factor = float(base_loss_factor)
        self.zero_diversity_uses_ensemble = bool(zero_diversity_uses_ensemble)
        self.register_buffer('diversity_temperature', ride_diversity_temperature(self.class_counts, reweight_factor))
        self._mean_temperature = float(self.diversity_temperature.double().mean())  # no device sync per call
        self.register_buffer('graph_temperature', None, persistent=False)  # see make_graph_safe
        self.register_buffer('graph_temperature_sq', None, persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch: switches the LDAM weights and the diversity temperature at ``drw_epoch``."""
        super().set_epoch(epoch)
        self.ldam.set_epoch(epoch)

    @property
    def reweighting(self) -> bool:
        """Whether the re-weighting phase (class weights, class-wise temperature) is on at the current epoch."""
        return self.weights_in_force

    def make_graph_safe(self) -> 'RIDELoss':
        """:meth:`LongTailLoss.make_graph_safe`, and the diversity temperature of the current epoch as device buffers
        (``graph_temperature`` (1, C) and ``graph_temperature_sq``, the mean temperature squared) updated in place."""
        if self.graph_temperature is None:
            self.graph_temperature = torch.ones_like(self.diversity_temperature).unsqueeze(0)
            self.graph_temperature_sq = torch.ones((), dtype=torch.float32, device=self.diversity_temperature.device)
        self.ldam.make_graph_safe()
        super().make_graph_safe()
        return self

    def _update_graph_state(self) -> None:
        super()._update_graph_state()
        if self.graph_temperature is not None:
            t, t_mean = self.temperature()
            if isinstance(t, torch.Tensor):
                self.graph_temperature.copy_(t)
            else:
                self.graph_temperature.fill_(t)
            self.graph_temperature_sq.fill_(t_mean * t_mean)

    def temperature(self) -> Tuple[Union[float, torch.Tensor], float]:
        """``(T, mean T)``: the scalar base temperature, or the (1, C) class-wise one during re-weighting."""
        if not self.reweighting:
            return self.base_diversity_temperature, self.base_diversity_temperature
        base = self.base_diversity_temperature
        return base * self.diversity_temperature.unsqueeze(0), base * self._mean_temperature

    def normalizer(self, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None) -> torch.Tensor:
        """``(3,)``: the LDAM terms' two denominators (:meth:`LongTailLoss.normalizer`) and the batch size (the
        diversity term's batch mean); see :meth:`LongTailLoss.normalizer` for their use as ``norm=``."""
        ldam = self.ldam.normalizer(target, mix)
        y = (mix if mix is not None else target)
        size = (y.y_b if isinstance(y, MixInfo) else y).shape[0]
        return torch.cat([ldam, ldam.new_tensor([float(size)])])

    def diversity(self, logits: torch.Tensor, expert_logits: torch.Tensor,
                  batch_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_e mean(T)^2 * KL(softmax(logits / T) || softmax(z_e / T))`` (batch mean, or the batch sum over
        ``batch_norm``; no gradient through the ensemble side), unweighted by the factor. logits (B, C),
        expert_logits (B, E, C)."""
        if self.graph_safe:
            t, t_sq = self.graph_temperature, self.graph_temperature_sq
        else:
            t, t_mean = self.temperature()
            t_sq = t_mean * t_mean
        if isinstance(t, torch.Tensor):
            t = t.to(logits)
        with torch.no_grad():
            target = F.softmax(logits.detach() / t, dim=1)
        total = 0.
        for e in range(expert_logits.shape[1]):
            log_q = F.log_softmax(expert_logits[:, e] / t, dim=1)
            kl = F.kl_div(log_q, target, reduction='batchmean') if batch_norm is None else \
                F.kl_div(log_q, target, reduction='sum') / batch_norm.to(log_q)
            total = total + t_sq * kl
        return total

    def forward(self, output: RIDEModelOutput, target: Union[torch.Tensor, MixInfo],
                mix: Optional[MixInfo] = None, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits, experts, _ = split_ride_output(output)
        if experts.shape[2] != self.num_classes:
            raise ValueError(f'expert logits must have {self.num_classes} classes, got shape {tuple(experts.shape)}')
        dtype = torch.promote_types(experts.dtype, torch.float32)
        logits, experts = logits.to(dtype), experts.to(dtype)
        ensemble_base = self.additional_diversity_factor == 0 and self.zero_diversity_uses_ensemble
        loss = 0.
        for e in range(experts.shape[1]):
            base_logits = logits if ensemble_base else experts[:, e]
            loss = loss + self.base_loss_factor * self.ldam(base_logits / self.s, target, mix=mix,
                                                            norm=None if norm is None else norm[:2])
        if self.additional_diversity_factor != 0:
            loss = loss + self.additional_diversity_factor * self.diversity(
                logits, experts, None if norm is None else norm[2])
        return loss

    def extra_repr(self) -> str:
        return (f'max_m={self.ldam.max_m}, s={self.s}, additional_diversity_factor={self.additional_diversity_factor}, '
                f'reweight_factor={self.reweight_factor}, base_diversity_temperature='
                f'{self.base_diversity_temperature}, ' + super().extra_repr())


@register_loss('ride_ea')
class RIDERouterLoss(LongTailLoss):
    """RIDE's expert-assignment (router) loss for stage 2 (``ea_resnet_cifar.py`` / ``EAResNet.py``).

    With ``c_i`` whether the mean of experts ``0..i`` predicts the label (argmax), decision ``i`` (consult expert
    ``i + 1``?) has the label ``h_i = not c_i and any(c_{i+1}, ..., c_{E-1})`` (a later expert fixes the prediction)
    and the loss is ``mean_i BCEWithLogits(router_logits[:, i], h_i, pos_weight)`` (each a batch mean).

    Call as ``loss(output, target)`` with the multi-expert training output ``(logits, expert_logits, router_logits)``
    of a RIDE model with its router enabled, ``set_expert_training(True)`` and frozen experts (see
    ``timm_cmo.models.ride.freeze_for_router_training``),
    ``target`` (B,) class indices (a (B, C) soft target uses its argmax; mixed batches are refused).

    Args:
        class_counts: (C,) training images per class (only the class count is used).
        pos_weight: Weight of the positive ('consult the next expert') labels. Default 100 (all RIDE EA configs;
            RIDE's class default is 20). Lower values route fewer samples to more experts.
        reweight: must be ``'none'`` (RIDE's router loss has no class weights).
    """
    needs_experts = True

    def __init__(
            self,
            class_counts: ClassCounts,
            pos_weight: float = 100.0,
            reweight: str = 'none',
            drw_epoch: Optional[int] = None,
            epochs: Optional[int] = None,
            cb_beta: float = 0.9999,
            validate: bool = True,
    ):
        if reweight != 'none':
            raise ValueError(
                f"the ride_ea router loss has no class re-weighting; use reweight='none', got {reweight!r}")
        super().__init__(class_counts, reweight='none', cb_beta=cb_beta, validate=validate)
        if not (np.isfinite(pos_weight) and pos_weight > 0):
            raise ValueError(f'pos_weight must be positive, got {pos_weight!r}')
        self.pos_weight = float(pos_weight)

    @staticmethod
    def router_targets(expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, E, C), (B,) -> (B, E - 1) float labels ``h_i`` (class docstring)."""
        running = expert_logits.detach().cumsum(dim=1)
        correct = running.argmax(dim=2) == target.unsqueeze(1)  # (B, E): the mean of experts 0..i is right
        later = correct.flip(1).cummax(dim=1).values.flip(1)  # later[:, i]: any(correct[:, i:])
        return (~correct[:, :-1] & later[:, 1:]).to(expert_logits.dtype)

    def normalizer(self, target: Union[torch.Tensor, MixInfo], mix: Optional[MixInfo] = None) -> torch.Tensor:
        """``(1,)``: the batch size (every decision's loss is a batch mean); see :meth:`LongTailLoss.normalizer`."""
        y = target.y_b if isinstance(target, MixInfo) else target
        return torch.tensor([float(y.shape[0])], device=y.device)

    def forward(self, output: RIDEModelOutput, target: Union[torch.Tensor, MixInfo],
                mix: Optional[MixInfo] = None, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mix is not None or isinstance(target, MixInfo):
            raise ValueError('the ride_ea router loss needs plain labels: train the router without CMO / mixing')
        logits, experts, router = split_ride_output(output)
        if router is None:
            raise ValueError('the ride_ea loss needs router logits: enable the model\'s router (router=True or '
                             'model.enable_router()) and train it in train mode with model.set_expert_training(True)')
        if router.shape != (experts.shape[0], experts.shape[1] - 1):
            raise ValueError(f'router logits must have shape (B, E - 1) = {(experts.shape[0], experts.shape[1] - 1)}, '
                             f'got {tuple(router.shape)}')
        experts = self._check_logits(experts.flatten(0, 1)).unflatten(0, experts.shape[:2])
        target = self._check_target(target, experts[:, 0])
        if target.is_floating_point():
            target = target.argmax(dim=1)
        labels = self.router_targets(experts, target)
        router = router.to(experts.dtype)
        pos_weight = router.new_tensor([self.pos_weight])
        if norm is None:
            losses = [F.binary_cross_entropy_with_logits(router[:, i], labels[:, i], pos_weight=pos_weight)
                      for i in range(router.shape[1])]
        else:
            losses = [F.binary_cross_entropy_with_logits(router[:, i], labels[:, i], pos_weight=pos_weight,
                                                         reduction='sum') / norm[0].to(router)
                      for i in range(router.shape[1])]
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, pos_weight={self.pos_weight}'
