"""End-of-run result files: per-class CSV, ``results.json`` and the plots (per-class accuracy, reliability).

``results.json`` layout::

    {"metrics": {"top1", "top5", "many", "medium", "few", "head", "middle", "tail", "samples"},
     "per_class": {"top1": [C], "top5": [C], "train_images": [C], "test_images": [C], "shot_group": [C]},
     "class_names": [C],
     ...extra keys of the training script (model, dataset, method, epoch, command, config, best, ...)}

Accuracies are in %; NaN (a class without test images) and empty groups are ``null``.
"""
import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from .data.dataset import shot_groups
from .files import write_text_atomic
from .plot import PLOT_FORMATS, plot_per_class_accuracy, plot_reliability

_logger = logging.getLogger(__name__)

__all__ = ['write_results', 'read_results', 'results_table_markdown', 'to_json_safe', 'cpu_model', 'peak_rss_mib',
           'SummaryWriter', 'SUMMARY_EVAL_KEYS', 'RESULTS_JSON', 'RESULTS_CSV', 'RESULTS_PNG', 'RELIABILITY_PNG']

RESULTS_JSON = 'results.json'
RESULTS_CSV = 'per_class_accuracy.csv'
RESULTS_PNG = 'per_class_accuracy.png'
RELIABILITY_PNG = 'reliability.png'
CSV_HEADER = ('class_index', 'class_name', 'train_images', 'test_images', 'top1', 'top5', 'shot_group')
_RESERVED = ('metrics', 'per_class', 'class_names')

PathLike = Union[str, os.PathLike]


def cpu_model(default: str = 'CPU') -> str:
    """The CPU's model name from /proc/cpuinfo, or ``default`` where there is none."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), default)
    except OSError:
        return default


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_json_safe(obj: Any) -> Any:
    """Recursively convert numpy / torch scalars and arrays, tuples and paths to JSON types; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if hasattr(obj, 'tolist') and callable(obj.tolist):  # numpy / torch scalars and tensors
        return to_json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _round(value: float, digits: int = 4) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _plot_title(extra: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    parts = []
    if extra.get('model'):
        parts.append(str(extra['model']))
    dataset = extra.get('dataset')
    if isinstance(dataset, Mapping):
        name = dataset.get('name') or os.path.basename(str(dataset.get('data_dir') or '').rstrip('/\\'))
        if name:
            ratio, cap = dataset.get('imb_ratio'), dataset.get('imb_max')
            details = ([f'imbalance ratio {ratio:g}'] if isinstance(ratio, (int, float)) else []) + \
                ([f'largest class {cap:g}'] if isinstance(cap, (int, float)) else [])
            parts.append(f'{name} ({", ".join(details)})' if details else str(name))
    elif dataset:
        parts.append(str(dataset))
    top1 = summary.get('top1')
    if isinstance(top1, (int, float)) and math.isfinite(top1):
        parts.append(f'top-1 {top1:.2f}%')
    return ' - '.join(parts)


def write_results(
        output_dir: PathLike,
        summary: Dict[str, Any],
        per_class: Dict[str, Any],
        train_class_counts: Sequence[int],
        class_names: Optional[Sequence[str]],
        extra: Optional[Dict[str, Any]] = None,
        many: int = 100,
        few: int = 20,
        calibration: Optional[Mapping[str, Any]] = None,
        plot_format: str = 'png',
) -> Dict[str, Path]:
    """Write ``per_class_accuracy.csv``, ``results.json``, ``per_class_accuracy.png`` and, with
    ``calibration``, ``reliability.png`` (each atomically; ``.svg`` / ``.pdf`` with ``plot_format``).

    Args:
        output_dir: Run folder (created if needed).
        summary: :meth:`ClassAccuracy.summary` output, stored under ``metrics``.
        per_class: :meth:`ClassAccuracy.per_class` output: ``count``, ``top1``, ``top5``, (C,) each.
        train_class_counts: (C,) training images per class; None when unknown (no shot groups, no plot).
        class_names: Class names in index order; None: ``'0'..'C-1'``.
        extra: Keys merged at the top level of ``results.json`` (must not be metrics/per_class/class_names).
        many, few: Shot-group thresholds of the ``shot_group`` column.
        calibration: :meth:`ClassAccuracy.calibration` output, stored under ``calibration`` and drawn
            as a reliability diagram.
        plot_format: ``'png'`` (default), ``'svg'`` or ``'pdf'``: the plots' file format.

    Returns:
        ``{'csv': path, 'json': path, 'png': path, 'reliability': path}`` (``'png'``: the per-class plot, in
        ``plot_format``; a plot that could not be drawn is missing: the error is logged, the CSV and JSON are kept).
    """
    if plot_format not in PLOT_FORMATS:
        raise ValueError(f'plot_format {plot_format!r}: choose from {", ".join(PLOT_FORMATS)}')
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f'extra must not hold the reserved keys {clash}')
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    known_counts = train_class_counts is not None
    num_classes = len(per_class['count'])
    train = [int(n) for n in train_class_counts] if known_counts else [None] * num_classes
    test = [int(n) for n in np.asarray(per_class['count'])]
    top1 = [float(v) for v in np.asarray(per_class['top1'], dtype=np.float64)]
    top5 = [float(v) for v in np.asarray(per_class['top5'], dtype=np.float64)]
    names = [str(n) for n in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
    if not len(test) == len(top1) == len(top5) == len(names) == num_classes:
        raise ValueError(f'Per-class arrays, class names and train_class_counts differ in length '
                         f'({len(test)}, {len(top1)}, {len(top5)}, {len(names)}, {num_classes})')
    group = [''] * num_classes
    for name, classes in (shot_groups(train, many=many, few=few)._asdict().items() if known_counts else ()):
        for c in classes:
            group[c] = name

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(CSV_HEADER)
    for c in range(num_classes):
        acc = ['' if _round(v) is None else f'{_round(v):.4f}' for v in (top1[c], top5[c])]
        writer.writerow([c, names[c], '' if train[c] is None else train[c], test[c], *acc, group[c]])
    paths = {'csv': output_dir / RESULTS_CSV, 'json': output_dir / RESULTS_JSON,
             'png': (output_dir / RESULTS_PNG).with_suffix('.' + plot_format)}
    if calibration is not None:
        paths['reliability'] = (output_dir / RELIABILITY_PNG).with_suffix('.' + plot_format)
    write_text_atomic(paths['csv'], buf.getvalue())

    results = {
        'metrics': summary,
        'per_class': {
            'top1': [_round(v) for v in top1],
            'top5': [_round(v) for v in top5],
            'train_images': train,
            'test_images': test,
            'shot_group': group,
        },
        'class_names': names,
        **({'calibration': {k: calibration[k] for k in ('edges', 'count', 'accuracy', 'confidence', 'logit_scale')
                            if k in calibration}} if calibration is not None else {}),
        **extra,
    }
    text = json.dumps(to_json_safe(results), indent=2, allow_nan=False)
    write_text_atomic(paths['json'], text + '\n')

    # the records are written: a plot that fails is reported, never fails the run
    plots = {'png': lambda p: plot_per_class_accuracy(p, top1, train, class_names=names, many=many, few=few,
                                                      title=_plot_title(extra, summary)),
             'reliability': lambda p: plot_reliability(p, calibration, title=_plot_title(extra, summary))}
    if not known_counts:
        _logger.warning('No per-class plot: the training class counts are unknown.')
        del paths['png']
    for key, draw in plots.items():
        if key not in paths:
            continue
        try:
            draw(paths[key])
        except Exception as e:
            _logger.error(f'Could not draw {paths[key]} ({type(e).__name__}: {e}); '
                          f'{paths["json"]} and {paths["csv"]} are written.')
            del paths[key]
    return paths


def read_results(path_or_dir: PathLike) -> Dict[str, Any]:
    """Read ``results.json`` given its path (``*.json``) or its run folder."""
    path = Path(path_or_dir)
    if path.is_dir() or path.suffix != '.json':
        path = path / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f'Results file not found: {path}')
    with path.open(encoding='utf-8') as f:
        return json.load(f)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '–'
    return f'{float(value):.1f}'


def _table(header: Sequence[str], values: Sequence[Any]) -> str:
    return '\n'.join([
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join([':---:'] * len(header)) + '|',
        '| ' + ' | '.join(_fmt(v) for v in values) + ' |',
    ])


def results_table_markdown(results: Dict[str, Any]) -> str:
    """Markdown tables of top-1 accuracy (%): ``| All | Many | Medium | Few |`` and ``| Head | Middle | Tail |``.

    Takes a ``results.json`` dict (or its ``metrics``); one decimal, '–' for a missing value.
    """
    m = results.get('metrics', results)
    return (_table(('All', 'Many', 'Medium', 'Few'), [m.get(k) for k in ('top1', 'many', 'medium', 'few')])
            + '\n\n' + _table(('Head', 'Middle', 'Tail'), [m.get(k) for k in ('head', 'middle', 'tail')]) + '\n')


SUMMARY_EVAL_KEYS = ('top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail', 'ece', 'mce', 'nll')


class SummaryWriter:
    """``summary.csv``: one row per epoch, the same columns in every row.

    Columns: ``epoch``, ``train_loss``, ``lr`` (the epoch's own learning rate, read at its start),
    ``epoch_time_s`` and ``eval_<metric>`` for :data:`SUMMARY_EVAL_KEYS` and ``extra_eval`` (e.g.
    ``ema_top1``, ``experts_used``), empty in epochs without evaluation. The file is rewritten
    atomically each epoch.

    Args:
        path: The CSV file; kept rows are read back when it exists (a resumed run).
        extra_eval: More evaluation metrics to give a column.
    """

    def __init__(self, path: PathLike, extra_eval: Sequence[str] = ()):
        self.path = Path(path)
        self.columns = ['epoch', 'train_loss', 'lr', 'epoch_time_s'] + [
            f'eval_{k}' for k in (*SUMMARY_EVAL_KEYS, *extra_eval)]
        self.rows: list = []
        if self.path.is_file():
            with self.path.open(encoding='utf-8', newline='') as f:
                self.rows = [row for row in csv.DictReader(f)]

    def epoch_minutes(self) -> Optional[float]:
        """Minutes of training and evaluation summed over the recorded epochs, resumes included (an epoch
        recorded twice counts once, its last row); None when a row lacks its ``epoch_time_s``."""
        seconds = {}
        for row in self.rows:
            try:
                seconds[int(row['epoch'])] = float(row['epoch_time_s'])
            except (KeyError, TypeError, ValueError):
                return None
        return sum(seconds.values()) / 60 if seconds else None

    def truncate(self, start_epoch: int) -> None:
        """Forget rows of epochs >= ``start_epoch`` (a resumed run redoes them)."""
        kept = [r for r in self.rows if str(r.get('epoch', '')).isdigit() and int(r['epoch']) < start_epoch]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write()

    def append(self, epoch: int, train_loss: float, lr: float, epoch_time_s: float,
               eval_metrics: Optional[Mapping[str, Any]] = None) -> None:
        row = {'epoch': epoch, 'train_loss': f'{train_loss:.6g}', 'lr': f'{lr:.6g}', 'epoch_time_s': f'{epoch_time_s:.2f}'}
        for key, value in (eval_metrics or {}).items():
            if f'eval_{key}' in self.columns and isinstance(value, (int, float)) and math.isfinite(value):
                row[f'eval_{key}'] = f'{value:.4f}'
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction='ignore', lineterminator='\n')
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, '') for k in self.columns})
        write_text_atomic(self.path, buf.getvalue())
