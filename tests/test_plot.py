"""The reliability diagram: a valid PNG for partly empty, single-bin and empty calibration tables."""
import numpy as np
import pytest
import torch
from PIL import Image

from timm_cmo.metrics import ClassAccuracy
from timm_cmo.plot import BAR_COLOR, COUNT_COLOR, plot_reliability


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
    assert we == w and he > h  # same layout, plus the title


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
    """A title longer than the plot is drawn smaller, never cut at the image's edges."""
    from timm_cmo.plot import plot_per_class_accuracy
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
