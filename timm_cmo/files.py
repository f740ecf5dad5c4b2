"""Writing files so that a reader never sees half of one: the one atomic writer of the package.

:func:`atomic_write` writes to a temporary file beside the target, flushes it to disk and renames it
over the target with ``os.replace`` (atomic on POSIX and Windows): the target holds either the old
or the new content, never a mix, and a failed write removes its temporary file and leaves the old
target as it was. New files get the permissions an ordinary ``open()`` would give them (0666 less
the umask), not ``mkstemp``'s 0600.
"""
import contextlib
import errno
import os
import tempfile
from typing import IO, Iterator, Union

__all__ = ['atomic_write', 'write_text_atomic', 'FileWriteError', 'TMP_SUFFIX']

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = '.tmp'


class FileWriteError(OSError):
    """A file could not be written: ``cannot write <path>: <reason>``; nothing partial is left behind."""

    def __init__(self, path: PathLike, cause: BaseException):
        reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(cause)
        super().__init__(getattr(cause, 'errno', None) or errno.EIO, f'cannot write {os.fspath(path)}: {reason}')
        self.path = os.fspath(path)
        self.cause = cause

    def __str__(self) -> str:
        return self.args[1]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = 'w', encoding: str = 'utf-8') -> Iterator[IO]:
    """Context manager yielding a file object whose content replaces ``path`` when the block ends.

    Args:
        path: Target file; its folder must exist.
        mode: ``'w'`` (text, ``encoding``, ``newline=''``) or ``'wb'``.

    Raises:
        FileWriteError: the temporary file could not be created, written, flushed or renamed
            (disk full, folder not writable, ...): ``cannot write <path>: <reason>``. The temporary
            file is removed and ``path`` keeps its old content. An I/O error raised inside the block
            (or wrapped by a writer such as ``torch.save``) becomes this error too; other exceptions
            also remove the temporary file and propagate unchanged.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix=TMP_SUFFIX)
    except OSError as e:
        raise FileWriteError(path, e) from None
    try:
        os.chmod(tmp, _default_mode())
        kwargs = dict(encoding=encoding, newline='') if mode == 'w' else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            fd = None
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        # an I/O error, or one that a writer (torch.save) wrapped around an I/O error
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is None or isinstance(e, FileWriteError):
            raise
        raise FileWriteError(path, cause) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, 'w') as f:
        f.write(text)
