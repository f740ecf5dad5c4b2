"""A small loss registry in the style of timm's model registry.

``@register_loss('name')`` registers a loss class (or factory) whose constructor takes the
per-class counts first; :func:`create_loss` builds one by name.
"""
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

import torch.nn as nn

from .reweight import REWEIGHT_CHOICES, ClassCounts

__all__ = ['register_loss', 'list_losses', 'is_loss', 'create_loss']

_loss_entrypoints: Dict[str, Callable[..., nn.Module]] = {}

_F = TypeVar('_F', bound=Callable[..., nn.Module])


def register_loss(name: str) -> Callable[[_F], _F]:
    """Decorator registering a loss class or factory under ``name``.

    The callable is invoked as ``fn(class_counts, reweight=..., drw_epoch=..., epochs=...,
    cb_beta=..., **loss_kwargs)`` by :func:`create_loss`. Re-registering a name warns and
    replaces the earlier entry (as timm does for models).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_loss takes the loss name, e.g. @register_loss('ce'), got {name!r}")

    def _register(fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f'register_loss({name!r}) needs a class or callable, got {fn!r}')
        if name in _loss_entrypoints and _loss_entrypoints[name] is not fn:
            warnings.warn(f'Overwriting loss {name!r} in the loss registry', stacklevel=2)
        _loss_entrypoints[name] = fn
        return fn

    return _register


def list_losses() -> List[str]:
    """Sorted names of the registered losses."""
    return sorted(_loss_entrypoints)


def is_loss(name: str) -> bool:
    """Whether ``name`` is a registered loss."""
    return name in _loss_entrypoints


def _accepted_kwargs(fn: Callable) -> Optional[Set[str]]:
    """Keyword names ``fn`` accepts, following ``**kwargs`` up a class's ``__init__`` chain.

    None when anything is accepted (a ``**kwargs`` that cannot be followed).
    """
    if inspect.isclass(fn):
        targets = [c.__init__ for c in fn.__mro__ if '__init__' in vars(c) and c is not object]
    else:
        targets = [fn]
    names: Set[str] = set()
    for target in targets:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {'self'}
    return None


def create_loss(
        name: str,
        class_counts: ClassCounts,
        reweight: str = 'none',
        drw_epoch: Optional[int] = None,
        epochs: Optional[int] = None,
        cb_beta: float = 0.9999,
        **loss_kwargs: Any,
) -> nn.Module:
    """Create a registered long-tail loss, called as ``loss(logits, target)``.

    Args:
        name: registered loss name (see :func:`list_losses`): ``'ce'``, ``'ldam'``, ``'bs'``,
            ``'focal'``, ``'la'``.
        class_counts: ``(C,)`` per-class training image counts in class-index order
            (sequence, numpy array or tensor); all positive.
        reweight: ``'none'``, ``'cb'`` (class-balanced weights throughout) or ``'drw'``
            (no weights before ``drw_epoch``, class-balanced weights from it on).
        drw_epoch: 0-based epoch from which DRW weights apply; only used with ``'drw'``.
        epochs: total training epochs; with ``'drw'`` and no ``drw_epoch``, the deferral
            epoch is ``int(0.8 * epochs)`` (160 of 200, 80 of 100).
        cb_beta: effective-number beta of the class-balanced weights. Default 0.9999.
        **loss_kwargs: loss-specific options, e.g. ``s``/``max_m`` (ldam), ``gamma`` (focal),
            ``tau`` (la), ``weight`` (ce), ``reduction``, ``validate``.

    Raises:
        ValueError: unknown ``name`` or ``reweight`` (listing the valid choices), or ``'drw'``
            with neither ``drw_epoch`` nor ``epochs``.
        TypeError: a keyword the loss does not accept (named in the message).
    """
    if name not in _loss_entrypoints:
        raise ValueError(f'Unknown loss {name!r}; registered losses: {list_losses()}')
    if reweight not in REWEIGHT_CHOICES:
        raise ValueError(f'Unknown reweight {reweight!r}; choose one of {list(REWEIGHT_CHOICES)}')
    fn = _loss_entrypoints[name]
    accepted = _accepted_kwargs(fn)
    if accepted is not None:
        bad = sorted(k for k in loss_kwargs if k not in accepted)
        if bad:
            raise TypeError(
                f'Loss {name!r} got unexpected keyword argument(s) {bad}; '
                f'it accepts {sorted(accepted - {"class_counts"})}')
    return fn(
        class_counts, reweight=reweight, drw_epoch=drw_epoch, epochs=epochs, cb_beta=cb_beta,
        **loss_kwargs)
