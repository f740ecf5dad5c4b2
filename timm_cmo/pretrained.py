"""Pretrained weights from a local file, and a clear stop where the Hub's cannot be fetched.

* :func:`load_weights_file` reads a ``.safetensors`` file or a torch checkpoint (``weights_only``: nothing pickled
  is executed) and returns its state dict: the EMA weights where the file has them, as timm's
  ``load_state_dict`` picks them (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``, or a bare
  state dict), with ``module.`` / ``_orig_mod.`` prefixes stripped.
* :func:`adapt_pretrained_state_dict` fits such a state dict to a freshly built model the way timm's pretrained
  loading does: a classifier whose class count differs from the model's is dropped (the model keeps its new
  head; timm drops it when ``num_classes`` differs from the weights'), and a first convolution saved for
  another number of input channels is converted with timm's ``adapt_input_conv``. Every other key must fit
  (the caller loads strictly), unlike timm's ``pretrained_cfg_overlay=dict(file=..., num_classes=-1)``, which
  always drops the head and loads the rest non-strictly, so a file of another architecture would load partly
  without an error.
* :func:`fetch_error_message` turns the error of a model whose config or weights could not be fetched (no
  network, ``HF_HUB_OFFLINE=1`` and an empty cache) into one line naming the model and the ways out.
"""
import os
import urllib.error
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_checkpoint_file, state_dict_from_checkpoint, strip_prefixes

__all__ = ['load_weights_file', 'adapt_pretrained_state_dict', 'is_fetch_error', 'fetch_error_message',
           'PRETRAINED_KEYS']

PRETRAINED_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')  # timm's load_state_dict(use_ema=True)


def load_weights_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The state dict of a ``.safetensors`` file or a torch checkpoint (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a weights file, or one holding pickled objects (the message says which).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path}')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state_dict = load_file(path, device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path} is not a readable safetensors file: {str(e).splitlines()[0]}') from None
        if not state_dict:
            raise CheckpointError(f'{path} holds no tensors')
        return strip_prefixes(state_dict)
    state_dict, _ = state_dict_from_checkpoint(load_checkpoint_file(path), path, keys=PRETRAINED_KEYS)
    return state_dict


def _names(value) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def adapt_pretrained_state_dict(
        model: nn.Module, state_dict: Dict[str, torch.Tensor], in_chans: Optional[int] = None,
) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...], List[str]]:
    """Fit ``state_dict`` to ``model``'s head and input channels.

    Args:
        model: The freshly built model (its ``pretrained_cfg`` names ``classifier`` and ``first_conv``).
        state_dict: Weights from :func:`load_weights_file`.
        in_chans: The model's input channels (default: read from the first convolution).

    Returns:
        ``(state dict, fresh prefixes, notes)``: the adapted state dict; the prefixes of the classifier keys left
        out (the model keeps its own, newly initialised head there); what was adapted, one sentence each.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    own = model.state_dict()
    state_dict = dict(state_dict)
    fresh: List[str] = []
    notes: List[str] = []
    for name in _names(cfg.get('classifier')):
        prefix = name + '.'
        keys = [k for k in state_dict if k.startswith(prefix)]
        if keys and any(k in own and own[k].shape != state_dict[k].shape for k in keys):
            k = next(k for k in keys if k in own and own[k].shape != state_dict[k].shape)
            notes.append(f'classifier {name} new for {getattr(model, "num_classes", "?")} classes ({k} is '
                         f'{tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model)')
            for k in keys:
                del state_dict[k]
        if not any(k.startswith(prefix) for k in state_dict):
            fresh.append(prefix)
    for name in _names(cfg.get('first_conv')):
        key = name + '.weight'
        if key not in state_dict or key not in own or state_dict[key].shape == own[key].shape:
            continue
        weight, target = state_dict[key], own[key]
        if weight.ndim == 4 and weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:]:
            from timm.models import adapt_input_conv
            try:
                state_dict[key] = adapt_input_conv(in_chans or target.shape[1], weight.float()).to(weight.dtype)
                notes.append(f'{key} converted from {weight.shape[1]} to {target.shape[1]} input channels')
            except NotImplementedError:
                pass  # the strict load then names the mismatch
    return state_dict, tuple(fresh), notes


def is_fetch_error(e: BaseException) -> bool:
    """Whether ``e`` says a model's config or weights could not be fetched (no network, offline, not cached)."""
    try:
        from huggingface_hub import errors as hf_errors
        hub = (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, hf_errors.HfHubHTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        hub = ()
    return isinstance(e, hub + (urllib.error.URLError, ConnectionError, TimeoutError))


def _hub_id(model_name: str) -> Optional[str]:
    for prefix in ('hf-hub:', 'hf_hub:'):
        if model_name.startswith(prefix):
            return model_name[len(prefix):]
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(model_name)
        return getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    except Exception:
        return None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return '~/.cache/huggingface/hub'


def fetch_error_message(model_name: str, e: BaseException, pretrained: bool = True) -> str:
    """One line: what could not be fetched for ``model_name`` and the three ways to run without the network."""
    what = 'pretrained weights' if pretrained and not model_name.startswith(('hf-hub:', 'hf_hub:')) else \
        'config and weights' if pretrained else 'config'
    hub_id = _hub_id(model_name)
    offline = os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')
    reason = 'HF_HUB_OFFLINE is set' if offline else 'the Hub cannot be reached'
    return (f'--model {model_name}: its {what} could not be fetched ({type(e).__name__}: {reason}, and the Hugging '
            f'Face cache {_hf_cache_dir()} has no copy{" of " + hub_id if hub_id else ""}). '
            f'Ways out: --pretrained-path FILE (a local checkpoint or .safetensors file of this model), '
            f'--model local-dir:FOLDER (a folder with config.json and model.safetensors), or fill the cache '
            f'(HF_HOME) on a machine with network{" (hf download " + hub_id + ")" if hub_id else ""} and copy it '
            f'here')
