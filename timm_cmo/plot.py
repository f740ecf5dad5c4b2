"""Plots of a long-tailed evaluation, drawn with Pillow only.

:func:`plot_per_class_accuracy` writes a PNG with the classes sorted by training images along x,
per-class top-1 accuracy as bars (left axis, 0-100 %), the training-image count per class as a line
on a log-scaled right axis, and the many / medium / few shot groups shaded. Several runs (e.g. a method
with and without CMO) can share one plot as side-by-side bars.

:func:`plot_reliability` writes a reliability diagram of :meth:`timm_cmo.metrics.ClassAccuracy.calibration`:
per confidence bin the accuracy as a bar, the gap to the bin's mean confidence shaded, the diagonal of
perfect calibration, the samples per bin below, and ECE / MCE in the legend.
"""
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.dataset import shot_groups
from .files import atomic_write

__all__ = ['plot_per_class_accuracy', 'plot_reliability', 'BAR_COLOR', 'SERIES_COLORS', 'COUNT_COLOR', 'GROUP_COLORS',
           'GAP_COLOR']

Color = Tuple[int, int, int]
BAR_COLOR: Color = (31, 119, 180)
SERIES_COLORS: Tuple[Color, ...] = (BAR_COLOR, (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207),
                                    (188, 189, 34))
COUNT_COLOR: Color = (230, 110, 0)
GROUP_COLORS: Dict[str, Color] = {'many': (226, 238, 226), 'medium': (253, 244, 220), 'few': (250, 226, 226)}
GAP_COLOR: Color = (214, 39, 40)
_GAP_ALPHA = 110
_DIAGONAL = (90, 90, 90)
_TEXT = (30, 30, 30)
_GRID = (200, 200, 200)
_PLOT_HEIGHT = 360
_MAX_NAME_CHARS = 24
_LEGEND_ROW = 20


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit_title(title: str, max_width: float, size: int = 16, min_size: int = 12) -> Tuple[Any, List[str]]:
    """``(font, lines)``: the title on one line in the largest font from ``size`` down to ``min_size`` that
    fits ``max_width`` pixels, else wrapped at spaces in ``min_size``."""
    font = _font(size)
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        if not title or _text_size(font, title)[0] <= max_width:
            return font, [title] if title else []
    lines: List[str] = []
    for word in title.split(' '):
        if lines and _text_size(font, lines[-1] + ' ' + word)[0] <= max_width:
            lines[-1] += ' ' + word
        else:
            lines.append(word)
    return font, lines


def _title_line_step(font) -> int:
    """Pixels from one title line to the next."""
    return _text_size(font, 'Ag')[1] + 5


def _title_height(font, lines: List[str]) -> int:
    """Pixels the title's lines take, with the space below them (0 without a title)."""
    return len(lines) * _title_line_step(font) + 7 if lines else 0


def _text_size(font, text: str) -> Tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _draw_text(
        img: Image.Image,
        xy: Tuple[float, float],
        text: str,
        font,
        fill: Color = _TEXT,
        anchor: str = 'lt',
        angle: int = 0,
) -> None:
    """Draw ``text`` with its box anchored at ``xy``; anchor is (l|m|r)(t|m|b) of the (rotated) box."""
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left, bottom - top
    if w <= 0 or h <= 0:
        return
    mask = Image.new('L', (w, h), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    if angle:
        mask = mask.rotate(angle, expand=True)
    w, h = mask.size
    x = xy[0] - {'l': 0, 'm': w / 2, 'r': w}[anchor[0]]
    y = xy[1] - {'t': 0, 'm': h / 2, 'b': h}[anchor[1]]
    img.paste(Image.new('RGB', mask.size, fill), (int(round(x)), int(round(y))), mask)


def _nice_step(span: int, target: int = 10) -> int:
    raw = max(1., span / target)
    base = 10 ** math.floor(math.log10(raw))
    return int(next(m * base for m in (1, 2, 5, 10) if m * base >= raw))


def _fmt_count(n: float) -> str:
    for div, suffix in ((1e6, 'M'), (1e3, 'k')):
        if n >= div:
            return f'{n / div:g}{suffix}'
    return f'{n:g}'


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS - 3] + '...'


def _legend_items(
        series: Sequence[str], groups: Dict[str, List[int]], many: int, few: int,
) -> List[Tuple[str, str, Color]]:
    bounds = {'many': f'>{many}', 'medium': f'{few}-{many}', 'few': f'<{few}'}
    items = [('bar', label, color) for label, color in zip(series, SERIES_COLORS)]
    items += [('line', 'training images', COUNT_COLOR)]
    items += [('box', f'{name} ({bounds[name]}): {len(groups[name])} classes', GROUP_COLORS[name]) for name in groups]
    return items


def _legend_width(font, label: str) -> int:
    return 20 + _text_size(font, label)[0] + 18


def _legend_rows(items, font, max_width: int) -> List[list]:
    """Greedy wrap of legend items into rows no wider than ``max_width``."""
    rows, width = [[]], 0
    for item in items:
        w = _legend_width(font, item[1])
        if rows[-1] and width + w > max_width:
            rows.append([])
            width = 0
        rows[-1].append(item)
        width += w
    return rows


def plot_per_class_accuracy(
        path: Union[str, os.PathLike],
        accuracy: Union[Sequence[float], Mapping[str, Sequence[float]]],
        train_counts: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        title: str = '',
        many: int = 100,
        few: int = 20,
) -> None:
    """Write a PNG of per-class top-1 accuracy against training images (atomically).

    Args:
        path: Output PNG path.
        accuracy: (C,) per-class top-1 accuracy in % (NaN: no test samples, no bar), or a mapping
            ``{label: (C,) accuracy}`` of up to 6 runs drawn as side-by-side bars in one colour each.
        train_counts: (C,) training images per class; classes are sorted by it, descending (stable).
        class_names: Class names in index order, used as x labels when C <= 30 (else rank ticks).
        title: Plot title.
        many, few: Shot-group thresholds (many > ``many``, few < ``few`` training images).

    Works for C from 1 to tens of thousands: the plot widens with C up to a cap; when there are more
    classes than pixel columns, each 1 px bar shows the mean accuracy of the classes it covers.
    """
    if isinstance(accuracy, Mapping):
        labels = [str(k) for k in accuracy]
        if not 1 <= len(labels) <= len(SERIES_COLORS):
            raise ValueError(f'accuracy has {len(labels)} runs; 1 to {len(SERIES_COLORS)} can be drawn')
        runs = [np.asarray(v, dtype=np.float64) for v in accuracy.values()]
        if len({len(a) for a in runs}) > 1:
            raise ValueError(f'runs of different lengths: {dict(zip(labels, map(len, runs)))}')
        acc = np.stack(runs)
    else:
        labels = ['top-1 accuracy']
        acc = np.asarray(accuracy, dtype=np.float64)[None]
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

    f_label, f_tick = _font(13), _font(11)
    pw = int(min(1600, max(480, (40 + 12 * (num_series - 1)) * num_classes if show_names
                           else 600 + 2 * num_series * num_classes)))
    ph = _PLOT_HEIGHT if pw <= 800 else _PLOT_HEIGHT + 60
    slot = pw / num_classes
    label_h = _text_size(f_tick, '0')[1]

    # x labels: horizontal when they fit their slot, vertical otherwise
    vertical = False
    if show_names:
        widest = max(_text_size(f_tick, n)[0] for n in names)
        vertical = widest > slot - 4
        x_labels_h = widest if vertical else label_h
    else:
        x_labels_h = label_h
    left, right = 70, 78
    groups = shot_groups(counts, many=many, few=few)._asdict()
    legend = _legend_items(labels, groups, many, few)
    rows = _legend_rows(legend, f_tick, left + pw + right - left - 10)
    f_title, title_lines = _fit_title(title, left + pw + right - 20)
    legend_y = 16 + _title_height(f_title, title_lines)
    top = legend_y + _LEGEND_ROW * len(rows) + 10
    bottom_margin = 8 + x_labels_h + 10 + _text_size(f_label, 'X')[1] + 12
    width, height = left + pw + right, top + ph + bottom_margin
    x0, y0, y1 = left, top, top + ph  # plot box: x0..x0+pw, y0 (100 %) .. y1 (0 %)

    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)

    def xpos(rank: float) -> float:
        return x0 + rank * slot

    # shot groups (contiguous in sorted order)
    for name, members in groups.items():
        if members:
            draw.rectangle([xpos(members[0]), y0, xpos(members[-1] + 1) - 1, y1], fill=GROUP_COLORS[name])
    for members in list(groups.values())[1:]:
        if members and members[0] > 0:
            draw.line([xpos(members[0]), y0, xpos(members[0]), y1], fill=(150, 150, 150), width=1)

    # left axis: accuracy grid and ticks
    for v in range(0, 101, 20):
        y = y1 - v / 100 * ph
        draw.line([x0, y, x0 + pw, y], fill=_GRID, width=1)
        draw.line([x0 - 5, y, x0, y], fill=_TEXT, width=1)
        _draw_text(img, (x0 - 8, y), str(v), f_tick, anchor='rm')
    _draw_text(img, (16, y0 + ph / 2), 'top-1 accuracy (%)', f_label, anchor='lm', angle=90)

    # bars: one group per class, or per pixel column group (mean over its classes) when classes outnumber
    # pixels; a group holds one bar per run
    num_cols = num_classes if num_classes * num_series <= pw else pw // num_series
    column = np.arange(num_classes) * num_cols // num_classes
    if num_cols == num_classes:
        heights = acc
    else:
        ok = ~np.isnan(acc)
        total = np.stack([np.bincount(column[k], weights=a[k], minlength=num_cols) for a, k in zip(acc, ok)])
        n = np.stack([np.bincount(column[k], minlength=num_cols) for k in ok])
        with np.errstate(invalid='ignore', divide='ignore'):
            heights = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    col_w = pw / num_cols
    gap = 0.1 * col_w if col_w >= 4 * num_series else 0.
    bar_w = (col_w - 2 * gap) / num_series
    for s, color in zip(range(num_series), SERIES_COLORS):
        for c in range(num_cols):
            a = x0 + c * col_w + gap + s * bar_w
            b, h = a + bar_w, heights[s, c]
            if np.isnan(h) and b - a >= 20:
                _draw_text(img, ((a + b) / 2, y1 - 4), 'n/a', f_tick, fill=(120, 120, 120), anchor='mb')
            if np.isnan(h) or h <= 0:
                continue
            xa = int(math.floor(a))
            xb = max(xa, int(math.ceil(b)) - 1)
            top = min(y1 - 1, y1 - min(h, 100.) / 100 * ph)  # bars under one pixel (e.g. 0.1 %) stay one pixel tall
            draw.rectangle([xa, top, xb, y1 - 1], fill=color)

    # right axis: training images on a log scale
    positive = counts[counts > 0]
    lo_exp = int(math.floor(math.log10(positive.min()))) if len(positive) else 0
    hi_exp = int(math.ceil(math.log10(positive.max()))) if len(positive) else 1
    hi_exp = max(hi_exp, lo_exp + 1)

    def ycount(n: float) -> float:
        return y1 - (math.log10(max(n, 10 ** lo_exp)) - lo_exp) / (hi_exp - lo_exp) * ph

    xr = x0 + pw
    for e in range(lo_exp, hi_exp + 1):
        draw.line([xr, ycount(10 ** e), xr + 6, ycount(10 ** e)], fill=COUNT_COLOR, width=1)
        _draw_text(img, (xr + 9, ycount(10 ** e)), _fmt_count(10 ** e), f_tick, fill=COUNT_COLOR, anchor='lm')
        if e < hi_exp:
            for m in range(2, 10):
                draw.line([xr, ycount(m * 10 ** e), xr + 3, ycount(m * 10 ** e)], fill=COUNT_COLOR, width=1)
    _draw_text(img, (width - 14, y0 + ph / 2), 'training images (log scale)', f_label, fill=COUNT_COLOR,
               anchor='rm', angle=270)
    points = [(xpos(r + 0.5), ycount(n)) for r, n in enumerate(counts)]
    if len(points) > 1:
        draw.line(points, fill=COUNT_COLOR, width=2, joint='curve')
    if num_classes <= 60:
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COUNT_COLOR)

    # plot frame and x axis
    draw.rectangle([x0, y0, x0 + pw, y1], outline=_TEXT, width=1)
    ty = y1 + 8
    if show_names:
        for r, name in enumerate(names):
            draw.line([xpos(r + 0.5), y1, xpos(r + 0.5), y1 + 4], fill=_TEXT, width=1)
            if vertical:
                _draw_text(img, (xpos(r + 0.5), ty), name, f_tick, anchor='mt', angle=90)
            else:
                _draw_text(img, (xpos(r + 0.5), ty), name, f_tick, anchor='mt')
        x_title = 'classes, sorted by training images'
    else:
        step = _nice_step(num_classes)
        for r in range(0, num_classes, step):
            draw.line([xpos(r + 0.5), y1, xpos(r + 0.5), y1 + 4], fill=_TEXT, width=1)
            _draw_text(img, (xpos(r + 0.5), ty), str(r), f_tick, anchor='mt')
        x_title = 'class rank by training images (0 = most)'
    _draw_text(img, (x0 + pw / 2, ty + x_labels_h + 10), x_title, f_label, anchor='mt')

    _draw_title_and_legend(img, title_lines, f_title, rows, f_tick, x0, legend_y)

    _save_png(img, path)


def _fmt_samples(n: int) -> str:
    """Compact sample count: 999, 1.2k, 12k, 1.2M."""
    for div, suffix in ((1e6, 'M'), (1e3, 'k')):
        if n >= div:
            return f'{n / div:.1f}{suffix}' if n < 10 * div else f'{n / div:.0f}{suffix}'
    return str(int(n))


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


def plot_reliability(path: Union[str, os.PathLike], bins: Mapping[str, Any], title: str = '') -> None:
    """Write a PNG reliability diagram (atomically).

    Args:
        path: Output PNG path.
        bins: :meth:`timm_cmo.metrics.ClassAccuracy.calibration` output: ``edges`` (n + 1,) in [0, 1],
            ``count`` (n,), ``accuracy`` and ``confidence`` (n,) fractions (NaN: empty bin); ``ece`` and
            ``mce`` in % are shown when present (else computed from the bins).
        title: Plot title.

    The top panel has, per non-empty bin, the accuracy as a bar, the gap between accuracy and mean
    confidence shaded (red), and the diagonal of perfect calibration; the bottom panel has the samples per
    bin (bars scaled to the fullest bin, counts written above them).
    """
    edges, count, acc, conf = _check_bins(bins)
    num_bins = len(count)
    used = count > 0
    total = count.sum()
    gaps = np.abs(acc - conf)
    ece = bins.get('ece') if isinstance(bins, Mapping) else None
    mce = bins.get('mce') if isinstance(bins, Mapping) else None
    if ece is None or mce is None:
        ok = used & np.isfinite(gaps)
        ece = 100. * float(np.sum(gaps[ok] * count[ok]) / total) if total else float('nan')
        mce = 100. * float(gaps[ok].max()) if ok.any() else float('nan')

    f_label, f_tick = _font(13), _font(11)
    pw = ph = 380
    hist_h = 100
    left, right = 70, 24
    legend = [('bar', 'accuracy', BAR_COLOR), ('gap', 'gap to confidence', GAP_COLOR),
              ('line', 'perfect calibration', _DIAGONAL)]
    rows = _legend_rows(legend, f_tick, pw)
    f_title, title_lines = _fit_title(title, left + pw + right - 20)
    metrics = (f'ECE {ece:.2f}%   MCE {mce:.2f}%   {int(total)} samples' if total
               else 'no samples')
    legend_y = 16 + _title_height(f_title, title_lines)
    metrics_y = legend_y + _LEGEND_ROW * len(rows)
    top = metrics_y + _LEGEND_ROW + 8
    label_h = _text_size(f_tick, '0')[1]
    gap_between = 18
    y0, y1 = top, top + ph  # reliability panel: accuracy 1 at y0, 0 at y1
    h0, h1 = y1 + gap_between, y1 + gap_between + hist_h  # histogram panel
    width = left + pw + right
    height = h1 + 8 + label_h + 10 + _text_size(f_label, 'X')[1] + 12
    x0 = left

    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)

    def xpos(v: float) -> float:
        return x0 + v * pw

    def ypos(v: float) -> float:
        return y1 - v * ph

    # grid and left axis
    for k in range(6):
        v = k / 5
        draw.line([x0, ypos(v), x0 + pw, ypos(v)], fill=_GRID, width=1)
        draw.line([xpos(v), y0, xpos(v), y1], fill=_GRID, width=1)
        draw.line([x0 - 5, ypos(v), x0, ypos(v)], fill=_TEXT, width=1)
        _draw_text(img, (x0 - 8, ypos(v)), f'{v:.1f}', f_tick, anchor='rm')
    _draw_text(img, (16, y0 + ph / 2), 'accuracy', f_label, anchor='lm', angle=90)

    # accuracy bars, then the shaded gaps on a translucent overlay
    bar_gap = 1 if (edges[1:] - edges[:-1]).min() * pw >= 6 else 0
    for b in np.flatnonzero(used):
        if not np.isfinite(acc[b]):
            continue
        xa, xb = int(round(xpos(edges[b]))) + bar_gap, int(round(xpos(edges[b + 1]))) - bar_gap
        if acc[b] > 0:
            draw.rectangle([xa, ypos(min(acc[b], 1.)), max(xa, xb - 1), y1 - 1], fill=BAR_COLOR)
    overlay = Image.new('RGBA', img.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    for b in np.flatnonzero(used):
        if not (np.isfinite(acc[b]) and np.isfinite(conf[b])):
            continue
        xa, xb = int(round(xpos(edges[b]))) + bar_gap, int(round(xpos(edges[b + 1]))) - bar_gap
        lo, hi = sorted((min(max(acc[b], 0.), 1.), min(max(conf[b], 0.), 1.)))
        odraw.rectangle([xa, ypos(hi), max(xa, xb - 1), ypos(lo)], fill=GAP_COLOR + (_GAP_ALPHA,),
                        outline=GAP_COLOR + (255,))
    img.paste(Image.alpha_composite(img.convert('RGBA'), overlay).convert('RGB'))
    draw = ImageDraw.Draw(img)

    # the diagonal, dashed
    steps = 41  # odd: the dashes start and end on the corners
    for k in range(0, steps, 2):
        a, b = k / steps, (k + 1) / steps
        draw.line([xpos(a), ypos(a), xpos(b), ypos(b)], fill=_DIAGONAL, width=2)
    draw.rectangle([x0, y0, x0 + pw, y1], outline=_TEXT, width=1)

    # histogram of samples per bin
    peak = count.max()
    draw.rectangle([x0, h0, x0 + pw, h1], outline=_TEXT, width=1)
    for b in range(num_bins):
        xa, xb = xpos(edges[b]), xpos(edges[b + 1])
        if count[b] > 0:
            bar_top = h1 - max(1., (hist_h - label_h - 12) * count[b] / peak)
            draw.rectangle([int(round(xa)) + bar_gap, bar_top, max(int(round(xa)) + bar_gap,
                            int(round(xb)) - bar_gap - 1), h1 - 1], fill=COUNT_COLOR)
            label = _fmt_samples(int(count[b]))
            if _text_size(f_tick, label)[0] <= xb - xa:
                _draw_text(img, ((xa + xb) / 2, bar_top - 2), label, f_tick, anchor='mb')
            elif xb - xa >= label_h:
                _draw_text(img, ((xa + xb) / 2, bar_top - 2), label, f_tick, anchor='mb', angle=90)
    _draw_text(img, (16, (h0 + h1) / 2), 'samples', f_label, fill=COUNT_COLOR, anchor='lm', angle=90)

    # x axis under the histogram
    ty = h1 + 8
    for k in range(6):
        v = k / 5
        draw.line([xpos(v), h1, xpos(v), h1 + 4], fill=_TEXT, width=1)
        _draw_text(img, (xpos(v), ty), f'{v:.1f}', f_tick, anchor='mt')
    _draw_text(img, (x0 + pw / 2, ty + label_h + 10), 'confidence (max softmax probability)', f_label, anchor='mt')

    # title, legend and the calibration errors
    _draw_title_and_legend(img, title_lines, f_title, rows, f_tick, x0, legend_y)
    _draw_text(img, (x0, metrics_y + 7), metrics, f_label, anchor='lm')

    _save_png(img, path)


def _draw_title_and_legend(img: Image.Image, title_lines: List[str], f_title, rows: List[list], font, x0: float,
                           legend_y: float) -> None:
    """The centred title (lines from :func:`_fit_title`) and the legend rows (from :func:`_legend_rows`) of a plot.

    Legend kinds: ``line`` (a line sample), ``box`` (a shaded area, grey outline), ``gap`` (a light
    box outlined in the colour), anything else (a filled box, e.g. ``bar``).
    """
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title_lines):
        _draw_text(img, (img.width / 2, 12 + i * _title_line_step(f_title)), line, f_title, anchor='mt')
    for r, row in enumerate(rows):
        lx, ly = x0, legend_y + r * _LEGEND_ROW
        for kind, label, color in row:
            if kind == 'line':
                draw.line([lx, ly + 7, lx + 16, ly + 7], fill=color, width=2)
            elif kind == 'gap':
                draw.rectangle([lx, ly + 1, lx + 14, ly + 13], fill=(240, 170, 170), outline=color)
            else:
                draw.rectangle([lx, ly + 1, lx + 14, ly + 13], fill=color,
                               outline=(150, 150, 150) if kind == 'box' else None)
            _draw_text(img, (lx + 20, ly + 7), label, font, anchor='lm')
            lx += _legend_width(font, label)


def _save_png(img: Image.Image, path: Union[str, os.PathLike]) -> None:
    """Save as PNG atomically (:func:`~timm_cmo.files.atomic_write`)."""
    with atomic_write(path, 'wb') as f:
        img.save(f, format='PNG')
