"""Long-tail losses (CE, LDAM, Balanced Softmax, focal, logit adjustment, LAS, RIDE, BBN) with CB / DRW re-weighting.

``create_loss(name, class_counts, reweight='none', drw_epoch=None, epochs=None, cb_beta=0.9999,
**loss_kwargs)`` builds a registered loss called as ``loss(logits, target)``; see
:mod:`timm_cmo.losses.long_tail` for targets and normalisation.
"""
from .registry import create_loss, is_loss, list_losses, register_loss
from .reweight import REWEIGHT_CHOICES, class_balanced_weights, resolve_drw_epoch
from .long_tail import (
    BalancedSoftmaxLoss, CrossEntropyLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss, LongTailLoss,
    ldam_margins, reduce_hard, reduce_soft)
from .las import LAS_DEFAULTS, LabelAwareSmoothingLoss, las_smoothing
from .ride import RIDE_LOSS_DEFAULTS, RIDELoss, RIDERouterLoss
from .bbn import BBNLoss, bbn_alpha

__all__ = [
    'create_loss', 'is_loss', 'list_losses', 'register_loss',
    'REWEIGHT_CHOICES', 'class_balanced_weights', 'resolve_drw_epoch',
    'LongTailLoss', 'CrossEntropyLoss', 'LDAMLoss', 'BalancedSoftmaxLoss', 'FocalLoss',
    'LogitAdjustedLoss', 'ldam_margins', 'reduce_hard', 'reduce_soft',
    'LabelAwareSmoothingLoss', 'las_smoothing', 'LAS_DEFAULTS', 'RIDELoss', 'RIDERouterLoss', 'RIDE_LOSS_DEFAULTS',
    'BBNLoss', 'bbn_alpha',
]
