"""Long-tail losses (CE, LDAM, Balanced Softmax, focal, logit adjustment, LAS, RIDE, LADE, IB, BBN) with CB / DRW
re-weighting.

``create_loss(name, class_counts, reweight='none', drw_epoch=None, epochs=None, cb_beta=0.9999,
**loss_kwargs)`` builds a registered loss called as ``loss(logits, target)``; see
:mod:`timm_cmo.losses.long_tail` for targets and normalisation. Losses with ``needs_features = True``
(``ib``, ``ib_focal``) also take ``features=`` (see :func:`timm_cmo.models.logits_and_features`);
:mod:`~timm_cmo.losses.prior` moves logits between label priors (LADE's test-time correction).
"""
from .registry import create_loss, is_loss, list_losses, register_loss
from .reweight import REWEIGHT_CHOICES, class_balanced_weights, resolve_drw_epoch
from .long_tail import (
    BalancedSoftmaxLoss, CrossEntropyLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss, LongTailLoss,
    ldam_margins, reduce_hard, reduce_soft)
from .las import LAS_DEFAULTS, LabelAwareSmoothingLoss, las_smoothing
from .ride import RIDE_LOSS_DEFAULTS, RIDELoss, RIDERouterLoss
from .lade import LADE_DEFAULTS, LADELoss, lade_regularizer
from .ib import IBFocalLoss, IBLoss, ib_class_weights, influence_factor
from .prior import prior_corrected_logits
from .bbn import BBNLoss, bbn_alpha

__all__ = [
    'create_loss', 'is_loss', 'list_losses', 'register_loss',
    'REWEIGHT_CHOICES', 'class_balanced_weights', 'resolve_drw_epoch',
    'LongTailLoss', 'CrossEntropyLoss', 'LDAMLoss', 'BalancedSoftmaxLoss', 'FocalLoss',
    'LogitAdjustedLoss', 'ldam_margins', 'reduce_hard', 'reduce_soft',
    'LabelAwareSmoothingLoss', 'las_smoothing', 'LAS_DEFAULTS', 'RIDELoss', 'RIDERouterLoss', 'RIDE_LOSS_DEFAULTS',
    'LADELoss', 'LADE_DEFAULTS', 'lade_regularizer', 'IBLoss', 'IBFocalLoss', 'ib_class_weights', 'influence_factor',
    'prior_corrected_logits',
    'BBNLoss', 'bbn_alpha',
]
