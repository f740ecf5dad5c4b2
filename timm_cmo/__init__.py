"""timm-cmo: Context-rich Minority Oversampling (CMO) for timm.

``import timm_cmo`` registers the plugin's models (CIFAR ResNets, the ``head_norm`` option of
timm's ResNets) with timm's model registry and its long-tail losses with :func:`create_loss`.
"""
from .version import __version__
from . import models  # noqa: F401  (registers models with timm)
from .losses import create_loss, list_losses, register_loss
from . import data  # noqa: F401
