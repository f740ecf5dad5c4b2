"""Checkpoints: weights-only loading with errors that name the file, atomic finite saves, resume fall-back."""
import errno
import fractions
import math
import os

import pytest
import torch
import torch.nn as nn

from timm_cmo import checkpoint as ckpt_mod
from timm_cmo import files
from timm_cmo.checkpoint import (
    BEST, LAST, CheckpointError, CheckpointSaver, NonFiniteStateError, find_resume_checkpoint, load_checkpoint_file,
    remove_stale_temporaries, state_dict_from_checkpoint)
from timm_cmo.files import FileWriteError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def saver_for(tmp_path, max_history=2, ema=None):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return CheckpointSaver(tmp_path, model, opt, model_ema=ema, max_history=max_history, arch='tiny',
                           run=dict(config=dict(lr=0.1)))


@pytest.mark.parametrize('kind', ['random', 'text', 'truncated', 'empty'])
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / 'x.pth.tar'
    if kind == 'truncated':
        torch.save({'state_dict': Tiny().state_dict(), 'epoch': 3}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes({'random': os.urandom(2000), 'text': b'epoch: 3\n', 'empty': b''}[kind])
    with pytest.raises(CheckpointError, match='is not a checkpoint') as e:
        load_checkpoint_file(path)
    assert str(path) in str(e.value)


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / 'p.pth.tar'
    torch.save({'state_dict': Tiny().state_dict(), 'note': fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match='holds pickled Python objects.*fractions.Fraction'):
        load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_checkpoint_file(tmp_path / 'missing.pth')


def test_state_dict_layouts_and_prefixes(tmp_path):
    sd = {f'module._orig_mod.{k}': v for k, v in Tiny().state_dict().items()}
    for layout in ({'state_dict': sd, 'epoch': 4}, {'model': sd}, sd):
        got, meta = state_dict_from_checkpoint(layout, 'x')
        assert set(got) == set(Tiny().state_dict())
    assert meta == {} and state_dict_from_checkpoint({'state_dict': sd, 'epoch': 4}, 'x')[1] == {'epoch': 4}
    with pytest.raises(CheckpointError, match="holds no state dict.*'epoch'"):
        state_dict_from_checkpoint({'epoch': 1}, 'x')


def test_saver_last_best_and_history(tmp_path):
    saver = saver_for(tmp_path)
    for epoch, metric in enumerate([10., 30., 20., 25.]):
        best = saver.save(epoch, metric)
    assert best == dict(metric='top1', value=30., epoch=1)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([LAST, BEST, 'checkpoint-1.pth.tar', 'checkpoint-3.pth.tar'])
    last = load_checkpoint_file(tmp_path / LAST)
    assert last['epoch'] == 3 and last['best'] == best and last['run'] == dict(config=dict(lr=0.1))
    assert load_checkpoint_file(tmp_path / BEST)['epoch'] == 1
    # a resumed saver continues the best and the history
    again = saver_for(tmp_path)
    again.load_state(last)
    assert again.save(4, 28.)['value'] == 30. and sorted(e for e, _ in again.history) == [1, 4]


@pytest.mark.parametrize('where', ['weight', 'bn_buffer', 'ema'])
def test_non_finite_state_is_never_saved(tmp_path, where):
    ema = Tiny() if where == 'ema' else None
    saver = saver_for(tmp_path, ema=ema)
    saver.save(0, 1.)
    before = (tmp_path / LAST).read_bytes()
    with torch.no_grad():
        if where == 'weight':
            saver.model.fc.weight[0, 0] = math.nan
        elif where == 'bn_buffer':
            saver.model.bn.running_var[1] = math.inf
        else:
            ema.bn.running_mean[0] = math.nan
    with pytest.raises(NonFiniteStateError, match={'weight': 'model holds non-finite values in fc.weight',
                                                   'bn_buffer': 'bn.running_var',
                                                   'ema': 'EMA model holds non-finite values in bn.running_mean'}[where]):
        saver.save(1, 2.)
    assert (tmp_path / LAST).read_bytes() == before


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    saver = saver_for(tmp_path)
    saver.save(0, 1.)
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(files.os, 'replace', full_disk)
    with pytest.raises(FileWriteError, match=f'cannot write {tmp_path / LAST}: No space left on device'):
        saver.save(1, 5.)
    monkeypatch.setattr(files.os, 'replace', real_replace)
    assert load_checkpoint_file(tmp_path / LAST)['epoch'] == 0  # the run can resume from epoch 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    assert saver.best['epoch'] == 0  # the failed epoch did not become the best


def test_resume_falls_back_to_a_complete_temporary(tmp_path):
    saver = saver_for(tmp_path)
    saver.save(0, 1.)
    saver.save(1, 2.)
    # a kill of timm's saver between its unlink and rename leaves tmp.pth.tar only; a torn temporary beside it
    os.rename(tmp_path / LAST, tmp_path / 'tmp.pth.tar')
    (tmp_path / f'.{LAST}.abc123.tmp').write_bytes(b'torn')
    path, ckpt = find_resume_checkpoint(tmp_path / LAST)
    assert path.endswith('tmp.pth.tar') and ckpt['epoch'] == 1
    assert remove_stale_temporaries(tmp_path) == [str(tmp_path / f'.{LAST}.abc123.tmp')]
    os.remove(tmp_path / 'tmp.pth.tar')
    with pytest.raises(FileNotFoundError, match='no complete temporary checkpoint'):
        find_resume_checkpoint(tmp_path / LAST)


class Config:
    """A configuration object a research code base pickled into its checkpoints (RIDE's ConfigParser, say)."""
    def __init__(self):
        self.lr = 0.1

    def __reduce__(self):  # what a malicious file would do: call a function on load
        return (os.system, ('echo PWNED > pwned.txt',))


def test_released_file_with_pickled_config_loads_inert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'ride.pth'
    sd = Tiny().state_dict()
    torch.save({'state_dict': sd, 'config': Config(), 'epoch': 5}, path)
    with pytest.raises(CheckpointError, match='pickled Python objects'):
        load_checkpoint_file(path)
    loaded = load_checkpoint_file(path, ignore_objects=True)
    assert loaded['epoch'] == 5 and all(torch.equal(loaded['state_dict'][k], v) for k, v in sd.items())
    assert type(loaded['config']).__module__ == 'timm_cmo.checkpoint.inert'
    assert not (tmp_path / 'pwned.txt').exists()  # nothing pickled ran
