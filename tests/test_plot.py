"""plot.py: the reliability diagram for partly empty, single-bin and empty tables; the figures' content; PNG / SVG /
PDF files; matplotlib without a display."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cmo.metrics import ClassAccuracy
from timm_cmo.plot import (
    BAR_COLOR, COUNT_COLOR, per_class_accuracy_figure, plot_per_class_accuracy, plot_reliability, reliability_figure)


def _colors(path):
    img = Image.open(path)
    img.verify()  # a well-formed PNG
    img = Image.open(path).convert('RGB')
    return img.size, {c for _, c in img.getcolors(maxcolors=1 << 20)}


def _metric(logits, target):
    metric = ClassAccuracy(logits.shape[1])
    metric.update(logits, target)
    return metric


def test_partly_empty_bins(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 3
    target = torch.randint(0, 10, (2000,), generator=g)
    cal = _metric(logits, target).calibration()
    assert (cal['count'] == 0).any() and (cal['count'] > 0).sum() >= 5
    path = tmp_path / 'reliability.png'
    plot_reliability(path, cal, title='random logits')
    (w, h), colors = _colors(path)
    assert 350 < w < 1000 and 450 < h < 1200
    assert BAR_COLOR in colors and COUNT_COLOR in colors
    assert not list(tmp_path.glob('.tmp-*'))  # atomic save left no temporary file


def test_all_samples_in_one_bin_and_no_samples(tmp_path):
    # every sample ~1-confident and wrong: one bin, accuracy 0 (no accuracy bar), a full-height gap
    cal = _metric(torch.tensor([[30., 0., 0.]] * 50), torch.tensor([1, 2] * 25)).calibration()
    assert cal['count'][-1] == 50 and cal['count'][:-1].sum() == 0
    plot_reliability(tmp_path / 'one.png', cal)
    (w, h), colors = _colors(tmp_path / 'one.png')
    assert 350 < w < 1000 and 450 < h < 1200 and COUNT_COLOR in colors and BAR_COLOR in colors  # legend swatch
    # every sample right: accuracy bar in the last bin
    cal = _metric(torch.tensor([[30., 0., 0.]] * 7), torch.zeros(7, dtype=torch.long)).calibration()
    plot_reliability(tmp_path / 'right.png', cal)
    empty = ClassAccuracy(3).calibration()
    assert empty['samples'] == 0
    plot_reliability(tmp_path / 'empty.png', empty, title='no samples yet')
    (we, he), _ = _colors(tmp_path / 'empty.png')
    assert (we, he) == (w, h)  # same layout
    texts = [t.get_text() for ax in reliability_figure(empty).axes for t in ax.texts]
    assert 'no samples' in texts


def test_plain_mapping_without_ece_and_many_bins(tmp_path):
    edges = np.linspace(0, 1, 51)
    count = np.zeros(50, dtype=np.int64)
    count[10:40] = np.arange(30) * 1000
    acc = np.where(count > 0, np.linspace(0, 1, 50), np.nan)
    conf = np.where(count > 0, (edges[:-1] + edges[1:]) / 2, np.nan)
    plot_reliability(tmp_path / 'fifty.png', dict(edges=edges, count=count, accuracy=acc, confidence=conf))
    assert _colors(tmp_path / 'fifty.png')[0][0] > 350


@pytest.mark.parametrize('bins,message', [
    (dict(edges=[0, 1], count=[1]), 'accuracy'),
    (dict(edges=[0, 0.5, 1], count=[1], accuracy=[1.], confidence=[1.]), 'edges'),
    (dict(edges=[0, 0.7, 0.5], count=[1, 1], accuracy=[1., 1.], confidence=[1., 1.]), 'increase'),
    (dict(edges=[0, 0.5, 1], count=[1, -1], accuracy=[1., 1.], confidence=[1., 1.]), 'non-negative'),
])
def test_bad_bins(tmp_path, bins, message):
    with pytest.raises(ValueError, match=message):
        plot_reliability(tmp_path / 'x.png', bins)


def test_long_titles_fit_the_image(tmp_path):
    """A title longer than the plot is wrapped, never cut at the image's edges."""
    title = ('mini CIFAR-10-LT: CE-DRW (1 seed) vs CE-DRW + ROS (1 seed) vs CE-DRW + Remix (1 seed) vs '
             'CE-DRW + CMO (1 seed) vs CE-DRW + CMO + LAS (1 seed)')
    g = torch.Generator().manual_seed(0)
    cal = _metric(torch.randn(500, 10, generator=g) * 3, torch.randint(0, 10, (500,), generator=g)).calibration()
    plot_reliability(tmp_path / 'rel.png', cal, title=title)
    plot_per_class_accuracy(tmp_path / 'acc.png', {f'run {i}': [80, 60, 40, 20, 10] for i in range(5)},
                            [500, 200, 100, 30, 10], title=title)
    for name in ('rel.png', 'acc.png'):
        img = np.asarray(Image.open(tmp_path / name).convert('RGB'))
        band = img[5:40]  # the title's rows
        assert (band[:, :4] == 255).all() and (band[:, -4:] == 255).all(), name  # blank margins
        assert (band < 128).any(), name  # the title is drawn


def test_per_class_figure_draws_the_sorted_accuracies_and_groups():
    """The bars are the accuracies sorted by training images (NaN: none), one colour per run; the bands are the
    shot groups; the count line has the counts; the legend names every run and group with its class count."""
    counts = [5, 500, 50, 120, 10]
    acc = {'CE': [10., 90., 50., float('nan'), 20.], 'CE + CMO': [30., 95., 60., 70., 40.]}
    fig = per_class_accuracy_figure(acc, counts, ['e', 'a', 'c', 'b', 'd'], title='T')
    ax, ax2 = fig.axes
    bars = [p for p in ax.patches if p.get_height() > 0 and p.get_y() == 0 and p.get_width() < 1]
    by_color = {}
    for p in bars:
        by_color.setdefault(tuple(round(c * 255) for c in p.get_facecolor()[:3]), []).append(p)
    first = sorted(by_color[BAR_COLOR], key=lambda p: p.get_x())
    second = sorted(by_color[(44, 160, 44)], key=lambda p: p.get_x())
    assert [p.get_height() for p in first] == [90., 50., 20., 10.]  # class order a, b (NaN), c, d, e
    assert [p.get_height() for p in second] == [95., 70., 60., 40., 30.]
    assert all(0 < b.get_x() - a.get_x() < 0.5 for a, b in zip(first[:1], second[:1]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ['a', 'b', 'c', 'd', 'e']
    assert ax2.get_yscale() == 'log' and list(ax2.lines[0].get_ydata()) == [500, 120, 50, 10, 5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ['CE', 'CE + CMO', 'training images', 'many (>100): 2 classes', 'medium (20-100): 1 class',
                      'few (<20): 2 classes']
    assert fig.get_suptitle() == 'T'


@pytest.mark.parametrize('fmt,magic', [('png', b'\x89PNG'), ('svg', b'<?xml'), ('pdf', b'%PDF')])
def test_formats_by_suffix_and_reproducible(tmp_path, fmt, magic):
    cal = _metric(torch.randn(300, 5, generator=torch.Generator().manual_seed(1)) * 3,
                  torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(2))).calibration()
    for name in ('a', 'b'):
        plot_per_class_accuracy(tmp_path / f'{name}.{fmt}', [80, 60, 40], [300, 60, 5], ['x', 'y', 'z'], title='t')
        plot_reliability(tmp_path / f'rel_{name}.{fmt}', cal, title='t')
    for name in ('a', 'rel_a'):
        data = (tmp_path / f'{name}.{fmt}').read_bytes()
        assert data.startswith(magic) and len(data) > 5000
        assert data == (tmp_path / f'{name.replace("a", "b")}.{fmt}').read_bytes()  # no dates: the same bytes
    if fmt == 'svg':
        assert b'training images (log scale)' in (tmp_path / 'a.svg').read_bytes()
    with pytest.raises(ValueError, match='png, svg, pdf'):
        plot_reliability(tmp_path / 'x.jpg', cal)
    assert not list(tmp_path.glob('.*'))  # atomic saves left no temporary files


def test_no_display_and_no_pyplot():
    """Plotting with a GUI backend asked for and no display: the files are drawn, pyplot is never imported."""
    import subprocess
    import sys
    code = ('import sys, tempfile, os\n'
            'from timm_cmo.plot import plot_per_class_accuracy\n'
            'd = tempfile.mkdtemp()\n'
            'plot_per_class_accuracy(os.path.join(d, "p.png"), [50, 20], [100, 10])\n'
            'assert os.path.getsize(os.path.join(d, "p.png")) > 1000\n'
            'assert "matplotlib.pyplot" not in sys.modules\n'
            'print("OK")\n')
    env = {k: v for k, v in os.environ.items() if k != 'DISPLAY'}
    env['MPLBACKEND'] = 'TkAgg'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-2000:]
