"""results.py (CSV / JSON / PNG round trip, Markdown tables) and plot.py (PNG content)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cmo.data import long_tail_counts
from timm_cmo.metrics import ClassAccuracy
from timm_cmo.plot import BAR_COLOR, SERIES_COLORS, plot_per_class_accuracy
from timm_cmo.results import (
    cpu_model, peak_rss_mib, read_results, results_table_markdown, to_json_safe, write_results,
)

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def evaluated(train_counts, seed=0, missing=()):
    """A ClassAccuracy filled with random logits; classes in ``missing`` get no test samples."""
    num_classes = len(train_counts)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (40 * num_classes,), generator=g)
    for c in missing:
        target[target == c] = (c + 1) % num_classes
    logits = torch.randn(len(target), num_classes, generator=g)
    logits[torch.arange(len(target)), target] += 2 * torch.rand(len(target), generator=g)
    metric = ClassAccuracy(num_classes)
    metric.update(logits, target)
    return metric


def test_write_read_round_trip(tmp_path):
    counts = [5000, 1000, 500, 200, 150, 120, 110, 105, 102, 101]  # all many-shot: medium/few empty
    metric = evaluated(counts, missing=(3,))
    summary, per_class = metric.summary(counts), metric.per_class()
    extra = dict(model='resnet32_cifar', dataset=dict(name='torch/cifar10', imb_ratio=np.float64(50.0)),
                 epoch=np.int64(199), best=dict(top1=float('nan'), epoch=3), config='')
    paths = write_results(tmp_path / 'run', summary, per_class, counts, CIFAR10, extra)
    assert set(paths) == {'csv', 'json', 'png'} and all(p.is_file() for p in paths.values())
    assert not [p for p in (tmp_path / 'run').iterdir() if p.name.startswith('.')]  # no temp files left

    with paths['csv'].open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['class_index', 'class_name', 'train_images', 'test_images', 'top1', 'top5', 'shot_group']
    assert len(rows) == 10 and rows[3]['class_name'] == 'cat' and rows[3]['top1'] == '' and rows[3]['test_images'] == '0'
    assert float(rows[0]['top1']) == pytest.approx(per_class['top1'][0], abs=1e-4)
    assert {r['shot_group'] for r in rows} == {'many'}

    text = paths['json'].read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    results = json.loads(text)
    assert read_results(tmp_path / 'run') == results == read_results(paths['json'])
    assert results['metrics']['medium'] is None and results['metrics']['few'] is None
    assert results['metrics']['top1'] == pytest.approx(summary['top1'])
    assert results['per_class']['top1'][3] is None and results['per_class']['test_images'][3] == 0
    assert results['per_class']['train_images'] == counts and results['class_names'] == CIFAR10
    assert results['model'] == 'resnet32_cifar' and results['epoch'] == 199 and results['best']['top1'] is None
    assert results['dataset']['imb_ratio'] == 50.0

    with Image.open(paths['png']) as img:
        assert img.format == 'PNG' and img.mode == 'RGB'


def test_calibration_and_failing_plots_never_lose_the_records(tmp_path, monkeypatch, caplog):
    """The reliability diagram is written with the calibration bins; a plot that raises is reported and the JSON and
    CSV stay written (a finished run must not fail on a plot)."""
    import timm_cmo.results as results_mod
    counts = long_tail_counts(500, 10, 100)
    metric = evaluated(counts)
    paths = write_results(tmp_path / 'ok', metric.summary(counts), metric.per_class(), counts, CIFAR10,
                          calibration=metric.calibration())
    assert set(paths) == {'csv', 'json', 'png', 'reliability'} and paths['reliability'].is_file()
    calibration = json.loads(paths['json'].read_text())['calibration']
    assert len(calibration['count']) == 15 and sum(calibration['count']) == 400

    def broken(*args, **kwargs):
        raise ValueError('y1 must be greater than or equal to y0')

    monkeypatch.setattr(results_mod, 'plot_per_class_accuracy', broken)
    monkeypatch.setattr(results_mod, 'plot_reliability', broken)
    paths = write_results(tmp_path / 'bad', metric.summary(counts), metric.per_class(), counts, CIFAR10,
                          calibration=metric.calibration())
    assert set(paths) == {'csv', 'json'} and paths['json'].is_file() and paths['csv'].is_file()
    assert 'Could not draw' in caplog.text and 'y1 must be greater' in caplog.text
    # unknown training counts: no shot groups, no per-class plot
    paths = write_results(tmp_path / 'nocounts', metric.summary(counts), metric.per_class(), None, CIFAR10)
    rows = paths['csv'].read_text().splitlines()
    assert 'png' not in paths and rows[1].split(',')[2] == '' and rows[1].split(',')[-1] == ''


def test_plots_in_svg_and_pdf(tmp_path):
    """plot_format svg / pdf: the same two plots in that format beside the same records; an unknown format fails
    before anything is written."""
    counts = long_tail_counts(500, 10, 100)
    metric = evaluated(counts)
    for fmt, magic in (('svg', b'<?xml'), ('pdf', b'%PDF')):
        paths = write_results(tmp_path / fmt, metric.summary(counts), metric.per_class(), counts, CIFAR10,
                              calibration=metric.calibration(), plot_format=fmt)
        assert paths['png'].name == f'per_class_accuracy.{fmt}' and paths['reliability'].name == f'reliability.{fmt}'
        assert all(paths[k].read_bytes().startswith(magic) for k in ('png', 'reliability'))
        assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(
            ['per_class_accuracy.csv', 'results.json', f'per_class_accuracy.{fmt}', f'reliability.{fmt}'])
    with pytest.raises(ValueError, match="plot_format 'jpg'"):
        write_results(tmp_path / 'jpg', metric.summary(counts), metric.per_class(), counts, CIFAR10, plot_format='jpg')
    assert not (tmp_path / 'jpg').exists()


def test_plot_tiny_accuracies(tmp_path):
    """A class scoring between 0 and 0.3 % (under one pixel) once crashed the drawing."""
    acc = [0.1, 0.0, 0.2, 55.0, 100.0, float('nan')]
    plot_per_class_accuracy(tmp_path / 'tiny.png', acc, [600, 300, 100, 40, 10, 5], title='tiny')
    with Image.open(tmp_path / 'tiny.png') as img:
        assert img.format == 'PNG'


def test_write_results_errors(tmp_path):
    counts = [100, 10]
    metric = evaluated(counts)
    with pytest.raises(ValueError, match='reserved'):
        write_results(tmp_path, metric.summary(counts), metric.per_class(), counts, None, {'metrics': 1})
    with pytest.raises(ValueError, match='length'):
        write_results(tmp_path, metric.summary(counts), metric.per_class(), counts, ['a', 'b', 'c'], {})
    with pytest.raises(FileNotFoundError, match='results.json'):
        read_results(tmp_path / 'nope')


def test_markdown_tables():
    md = results_table_markdown({'metrics': dict(top1=41.234, many=70.04, medium=40., few=None,
                                                 head=80.01, middle=None, tail=1.26)})
    lines = md.strip().splitlines()
    assert lines[0] == '| All | Many | Medium | Few |'
    assert lines[2] == '| 41.2 | 70.0 | 40.0 | – |'
    assert lines[4] == '| Head | Middle | Tail |' and lines[6] == '| 80.0 | – | 1.3 |'
    assert results_table_markdown(dict(top1=1.0))  # metrics given directly


def test_to_json_safe():
    out = to_json_safe({'a': np.array([1.5, np.nan]), 'b': (np.int32(2), torch.tensor(3.0)), 3: float('inf')})
    assert out == {'a': [1.5, None], 'b': [2, 3.0], '3': None}
    json.dumps(out, allow_nan=False)


def bar_pixels(img: Image.Image, color=BAR_COLOR) -> np.ndarray:
    return (np.asarray(img) == np.array(color, dtype=np.uint8)).all(-1)


def bar_height(bars: np.ndarray, base: int, col: int) -> int:
    """Bar pixels in column ``col`` going up from row ``base`` without a gap."""
    above = bars[:base + 1, col][::-1]
    return int(np.argmin(above)) if not above.all() else len(above)


@pytest.mark.parametrize('num_classes', [10, 1000])
def test_plot_png(tmp_path, num_classes):
    counts = long_tail_counts(5000 if num_classes == 10 else 1280, num_classes, 100)
    acc = np.linspace(90, 10, num_classes)
    acc[num_classes // 2] = np.nan  # no test images: no bar
    path = tmp_path / 'p.png'
    plot_per_class_accuracy(path, acc, counts, CIFAR10 if num_classes == 10 else None, title='T')
    with Image.open(path) as img:
        img.load()
    assert img.format == 'PNG' and img.mode == 'RGB'
    assert 480 <= img.width <= 2000 and 300 <= img.height <= 800
    bars = bar_pixels(img)
    assert bars.sum() > 1000
    if num_classes == 10:
        # bars stand on the plot's baseline: one run of bar pixels per bar, higher accuracy -> taller
        base = np.flatnonzero(bars.any(1)).max()
        cols = np.flatnonzero(bars[base])
        segments = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
        assert len(segments) == 9  # class 5 has no bar
        heights = [bar_height(bars, base, seg[len(seg) // 2]) for seg in segments]
        assert all(a > b for a, b in zip(heights, heights[1:]))
        assert heights[0] / heights[-1] == pytest.approx(90 / 10, rel=0.05)
    else:
        # left half of the plot (higher accuracy) has more bar pixels than the right half
        cols = bars.sum(0)
        xs = np.flatnonzero(cols > 5)
        mid = (xs.min() + xs.max()) // 2
        assert cols[:mid].sum() > 1.5 * cols[mid:].sum()
    assert not [p for p in tmp_path.iterdir() if p.name != 'p.png']


def test_plot_order_and_edge_cases(tmp_path):
    # classes not sorted by count: the plot sorts them, so the tallest bar (class 2, most images) comes first
    path = tmp_path / 'a.png'
    plot_per_class_accuracy(path, [10., 50., 90.], [5, 50, 500], ['a', 'b', 'c'])
    with Image.open(path) as img:
        bars = bar_pixels(img.convert('RGB'))
    base = np.flatnonzero(bars.any(1)).max()
    cols = np.flatnonzero(bars[base])
    heights = [bar_height(bars, base, seg[len(seg) // 2])
               for seg in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)]
    assert len(heights) == 3 and heights[0] > heights[1] > heights[2]
    plot_per_class_accuracy(tmp_path / 'b.png', [float('nan')], [0])  # one class, no samples, no images
    with pytest.raises(ValueError):
        plot_per_class_accuracy(tmp_path / 'c.png', [1.0, 2.0], [1])
    with Image.open(tmp_path / 'b.png') as img:
        assert img.size[0] >= 480


def bar_segments(bars: np.ndarray, base: int):
    """(first column, height) of each bar standing on row ``base``."""
    cols = np.flatnonzero(bars[base])
    segments = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if len(cols) else []
    return [(int(seg[0]), bar_height(bars, base, seg[len(seg) // 2])) for seg in segments]


def test_plot_several_runs(tmp_path):
    counts = long_tail_counts(5000, 10, 100)
    with_cmo = np.linspace(90, 18, 10)
    without = with_cmo / 2
    without[3] = np.nan
    path = tmp_path / 'two.png'
    plot_per_class_accuracy(path, {'CE': without, 'CE + CMO': with_cmo}, counts, CIFAR10, title='CE vs CE + CMO')
    with Image.open(path) as img:
        first, second = bar_pixels(img, SERIES_COLORS[0]), bar_pixels(img, SERIES_COLORS[1])
    base = max(np.flatnonzero(first.any(1)).max(), np.flatnonzero(second.any(1)).max())
    a, b = bar_segments(first, base), bar_segments(second, base)
    assert len(a) == 9 and len(b) == 10  # NaN: no bar
    b_without_3 = b[:3] + b[4:]
    # each run's bar sits right of the first run's bar of the same class, and is twice as tall
    for (xa, ha), (xb, hb) in zip(a, b_without_3):
        assert 0 < xb - xa < 50
        assert hb / ha == pytest.approx(2, rel=0.08)
    # many classes: both runs still drawn, side by side per pixel group
    path = tmp_path / 'many.png'
    plot_per_class_accuracy(path, {'x': np.full(2000, 40.), 'y': np.full(2000, 80.)}, long_tail_counts(500, 2000, 50))
    with Image.open(path) as img:
        first, second = bar_pixels(img, SERIES_COLORS[0]), bar_pixels(img, SERIES_COLORS[1])
    assert first.sum() > 1000 and second.sum() == pytest.approx(2 * first.sum(), rel=0.05)
    with pytest.raises(ValueError, match="different lengths: {'a': 2, 'b': 1}"):
        plot_per_class_accuracy(tmp_path / 'x.png', {'a': [1.0, 2.0], 'b': [1.0]}, [1, 2])
    with pytest.raises(ValueError, match='7 runs'):
        plot_per_class_accuracy(tmp_path / 'x.png', {str(i): [1.0] for i in range(7)}, [1])


def test_cpu_model_and_peak_memory(monkeypatch):
    block = np.ones(300 * 2 ** 20, dtype=np.uint8)  # 300 MiB, touched
    assert int(block[-1]) == 1 and peak_rss_mib() >= 300
    name = cpu_model()
    assert isinstance(name, str) and name

    def no_proc(*args, **kwargs):
        raise OSError('no /proc here')
    monkeypatch.setattr('builtins.open', no_proc)
    assert cpu_model('fallback') == 'fallback'


def test_plot_title_names_the_dataset_and_its_cap():
    from timm_cmo.results import _plot_title
    summary = dict(top1=51.904)
    capped = dict(model='resnet32_cifar', dataset=dict(name='', data_dir='/data/cifar10/', imb_ratio=100, imb_max=1000))
    assert _plot_title(capped, summary) == \
        'resnet32_cifar - cifar10 (imbalance ratio 100, largest class 1000) - top-1 51.90%'
    full = dict(model='resnet32_cifar', dataset=dict(name='torch/cifar10', imb_ratio=100, imb_max=None))
    assert _plot_title(full, {}) == 'resnet32_cifar - torch/cifar10 (imbalance ratio 100)'
    assert _plot_title(dict(dataset=dict(name='inat2018')), {}) == 'inat2018'


def test_summary_epoch_minutes(tmp_path):
    """Epoch times summed over a resumed run's rows, an epoch recorded twice counted once; None for old files."""
    from timm_cmo.results import SummaryWriter
    path = tmp_path / 'summary.csv'
    writer = SummaryWriter(path)
    assert writer.epoch_minutes() is None
    writer.append(0, 2.3, 0.1, 60.0)
    writer.append(1, 2.0, 0.1, 90.0, dict(top1=30.0))
    resumed = SummaryWriter(path)  # killed after epoch 1, resumed at 1: the row of epoch 1 is redone
    resumed.truncate(1)
    resumed.append(1, 2.0, 0.1, 30.0)
    assert SummaryWriter(path).epoch_minutes() == pytest.approx(1.5)
    path.write_text('epoch,train_loss,lr\n0,2.1,0.04\n')  # before epoch times were recorded
    assert SummaryWriter(path).epoch_minutes() is None
