"""Training checkpoints: loaded without executing pickled code, saved atomically, always finite.

* :func:`load_checkpoint_file` reads a ``.pth.tar`` with ``torch.load(weights_only=True)`` and turns
  every failure into a :class:`CheckpointError` that names the file and says what is wrong (not a
  checkpoint, truncated, pickled objects).
* :func:`state_dict_from_checkpoint` finds the state dict in the layouts in use (timm's
  ``state_dict`` / ``state_dict_ema``, the paper code's ``state_dict``, ``model``, or a bare state
  dict) and strips ``module.`` / ``_orig_mod.`` prefixes.
* :class:`CheckpointSaver` writes ``last.pth.tar`` every epoch, ``model_best.pth.tar`` and the
  ``--checkpoint-hist`` best ``checkpoint-<epoch>.pth.tar``, each through
  :func:`~timm_cmo.files.atomic_write` (a kill or a full disk never leaves a torn or missing
  checkpoint), after checking that the weights, buffers and EMA are finite.

The checkpoint layout is timm's (``epoch``, ``arch``, ``state_dict``, ``optimizer``, ``amp_scaler``,
``state_dict_ema``, ``metric``), plus ``best`` (``{'metric', 'value', 'epoch'}``), ``history`` and
``run`` (the run's configuration, compared on ``--resume``).
"""
import argparse
import glob
import logging
import os
import pickle
import shutil
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .files import TMP_SUFFIX, FileWriteError, atomic_write

__all__ = ['CheckpointError', 'NonFiniteStateError', 'CheckpointSaver', 'load_checkpoint_file',
           'state_dict_from_checkpoint', 'strip_prefixes', 'first_non_finite', 'find_resume_checkpoint',
           'remove_stale_temporaries', 'LAST', 'BEST']

_logger = logging.getLogger(__name__)

LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
LEGACY_TMP = 'tmp.pth.tar'  # timm's CheckpointSaver writes this before renaming it to last.pth.tar
STATE_DICT_KEYS = ('state_dict', 'model', 'state_dict_ema')
STRIP_PREFIXES = ('module.', '_orig_mod.')

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names the file and the problem."""


class NonFiniteStateError(RuntimeError):
    """The model's (or EMA's) weights or buffers hold NaN or infinity."""


class _Inert:
    """Stands in for a pickled object whose class weights-only loading does not know: none of its code runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __setitem__(self, key, value):
        pass


def _inert_pickle_module(replaced: List[str]) -> Any:
    """A ``pickle_module`` for ``torch.load`` that resolves only weights-only's allowed globals and turns every
    other class or function into an inert stand-in (named in ``replaced``): nothing pickled is executed."""
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = _get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            key = f'{module}.{name}'
            if key in allowed:
                return allowed[key]
            replaced.append(key)
            return type(name, (_Inert,), {'__module__': 'timm_cmo.checkpoint.inert'})

    return type('inert_pickle', (), {'Unpickler': Unpickler, 'load': staticmethod(pickle.load)})


def load_checkpoint_file(path: PathLike, ignore_objects: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what is wrong.

    ``argparse.Namespace`` (timm's saver stores the run's args) is allowed; nothing else that would
    execute pickled code is. With ``ignore_objects`` (for released files that pickled their whole
    configuration, e.g. RIDE's), such objects load as inert stand-ins instead of failing: still
    nothing pickled is executed, and a warning names them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a checkpoint (random bytes, text, truncated) or holds
            pickled Python objects that weights-only loading refuses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if 'unsupported global' in line.lower()), '')
        if detail and ignore_objects:
            replaced: List[str] = []
            ckpt = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_inert_pickle_module(replaced))
            _logger.warning(f'{path}: ignored pickled objects (loaded inert, not executed): '
                            f'{", ".join(sorted(set(replaced)))}')
            return ckpt
        if detail:
            raise CheckpointError(
                f'{path} holds pickled Python objects that weights-only loading refuses to execute ({detail}). '
                f'Re-save only its tensors, e.g. torch.save({{"state_dict": ckpt["state_dict"]}}, path), from an '
                f'environment you trust.') from None
        raise CheckpointError(f'{path} is not a checkpoint (not a torch.save file): {_first_line(e)}') from None
    except Exception as e:  # torch raises many kinds on text, random bytes and truncated files
        size = os.path.getsize(path)
        raise CheckpointError(f'{path} is not a checkpoint or is truncated ({size} bytes): {_first_line(e)}') from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile) prefixes, however nested."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in out:
            raise CheckpointError(f'Duplicate key {key!r} after stripping {"/".join(STRIP_PREFIXES)} prefixes.')
        out[key] = value
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def state_dict_from_checkpoint(
        checkpoint: Any,
        path: PathLike,
        keys: Sequence[str] = STATE_DICT_KEYS,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state dict with prefixes stripped, metadata)`` of a loaded checkpoint.

    The state dict is the first of ``keys`` holding a dict, else the checkpoint itself when it is a
    bare state dict. Metadata: the numeric ``epoch``, ``metric`` and ``best_acc1`` entries present.

    Raises:
        CheckpointError: no state dict under ``keys``, or one with non-tensor entries (the message lists
            what the file holds).
    """
    path = os.fspath(path)
    state_dict, source = None, 'the checkpoint'
    if isinstance(checkpoint, dict):
        key = next((k for k in keys if isinstance(checkpoint.get(k), dict)), None)
        if key is not None:
            state_dict, source = checkpoint[key], repr(key)
        elif _is_state_dict(checkpoint):
            state_dict = checkpoint
    if state_dict is None:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{path} holds no state dict: expected a dict of tensors or one under '
                              f'{", ".join(map(repr, keys))}, found {found}.')
    bad = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state_dict:
        raise CheckpointError(f'{source} in {path} is not a state dict: '
                              f'{"non-tensor entries " + ", ".join(bad[:10]) if bad else "it is empty"}.')
    meta = {}
    if isinstance(checkpoint, dict):
        for key in ('epoch', 'metric', 'best_acc1'):
            value = checkpoint.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                meta[key] = value
    return strip_prefixes(state_dict), meta


def first_non_finite(tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name of the first floating-point tensor holding NaN or infinity, or None when all are finite."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, 'module', model)  # DDP / ModelEmaV3
    return getattr(model, '_orig_mod', model)  # torch.compile


def remove_stale_temporaries(folder: PathLike) -> List[str]:
    """Remove temporary files a killed writer left in ``folder`` (``.<name>.*.tmp``); returns their paths."""
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), '.*' + TMP_SUFFIX)):
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def find_resume_checkpoint(path: PathLike) -> Tuple[str, Any]:
    """The checkpoint to resume from: ``path``, or, when ``path`` is a missing ``last.pth.tar``, the
    newest complete temporary checkpoint beside it (timm's ``tmp.pth.tar`` or a ``.last.pth.tar.*.tmp``
    of an interrupted save). Returns ``(path used, loaded checkpoint)``.

    Raises:
        FileNotFoundError: nothing to resume from (the message lists where it looked).
        CheckpointError: ``path`` exists but is not a usable checkpoint.
    """
    path = os.fspath(path)
    if os.path.exists(path) or os.path.basename(path) != LAST:
        return path, load_checkpoint_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(folder, LEGACY_TMP)] + glob.glob(os.path.join(folder, f'.{LAST}.*{TMP_SUFFIX}'))
    best = None
    for c in candidates:
        if not os.path.isfile(c):
            continue
        try:
            ckpt = load_checkpoint_file(c)
        except (CheckpointError, FileNotFoundError):
            continue  # torn by the kill
        epoch = ckpt.get('epoch') if isinstance(ckpt, dict) else None
        if isinstance(epoch, int) and (best is None or epoch > best[1].get('epoch', -1)):
            best = (c, ckpt)
    if best is None:
        raise FileNotFoundError(f'Checkpoint not found: {path} (and no complete temporary checkpoint in {folder})')
    _logger.warning(f'{path} is missing; resuming from the complete temporary checkpoint {best[0]} '
                    f'(epoch {best[1]["epoch"]}) that an interrupted save left.')
    return best


class CheckpointSaver:
    """Save training state each epoch, atomically and only when finite.

    Args:
        checkpoint_dir: Run folder.
        model: The model (DDP / compiled wrappers are unwrapped).
        optimizer: Its optimizer.
        model_ema: timm ``ModelEmaV3`` (or None).
        amp_scaler: timm ``NativeScaler`` (or None).
        metric_name: Name of the metric that ranks checkpoints (``--eval-metric``).
        decreasing: Lower metric is better.
        max_history: How many best ``checkpoint-<epoch>.pth.tar`` to keep (0: none).
        arch: Model name stored as ``arch``.
        run: The run's configuration stored as ``run`` (plain data).
    """

    def __init__(
            self,
            checkpoint_dir: PathLike,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            model_ema: Optional[nn.Module] = None,
            amp_scaler: Any = None,
            metric_name: str = 'top1',
            decreasing: bool = False,
            max_history: int = 3,
            arch: str = '',
            run: Optional[Dict[str, Any]] = None,
    ):
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.model = model
        self.optimizer = optimizer
        self.model_ema = model_ema
        self.amp_scaler = amp_scaler
        self.metric_name = metric_name
        self.decreasing = decreasing
        self.max_history = max_history
        self.arch = arch
        self.run = run or {}
        self.best: Dict[str, Any] = dict(metric=metric_name, value=None, epoch=None)
        self.history: List[Tuple[int, float]] = []  # (epoch, metric) of the kept checkpoint-<epoch> files

    @property
    def last_path(self) -> str:
        return os.path.join(self.checkpoint_dir, LAST)

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Continue the best metric and history of a resumed run (same metric only)."""
        best = checkpoint.get('best')
        if isinstance(best, dict) and best.get('metric') == self.metric_name:
            self.best = dict(best)
        history = checkpoint.get('history')
        if isinstance(history, list):
            self.history = [(int(e), float(m)) for e, m in history
                            if os.path.exists(self._history_path(int(e)))]

    def _better(self, metric: float, than: Optional[float]) -> bool:
        return than is None or (metric < than if self.decreasing else metric > than)

    def _history_path(self, epoch: int) -> str:
        return os.path.join(self.checkpoint_dir, f'checkpoint-{epoch}.pth.tar')

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteStateError` naming the first non-finite weight or buffer (model, then EMA)."""
        for label, module in (('model', self.model), ('EMA model', self.model_ema)):
            if module is None:
                continue
            name = first_non_finite(_unwrap(module).state_dict().items())
            if name is not None:
                raise NonFiniteStateError(f'the {label} holds non-finite values in {name}')

    def state(self, epoch: int, metric: Optional[float]) -> Dict[str, Any]:
        state = {
            'epoch': epoch,
            'arch': self.arch,
            'state_dict': _unwrap(self.model).state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
            'metric': metric,
            'best': self.best,
            'history': self.history,
            'run': self.run,
        }
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = _unwrap(self.model_ema).state_dict()
        return state

    def save(self, epoch: int, metric: Optional[float] = None) -> Dict[str, Any]:
        """Check, then write ``last.pth.tar`` (and best / history files when ``metric`` ranks).

        Returns the best so far (``{'metric', 'value', 'epoch'}``).

        Raises:
            NonFiniteStateError: nothing is written; the previous checkpoints stay.
            FileWriteError: ``cannot write <path>: <reason>``; the previous checkpoints stay.
        """
        self.check_finite()
        best, history = self.best, self.history
        is_best = metric is not None and self._better(metric, best['value'])
        if is_best:
            best = dict(metric=self.metric_name, value=metric, epoch=epoch)
        rank = sorted(history, key=lambda h: h[1], reverse=not self.decreasing)
        keep = metric is not None and self.max_history > 0 and (
            len(rank) < self.max_history or self._better(metric, rank[-1][1]))
        if keep:
            history = sorted(history + [(epoch, metric)], key=lambda h: h[1], reverse=not self.decreasing)
            history = history[:self.max_history]
        state = self.state(epoch, metric)
        state.update(best=best, history=history)
        with atomic_write(self.last_path, 'wb') as f:
            torch.save(state, f)
        self.best, self.history = best, history
        copies = ([BEST] if is_best else []) + ([os.path.basename(self._history_path(epoch))] if keep else [])
        for name in copies:
            with open(self.last_path, 'rb') as src, atomic_write(os.path.join(self.checkpoint_dir, name), 'wb') as dst:
                shutil.copyfileobj(src, dst)
        kept = {e for e, _ in self.history}
        for path in glob.glob(os.path.join(self.checkpoint_dir, 'checkpoint-*.pth.tar')):
            stem = os.path.basename(path)[len('checkpoint-'):-len('.pth.tar')]
            if stem.isdigit() and int(stem) not in kept:
                os.remove(path)
        return dict(self.best)
