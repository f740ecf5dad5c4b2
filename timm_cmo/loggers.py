"""Experiment loggers: Weights & Biases (timm's ``--log-wandb`` flags) and TensorBoard event files.

One interface: :func:`start_loggers` starts the loggers the flags ask for, before the run writes its first file,
and raises :class:`LoggerStartError` (a missing package, a directory that cannot be written, a wandb run that will
not start) so the run stops before it begins; :meth:`RunLoggers.log_epoch` logs an epoch; :meth:`RunLoggers.close`
ends them. Per epoch: ``train/loss`` and ``train/lr``; per evaluation ``eval/<metric>`` for top-1 / top-5,
many / medium / few, head / middle / tail, ECE, NLL (and ``ema_top1`` / ``experts_used`` where the run has them).
The step is the epoch. A logger that fails during the run is closed with a warning; the run goes on.

* TensorBoard: ``torch.utils.tensorboard`` (needs the ``tensorboard`` package) writes to ``<run>/tensorboard``;
  a resumed run purges the events of the epochs it redoes.
* wandb: ``wandb.init(project=--wandb-project, name=<run folder name>, config=<flags>, tags=--wandb-tags,
  dir=<run>, id=--wandb-resume-id, resume='must' with an id)``, as timm's train.py; ``WANDB_MODE=offline`` logs
  to ``<run>/wandb`` without the network (``wandb sync`` uploads it later).
"""
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ['LoggerStartError', 'RunLoggers', 'TensorBoardLogger', 'WandbLogger', 'start_loggers',
           'check_logger_packages', 'EVAL_KEYS', 'TENSORBOARD_DIR']

_logger = logging.getLogger(__name__)

EVAL_KEYS = ('top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail', 'ece', 'mce', 'nll', 'ema_top1',
             'experts_used')
TENSORBOARD_DIR = 'tensorboard'
_PACKAGES = {'tensorboard': ('tensorboard', 'tensorboard'), 'wandb': ('wandb', 'wandb')}


class LoggerStartError(RuntimeError):
    """A logger asked for cannot start; the message says why and how to fix it."""


def epoch_metrics(train_loss: float, lr: float, eval_metrics: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """The values logged for an epoch: ``train/loss``, ``train/lr`` and the finite ``eval/<key>`` of :data:`EVAL_KEYS`."""
    out = {'train/loss': float(train_loss), 'train/lr': float(lr)}
    for key in EVAL_KEYS:
        value = (eval_metrics or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f'eval/{key}'] = float(value)
    return out


class TensorBoardLogger:
    """Scalars into TensorBoard event files under ``log_dir`` (``purge_step``: drop events from that step on)."""

    name = 'TensorBoard'

    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A wandb run (see the module docstring); ``epoch`` is logged with each epoch's values."""

    name = 'wandb'

    def __init__(self, project: Optional[str], name: str, config: Mapping[str, Any], tags: Sequence[str], dir: str,
                 resume_id: str = ''):
        import wandb
        self.wandb = wandb
        os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name, config=dict(config), tags=list(tags) or None, dir=dir,
                              id=resume_id or None, resume='must' if resume_id else None)

    def log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics, epoch=epoch))

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The run's loggers behind one call per epoch; a logger that raises is closed with a warning, never the run."""

    def __init__(self, loggers: Sequence[Any] = ()):
        self.loggers: List[Any] = list(loggers)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_epoch(self, epoch: int, train_loss: float, lr: float,
                  eval_metrics: Optional[Mapping[str, Any]] = None) -> None:
        metrics = epoch_metrics(train_loss, lr, eval_metrics)
        for logger in list(self.loggers):
            try:
                logger.log(epoch, metrics)
            except Exception as e:
                _logger.warning(f'{logger.name} logging failed at epoch {epoch} ({type(e).__name__}: {e}); the run '
                                f'goes on without it (summary.csv has every epoch).')
                self._drop(logger)

    def close(self) -> None:
        for logger in list(self.loggers):
            self._drop(logger)

    def _drop(self, logger) -> None:
        self.loggers.remove(logger)
        try:
            logger.close()
        except Exception as e:
            _logger.warning(f'{logger.name} did not close cleanly ({type(e).__name__}: {e}).')


def check_logger_packages(log_tensorboard: bool, log_wandb: bool) -> None:
    """Raise :class:`LoggerStartError` naming the pip command when a logger's package is missing."""
    import importlib
    for wanted, key in ((log_tensorboard, 'tensorboard'), (log_wandb, 'wandb')):
        if not wanted:
            continue
        module, package = _PACKAGES[key]
        try:
            importlib.import_module(module)
        except ImportError as e:
            flag = '--log-tensorboard' if key == 'tensorboard' else '--log-wandb'
            raise LoggerStartError(f'{flag} needs the {package!r} package ({e}): pip install {package}, or '
                                   f'pip install -e ".[{key}]" in a checkout') from None


def start_loggers(args, output_dir: str, start_epoch: int = 0) -> RunLoggers:
    """Start the loggers of ``args`` (``log_tensorboard``, ``log_wandb``, ``wandb_project``, ``wandb_tags``,
    ``wandb_resume_id``) for the run folder ``output_dir``.

    Raises:
        LoggerStartError: a package is missing, the folder cannot be written, or wandb does not start.
    """
    check_logger_packages(getattr(args, 'log_tensorboard', False), getattr(args, 'log_wandb', False))
    loggers: List[Any] = []
    try:
        if getattr(args, 'log_tensorboard', False):
            log_dir = os.path.join(output_dir, TENSORBOARD_DIR)
            try:
                loggers.append(TensorBoardLogger(log_dir, purge_step=start_epoch if start_epoch > 0 else None))
            except Exception as e:
                raise LoggerStartError(f'--log-tensorboard: cannot write event files to {log_dir} '
                                       f'({type(e).__name__}: {e})') from None
        if getattr(args, 'log_wandb', False):
            try:
                loggers.append(WandbLogger(
                    args.wandb_project, os.path.basename(os.path.normpath(output_dir)), vars(args),
                    args.wandb_tags or (), output_dir, resume_id=args.wandb_resume_id or ''))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ''
                raise LoggerStartError(
                    f'--log-wandb: wandb did not start ({type(e).__name__}: {first}); without network or a login set '
                    f'WANDB_MODE=offline (then wandb sync {output_dir}/wandb/offline-run-*)') from None
    except LoggerStartError:
        RunLoggers(loggers).close()
        raise
    return RunLoggers(loggers)
