""" Data configuration for any number of image channels.

timm's ``resolve_data_config`` takes ``input_size`` from the model's pretrained config unless
``--input-size`` / ``--img-size`` is given, so ``--in-chans 1`` alone still yields ``(3, H, W)`` and
three-value mean/std. These helpers resolve the channel count once and match the rest to it.
"""
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn
from PIL import Image
from timm.data import resolve_data_config
from timm.data.loader import adapt_to_chs

__all__ = ['input_channels', 'input_img_mode', 'resolve_run_data_config']

_MODE_BY_CHANNELS = {1: 'L', 3: 'RGB'}


def input_channels(args: Mapping[str, Any], default: Optional[int] = 3) -> Optional[int]:
    """Image channels the arguments ask for: ``input_size[0]``, else ``in_chans``, else ``default``.

    Raises:
        ValueError: ``input_size`` and ``in_chans`` disagree.
    """
    in_chans = args.get('in_chans')
    input_size = args.get('input_size')
    if input_size is not None:
        if in_chans is not None and int(in_chans) != int(input_size[0]):
            raise ValueError(f'in_chans {in_chans} disagrees with input_size {tuple(input_size)}')
        return int(input_size[0])
    return int(in_chans) if in_chans is not None else default


def input_img_mode(mode: Optional[str], channels: Optional[int]) -> Optional[str]:
    """PIL mode images are decoded to: ``mode`` if given, else ``'L'`` for 1 channel and ``'RGB'`` for 3.

    ``channels`` None (not known yet, e.g. before a Hub model's config is read) checks only a given
    mode and otherwise returns None.

    Raises:
        ValueError: an unknown mode, a mode whose band count is not ``channels``, or a channel count
            with no default mode.
    """
    if mode is None:
        if channels is None:
            return None
        if channels not in _MODE_BY_CHANNELS:
            raise ValueError(f'in_chans {channels}: images decode to 1 (L) or 3 (RGB) channels by default; '
                             f'name a PIL mode with {channels} bands in input_img_mode')
        return _MODE_BY_CHANNELS[channels]
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        raise ValueError(f'input_img_mode {mode!r} is not a PIL image mode') from None
    if channels is not None and bands != channels:
        raise ValueError(f'input_img_mode {mode!r} decodes to {bands} channels; the model takes {channels}')
    return mode


def resolve_run_data_config(
        args: Mapping[str, Any],
        model: Optional[nn.Module] = None,
        verbose: bool = False,
) -> Dict[str, Any]:
    """timm's ``resolve_data_config(args, model=model)`` with ``input_size``'s channels set to those the
    arguments ask for (else the model's pretrained config's) and mean / std matched to them (repeated or
    averaged, as timm's loader does)."""
    config = resolve_data_config(dict(args), model=model, verbose=verbose)
    channels = input_channels(args, default=config['input_size'][0])
    config['input_size'] = (channels, *tuple(config['input_size'])[1:])
    config['mean'] = tuple(adapt_to_chs(tuple(config['mean']), channels))
    config['std'] = tuple(adapt_to_chs(tuple(config['std']), channels))
    return config
