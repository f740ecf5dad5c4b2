"""Plots of a long-tailed evaluation, drawn with matplotlib (its Agg, SVG and PDF backends: never a display).

:func:`per_class_accuracy_figure` draws the classes sorted by training images along x, per-class top-1
accuracy as bars (left axis, 0-100 %), the training images per class as a line on a log-scaled right axis, and
the many / medium / few shot groups as shaded bands. Several runs (e.g. a method with and without CMO) share
one plot as side-by-side bars.

:func:`reliability_figure` draws a reliability diagram of :meth:`timm_cmo.metrics.ClassAccuracy.calibration`:
per confidence bin the accuracy as a bar, the gap to the bin's mean confidence shaded, the diagonal of perfect
calibration, the samples per bin in a panel below, and ECE / MCE above.

:func:`plot_per_class_accuracy` and :func:`plot_reliability` save them (atomically) as PNG, SVG or PDF, chosen by
the file's suffix (:data:`PLOT_FORMATS`).
"""
import math
import os
import textwrap
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .data.dataset import shot_groups
from .files import atomic_write

__all__ = ['plot_per_class_accuracy', 'plot_reliability', 'per_class_accuracy_figure', 'reliability_figure',
           'save_figure', 'PLOT_FORMATS', 'BAR_COLOR', 'SERIES_COLORS', 'COUNT_COLOR', 'GROUP_COLORS', 'GAP_COLOR']

Color = Tuple[int, int, int]
BAR_COLOR: Color = (31, 119, 180)
SERIES_COLORS: Tuple[Color, ...] = (BAR_COLOR, (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207),
                                    (188, 189, 34))
COUNT_COLOR: Color = (230, 110, 0)
GROUP_COLORS: Dict[str, Color] = {'many': (226, 238, 226), 'medium': (253, 244, 220), 'few': (250, 226, 226)}
GAP_COLOR: Color = (214, 39, 40)
PLOT_FORMATS = ('png', 'svg', 'pdf')
_DIAGONAL = (90, 90, 90)
_TEXT = (30, 30, 30)
_MAX_NAME_CHARS = 24
_MAX_COLUMNS = 800  # more classes than this: each bar shows the mean accuracy of the classes it covers
_DPI = 100


def _rgb(color: Color, alpha: Optional[float] = None) -> Tuple[float, ...]:
    rgb = tuple(c / 255 for c in color)
    return rgb if alpha is None else rgb + (alpha,)


def _figure(width: float, height: float):
    """A matplotlib Figure (constrained layout) on no GUI backend: nothing global (pyplot) is touched."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=_DPI, layout='constrained')


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS - 3] + '...'


def _title(fig, title: str, width_in: float, fontsize: float = 12) -> None:
    """The title on top, wrapped at spaces to the figure's width (DejaVu Sans: about 0.6 em per character)."""
    if title:
        chars = max(20, int((width_in - 0.3) * 72 / (0.6 * fontsize)))
        fig.suptitle('\n'.join(textwrap.wrap(title, chars)), fontsize=fontsize)


def _fmt_count(n: float, _pos=None) -> str:
    for div, suffix in ((1e6, 'M'), (1e3, 'k')):
        if n >= div:
            return f'{n / div:g}{suffix}'
    return f'{n:g}'


def _series(accuracy) -> Tuple[List[str], np.ndarray]:
    if isinstance(accuracy, Mapping):
        labels = [str(k) for k in accuracy]
        if not 1 <= len(labels) <= len(SERIES_COLORS):
            raise ValueError(f'accuracy has {len(labels)} runs; 1 to {len(SERIES_COLORS)} can be drawn')
        runs = [np.asarray(v, dtype=np.float64) for v in accuracy.values()]
        if len({len(a) for a in runs}) > 1:
            raise ValueError(f'runs of different lengths: {dict(zip(labels, map(len, runs)))}')
        return labels, np.stack(runs)
    return ['top-1 accuracy'], np.asarray(accuracy, dtype=np.float64)[None]


def _column_means(acc: np.ndarray, num_cols: int) -> np.ndarray:
    """(S, C) -> (S, num_cols): the mean over the classes of each column (NaN-aware; NaN where none has a value)."""
    num_classes = acc.shape[1]
    column = np.arange(num_classes) * num_cols // num_classes
    ok = ~np.isnan(acc)
    total = np.stack([np.bincount(column[k], weights=a[k], minlength=num_cols) for a, k in zip(acc, ok)])
    n = np.stack([np.bincount(column[k], minlength=num_cols) for k in ok])
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def per_class_accuracy_figure(
        accuracy: Union[Sequence[float], Mapping[str, Sequence[float]]],
        train_counts: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        title: str = '',
        many: int = 100,
        few: int = 20,
):
    """The figure of per-class top-1 accuracy against training images (a ``matplotlib.figure.Figure``).

    Args:
        accuracy: (C,) per-class top-1 accuracy in % (NaN: no test samples, no bar), or a mapping
            ``{label: (C,) accuracy}`` of up to 6 runs drawn as side-by-side bars in one colour each.
        train_counts: (C,) training images per class; classes are sorted by it, descending (stable).
        class_names: Class names in index order, used as x labels when C <= 30 (else rank ticks).
        title: Plot title (wrapped to the figure's width).
        many, few: Shot-group thresholds (many > ``many``, few < ``few`` training images).

    Works for C from 1 to tens of thousands: the figure widens with C up to 16 inches; with more than 800
    classes each bar shows the mean accuracy of the classes it covers.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    labels, acc = _series(accuracy)
    counts = np.asarray(train_counts, dtype=np.int64)
    num_series, num_classes = acc.shape
    if num_classes < 1 or len(counts) != num_classes:
        raise ValueError(f'accuracy ({num_classes}) and train_counts ({len(counts)}) must have the same length >= 1')
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
    order = np.argsort(-counts, kind='stable')
    acc, counts = acc[:, order], counts[order]
    names = [_short(str(class_names[i])) if class_names is not None else str(i) for i in order]
    show_names = num_classes <= 30

    per_class_in = 0.5 + 0.18 * (num_series - 1)
    width = float(np.clip(2.2 + per_class_in * num_classes if show_names else 8 + num_classes / 100, 6.4, 16))
    fig = _figure(width, 5.2 if width <= 9 else 5.6)
    _title(fig, title, width)
    ax = fig.add_subplot()
    ax.set_xlim(0, num_classes)
    ax.set_ylim(0, 100)
    ax.set_axisbelow(True)
    ax.grid(axis='y', color='#c8c8c8', linewidth=0.8)

    groups = shot_groups(counts, many=many, few=few)._asdict()
    bounds = {'many': f'>{many}', 'medium': f'{few}-{many}', 'few': f'<{few}'}
    for name, members in groups.items():
        if members:
            ax.axvspan(members[0], members[-1] + 1, color=_rgb(GROUP_COLORS[name]), zorder=0, linewidth=0)
            if members[0] > 0:
                ax.axvline(members[0], color='#969696', linewidth=0.8, zorder=0.5)

    num_cols = num_classes if num_classes <= _MAX_COLUMNS else _MAX_COLUMNS
    heights = acc if num_cols == num_classes else _column_means(acc, num_cols)
    col_w = num_classes / num_cols
    gap = 0.1 * col_w if num_cols <= 200 else 0.
    bar_w = (col_w - 2 * gap) / num_series
    left = np.arange(num_cols) * col_w + gap
    for s in range(num_series):
        h = np.clip(heights[s], 0, 100)
        drawn = ~np.isnan(h)
        ax.bar(left[drawn] + s * bar_w, h[drawn], width=bar_w, align='edge', color=_rgb(SERIES_COLORS[s]),
               linewidth=0, zorder=2)
        if show_names and bar_w >= 0.4:
            for x in left[~drawn] + (s + 0.5) * bar_w:
                ax.text(x, 1.5, 'n/a', ha='center', va='bottom', fontsize=8, color='#787878', rotation=90, zorder=3)
    ax.set_ylabel('top-1 accuracy (%)')

    ax2 = ax.twinx()
    ax2.set_yscale('log')
    positive = counts[counts > 0]
    lo = 10 ** math.floor(math.log10(positive.min())) if len(positive) else 1
    hi = 10 ** math.ceil(math.log10(positive.max())) if len(positive) else 10
    ax2.set_ylim(lo, max(hi, 10 * lo))
    centres = np.arange(num_classes) + 0.5
    ax2.plot(centres, np.maximum(counts, lo), color=_rgb(COUNT_COLOR), linewidth=2, zorder=4,
             marker='o' if num_classes <= 60 else None, markersize=4)
    ax2.yaxis.set_major_formatter(FuncFormatter(_fmt_count))
    ax2.tick_params(axis='y', which='both', colors=_rgb(COUNT_COLOR))
    ax2.set_ylabel('training images (log scale)', color=_rgb(COUNT_COLOR))
    ax.set_zorder(ax2.get_zorder() - 1)  # bars under the line, bands under the bars
    ax2.patch.set_visible(False)

    if show_names:
        ax.set_xticks(centres)
        vertical = max(len(n) for n in names) * 0.075 > width / num_classes * 0.9
        ax.set_xticklabels(names, rotation=90 if vertical else 0, fontsize=9)
        ax.set_xlabel('classes, sorted by training images')
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f'{int(v)}'))
        ax.set_xlabel('class rank by training images (0 = most)')

    handles = [Patch(color=_rgb(c), label=label) for label, c in zip(labels, SERIES_COLORS)]
    handles.append(Line2D([], [], color=_rgb(COUNT_COLOR), linewidth=2, label='training images'))
    handles += [Patch(facecolor=_rgb(GROUP_COLORS[n]), edgecolor='#969696', label=f'{n} ({bounds[n]}): '
                      f'{len(m)} class{"" if len(m) == 1 else "es"}') for n, m in groups.items()]
    _legend_above(ax, handles, width)
    return fig


def _legend_above(ax, handles, width_in: float, fontsize: float = 9) -> None:
    """The legend in rows above the axes, as many columns as the widest entry allows in the figure's width."""
    char_in = fontsize * 0.55 / 72  # mean glyph width of DejaVu Sans
    entry_in = max(len(h.get_label()) for h in handles) * char_in + 0.55
    ncol = max(1, min(len(handles), int((width_in - 0.3) / entry_in)))
    ax.legend(handles=handles, loc='lower center', bbox_to_anchor=(0.5, 1.01), ncol=ncol, fontsize=fontsize,
              frameon=False, handlelength=1.5, columnspacing=1.0, borderaxespad=0.2)


def _check_bins(bins: Mapping[str, Sequence[float]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    for key in ('edges', 'count', 'accuracy', 'confidence'):
        if key not in bins:
            raise ValueError(f'bins has no {key!r}; pass ClassAccuracy.calibration()')
    edges = np.asarray(bins['edges'], dtype=np.float64)
    count = np.asarray(bins['count'], dtype=np.float64)
    acc = np.asarray(bins['accuracy'], dtype=np.float64)
    conf = np.asarray(bins['confidence'], dtype=np.float64)
    num_bins = len(count)
    if num_bins < 1 or len(edges) != num_bins + 1 or len(acc) != num_bins or len(conf) != num_bins:
        raise ValueError(f'bins needs num_bins + 1 edges and num_bins counts, accuracies and confidences, got '
                         f'{len(edges)}, {len(count)}, {len(acc)}, {len(conf)}')
    if not (np.all(np.diff(edges) > 0) and edges[0] >= 0 and edges[-1] <= 1):
        raise ValueError(f'bin edges must increase within [0, 1], got {edges.tolist()}')
    if np.any(count < 0) or not np.all(np.isfinite(count)):
        raise ValueError(f'bin counts must be finite and non-negative, got {count.tolist()}')
    return edges, count, acc, conf


def _fmt_samples(n: int) -> str:
    """Compact sample count: 999, 1.2k, 12k, 1.2M."""
    for div, suffix in ((1e6, 'M'), (1e3, 'k')):
        if n >= div:
            return f'{n / div:.1f}{suffix}' if n < 10 * div else f'{n / div:.0f}{suffix}'
    return str(int(n))


def reliability_figure(bins: Mapping[str, Any], title: str = ''):
    """The reliability diagram of calibration bins (a ``matplotlib.figure.Figure``).

    Args:
        bins: :meth:`timm_cmo.metrics.ClassAccuracy.calibration` output: ``edges`` (n + 1,) in [0, 1],
            ``count`` (n,), ``accuracy`` and ``confidence`` (n,) fractions (NaN: empty bin); ``ece`` and
            ``mce`` in % are shown when present (else computed from the bins).
        title: Plot title.

    The top panel has, per non-empty bin, the accuracy as a bar, the gap between accuracy and mean
    confidence shaded (red), and the diagonal of perfect calibration; the bottom panel has the samples per
    bin (counts written above the bars where they fit).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    edges, count, acc, conf = _check_bins(bins)
    used = count > 0
    total = count.sum()
    gaps = np.abs(acc - conf)
    ece = bins.get('ece') if isinstance(bins, Mapping) else None
    mce = bins.get('mce') if isinstance(bins, Mapping) else None
    if ece is None or mce is None:
        ok = used & np.isfinite(gaps)
        ece = 100. * float(np.sum(gaps[ok] * count[ok]) / total) if total else float('nan')
        mce = 100. * float(gaps[ok].max()) if ok.any() else float('nan')

    width = 5.2
    fig = _figure(width, 7.0)
    _title(fig, title, width)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=(4, 1.1)))
    widths = np.diff(edges)
    pad = 0.04 * widths if widths.min() * 380 >= 6 else 0. * widths
    ok = used & np.isfinite(acc)
    top.bar(edges[:-1][ok] + pad[ok], np.clip(acc[ok], 0, 1), width=widths[ok] - 2 * pad[ok], align='edge',
            color=_rgb(BAR_COLOR), linewidth=0, zorder=2)
    shaded = ok & np.isfinite(conf)
    lo = np.minimum(np.clip(acc, 0, 1), np.clip(conf, 0, 1))
    hi = np.maximum(np.clip(acc, 0, 1), np.clip(conf, 0, 1))
    top.bar(edges[:-1][shaded] + pad[shaded], (hi - lo)[shaded], bottom=lo[shaded], width=(widths - 2 * pad)[shaded],
            align='edge', facecolor=_rgb(GAP_COLOR, 0.35), edgecolor=_rgb(GAP_COLOR), linewidth=1, zorder=3)
    top.plot([0, 1], [0, 1], linestyle=(0, (5, 4)), color=_rgb(_DIAGONAL), linewidth=1.5, zorder=4)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel('accuracy')
    top.set_axisbelow(True)
    top.grid(color='#c8c8c8', linewidth=0.8)
    metrics = f'ECE {ece:.2f}%   MCE {mce:.2f}%   {int(total)} samples' if total else 'no samples'
    top.text(0.02, 0.97, metrics, transform=top.transAxes, ha='left', va='top', fontsize=10.5, zorder=5,
             bbox=dict(facecolor='white', edgecolor='#c8c8c8', boxstyle='round,pad=0.3'))
    handles = [Patch(color=_rgb(BAR_COLOR), label='accuracy'),
               Patch(facecolor=_rgb(GAP_COLOR, 0.35), edgecolor=_rgb(GAP_COLOR), label='gap to confidence'),
               Line2D([], [], linestyle=(0, (5, 4)), color=_rgb(_DIAGONAL), linewidth=1.5,
                      label='perfect calibration')]
    _legend_above(top, handles, width)

    peak = count.max() if total else 1.
    bottom.bar(edges[:-1][used] + pad[used], count[used], width=(widths - 2 * pad)[used], align='edge',
               color=_rgb(COUNT_COLOR), linewidth=0)
    bottom.set_ylim(0, peak * 1.35)
    bottom.set_yticks([])
    bottom.set_ylabel('samples', color=_rgb(COUNT_COLOR))
    label_fits = widths.min() >= 0.06
    for b in np.flatnonzero(used):
        if label_fits or widths[b] >= 0.03:
            bottom.text((edges[b] + edges[b + 1]) / 2, count[b] + 0.03 * peak, _fmt_samples(int(count[b])),
                        ha='center', va='bottom', fontsize=8, rotation=0 if label_fits else 90)
    bottom.set_xlabel('confidence (max softmax probability)')
    bottom.set_xticks(np.linspace(0, 1, 6))
    return fig


def save_figure(fig, path: Union[str, os.PathLike]) -> None:
    """Save ``fig`` atomically (:func:`~timm_cmo.files.atomic_write`) in the format of ``path``'s suffix
    (:data:`PLOT_FORMATS`), without a creation date (the same figure gives the same SVG / PDF bytes)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip('.').lower()
    if fmt not in PLOT_FORMATS:
        raise ValueError(f'{os.fspath(path)}: plots are written as {", ".join(PLOT_FORMATS)} (by the file suffix)')
    with atomic_write(path, 'wb') as f:
        if fmt == 'png':  # an RGB PNG (no alpha channel: the figure is opaque)
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from PIL import Image, PngImagePlugin
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            info = PngImagePlugin.PngInfo()
            info.add_text('Software', 'timm-cmo (matplotlib)')
            Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(f, format='PNG', pnginfo=info)
        else:
            import matplotlib
            with matplotlib.rc_context({'svg.hashsalt': 'timm-cmo'}):  # fixed SVG element ids
                fig.savefig(f, format=fmt, metadata={'Date': None} if fmt == 'svg' else {'CreationDate': None})


def plot_per_class_accuracy(
        path: Union[str, os.PathLike],
        accuracy: Union[Sequence[float], Mapping[str, Sequence[float]]],
        train_counts: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        title: str = '',
        many: int = 100,
        few: int = 20,
) -> None:
    """Write :func:`per_class_accuracy_figure` to ``path`` (PNG, SVG or PDF by its suffix; atomically)."""
    save_figure(per_class_accuracy_figure(accuracy, train_counts, class_names, title, many, few), path)


def plot_reliability(path: Union[str, os.PathLike], bins: Mapping[str, Any], title: str = '') -> None:
    """Write :func:`reliability_figure` to ``path`` (PNG, SVG or PDF by its suffix; atomically)."""
    save_figure(reliability_figure(bins, title), path)
