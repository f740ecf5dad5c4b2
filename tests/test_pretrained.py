"""pretrained.py: weights files read safely, heads and input channels adapted, the offline message."""
import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_cmo  # noqa: F401  (registers the CIFAR models)
from timm_cmo.checkpoint import CheckpointError
from timm_cmo.pretrained import adapt_pretrained_state_dict, fetch_error_message, is_fetch_error, load_weights_file


class Payload:
    """Executes code when unpickled: must never be loaded."""

    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_load_weights_file_layouts(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', num_classes=10)
    sd = model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    # a timm-style training checkpoint: args as a Namespace, the EMA preferred (timm's load_state_dict)
    torch.save({'epoch': 3, 'state_dict': sd, 'state_dict_ema': ema, 'args': argparse.Namespace(lr=0.1)},
               tmp_path / 'run.pth.tar')
    got = load_weights_file(tmp_path / 'run.pth.tar')
    assert got.keys() == sd.keys() and all(torch.equal(got[k], ema[k]) for k in sd)
    torch.save({'model': {f'module.{k}': v for k, v in sd.items()}}, tmp_path / 'ddp.pth')
    got = load_weights_file(tmp_path / 'ddp.pth')
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'model.safetensors'))
    got = load_weights_file(tmp_path / 'model.safetensors')
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_load_weights_file_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such file'):
        load_weights_file(tmp_path / 'missing.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='pickled Python objects'):
        load_weights_file(tmp_path / 'evil.pth')
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file at all')
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        load_weights_file(tmp_path / 'bad.safetensors')
    (tmp_path / 'text.pth').write_text('hello')
    with pytest.raises(CheckpointError, match='is not a checkpoint'):
        load_weights_file(tmp_path / 'text.pth')


@pytest.mark.parametrize('name,head_norm', [('resnet20_cifar', False), ('resnet20_cifar', True),
                                            ('ride_resnet20_cifar', False), ('resnet18', False)])
def test_head_dropped_only_for_another_class_count(name, head_norm):
    torch.manual_seed(0)
    kwargs = dict(head_norm=True) if head_norm else {}
    source = timm.create_model(name, num_classes=10, **kwargs).state_dict()
    same = timm.create_model(name, num_classes=10, **kwargs)
    sd, fresh, notes = adapt_pretrained_state_dict(same, source)
    assert sd.keys() == source.keys() and not fresh and not notes
    other = timm.create_model(name, num_classes=5, **kwargs)
    sd, fresh, notes = adapt_pretrained_state_dict(other, source)
    heads = other.pretrained_cfg['classifier']  # one name, or one per expert (RIDE)
    heads = tuple(h + '.' for h in ((heads,) if isinstance(heads, str) else heads))
    assert fresh == heads and len(notes) == len(heads) and all('new for 5 classes' in n for n in notes)
    assert {k for k in source if not k.startswith(heads)} == set(sd)  # only the heads left out
    other.load_state_dict(dict(other.state_dict(), **sd), strict=True)


def test_first_conv_adapted_to_one_channel():
    torch.manual_seed(0)
    source = timm.create_model('resnet20_cifar', num_classes=10).state_dict()
    gray = timm.create_model('resnet20_cifar', num_classes=10, in_chans=1)
    sd, fresh, notes = adapt_pretrained_state_dict(gray, source, in_chans=1)
    assert sd['conv1.weight'].shape == (16, 1, 3, 3) and 'from 3 to 1 input channels' in notes[0]
    torch.testing.assert_close(sd['conv1.weight'], source['conv1.weight'].sum(dim=1, keepdim=True))  # timm's rule


def test_fetch_error_message_names_the_model_and_the_ways_out(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    e = LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub.')
    assert is_fetch_error(e) and not is_fetch_error(ValueError('x')) and not is_fetch_error(FileNotFoundError('x'))
    msg = fetch_error_message('resnet18', e)
    assert '\n' not in msg and msg.startswith('--model resnet18: its pretrained weights could not be fetched')
    for part in ('HF_HUB_OFFLINE is set', 'timm/resnet18.a1_in1k', '--pretrained-path FILE', '--model local-dir:',
                 'HF_HOME'):
        assert part in msg
    hub = fetch_error_message('hf-hub:org/name', e)
    assert 'its config and weights could not be fetched' in hub and 'hf download org/name' in hub
