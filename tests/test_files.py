"""The one atomic writer: complete or untouched targets, no temporary files left, ordinary permissions."""
import errno
import os
import stat

import pytest
import torch

from timm_cmo import files
from timm_cmo.files import FileWriteError, atomic_write, write_text_atomic


def leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(files.TMP_SUFFIX)]


def test_writes_with_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / 'a.txt', 'hello')
        with atomic_write(tmp_path / 'b.bin', 'wb') as f:
            torch.save({'x': torch.ones(3)}, f)
    finally:
        os.umask(old)
    assert (tmp_path / 'a.txt').read_text() == 'hello'
    assert torch.load(tmp_path / 'b.bin', weights_only=True)['x'].sum() == 3
    for name in ('a.txt', 'b.bin'):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name  # not mkstemp's 0600
    assert not leftovers(tmp_path)


def test_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / 'last.pth.tar'
    write_text_atomic(target, 'old')

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(files.os, 'fsync', no_space)
    with pytest.raises(FileWriteError) as e:
        write_text_atomic(target, 'new')
    assert str(e.value) == f'cannot write {target}: No space left on device'
    assert target.read_text() == 'old' and not leftovers(tmp_path)


def test_torch_save_failure_becomes_a_write_error(tmp_path):
    """torch.save wraps the I/O error of its writer in a RuntimeError ('basic_ios::clear' / 'unexpected pos')."""
    class FailingFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    target = tmp_path / 'ckpt.pth.tar'
    with pytest.raises(FileWriteError, match='No space left on device'):
        with atomic_write(target, 'wb') as f:
            torch.save({'w': torch.zeros(1000)}, FailingFile(f))
    assert not target.exists() and not leftovers(tmp_path)


def test_unwritable_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied')

    monkeypatch.setattr(files.tempfile, 'mkstemp', refuse)
    with pytest.raises(FileWriteError, match=f'cannot write {tmp_path / "x.txt"}: Permission denied'):
        write_text_atomic(tmp_path / 'x.txt', 'x')


def test_other_errors_propagate_and_clean_up(tmp_path):
    with pytest.raises(KeyError):
        with atomic_write(tmp_path / 'y.txt') as f:
            f.write('partial')
            raise KeyError('boom')
    assert not (tmp_path / 'y.txt').exists() and not leftovers(tmp_path)
