import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.data.loader import PrefetchLoader

import timm_cmo  # noqa: F401
from timm_cmo.data.config import input_channels, input_img_mode, resolve_run_data_config
from timm_cmo.data.device_loader import normalization


def test_input_channels_order_and_conflict():
    assert input_channels({}) == 3 and input_channels({}, default=None) is None
    assert input_channels({'in_chans': 1}) == 1
    assert input_channels({'input_size': [1, 28, 28]}) == 1
    assert input_channels({'in_chans': 1, 'input_size': (1, 28, 28)}) == 1
    with pytest.raises(ValueError, match=r'in_chans 3 disagrees with input_size \(1, 28, 28\)'):
        input_channels({'in_chans': 3, 'input_size': [1, 28, 28]})


@pytest.mark.parametrize('mode,channels,expected', [
    (None, 3, 'RGB'), (None, 1, 'L'), (None, None, None), ('RGBA', 4, 'RGBA'), ('I;16', 1, 'I;16'), ('L', None, 'L'),
])
def test_input_img_mode(mode, channels, expected):
    assert input_img_mode(mode, channels) == expected


@pytest.mark.parametrize('mode,channels,message', [
    (None, 2, 'in_chans 2: images decode to 1 (L) or 3 (RGB)'),
    ('RGB', 1, "input_img_mode 'RGB' decodes to 3 channels; the model takes 1"),
    ('XYZ', None, "input_img_mode 'XYZ' is not a PIL image mode"),
])
def test_input_img_mode_errors(mode, channels, message):
    with pytest.raises(ValueError) as e:
        input_img_mode(mode, channels)
    assert message in str(e.value)


def test_resolve_run_data_config():
    model = timm.create_model('resnet32_cifar')
    base = resolve_data_config({}, model=model)
    assert resolve_run_data_config({}, model) == base  # 3 channels: timm's own
    gray = resolve_run_data_config({'in_chans': 1}, model)
    assert gray['input_size'] == (1, *base['input_size'][1:])
    assert gray['mean'] == pytest.approx((sum(base['mean']) / 3,))
    assert gray['std'] == pytest.approx((sum(base['std']) / 3,))
    assert {k: v for k, v in gray.items() if k not in ('input_size', 'mean', 'std')} == \
        {k: v for k, v in base.items() if k not in ('input_size', 'mean', 'std')}
    # without channel arguments the model's pretrained config decides (a one-channel Hub model)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(1, 32, 32), mean=(0.5,), std=(0.2,))
    assert resolve_run_data_config({}, model)['input_size'] == (1, 32, 32)
    assert resolve_run_data_config({}, model)['mean'] == (0.5,)
    # a single given value is repeated over the channels; --img-size keeps the channel count
    assert resolve_run_data_config({'in_chans': 1, 'mean': [0.5]}, model)['mean'] == (0.5,)
    assert resolve_run_data_config({'in_chans': 4, 'mean': [0.5], 'img_size': 28}, model)['mean'] == (0.5,) * 4
    assert resolve_run_data_config({'in_chans': 1, 'img_size': 28}, model)['input_size'] == (1, 28, 28)


@pytest.mark.parametrize('mean,std,channels', [
    ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201), 1),
    ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201), 3),
    ((0.5,), (0.25,), 3),
])
def test_normalization_matches_timm_prefetcher(mean, std, channels):
    """The device path's (1, C, 1, 1) mean / std are timm's PrefetchLoader's, bit for bit, for any channel count."""
    ours = normalization(mean, std, channels, torch.device('cpu'))
    timms = PrefetchLoader([], mean=mean, std=std, channels=channels, device=torch.device('cpu'))
    assert ours[0].shape == (1, channels, 1, 1)
    assert torch.equal(ours[0], timms.mean) and torch.equal(ours[1], timms.std)
