"""``python -m timm_cmo.preview``: the three-row CMO grid on real CIFAR-10-LT."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cmo import preview
from timm_cmo.data import create_lt_dataset


@pytest.fixture(scope='module')
def cifar_lt(cifar10_dir):
    return create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=100)


def layout_of(img):
    return json.loads(img.info[preview.INFO_KEY])


def raw(ds, i):
    return np.asarray(ds[i][0].convert('RGB'))


def cell(grid, box, scale):
    """The cell's pixels, downsampled back to the source resolution (nearest upscaling is exact)."""
    left, top, right, bottom = box
    return np.asarray(grid)[top:bottom:scale, left:right:scale]


def expected_size(num, h, w, scale):
    m, t, g, lh, nl = preview.MARGIN, preview.TITLE_W, preview.GAP, preview.LINE_H, preview.LABEL_LINES
    return 2 * m + t + num * w * scale + (num - 1) * g, 2 * m + 3 * (h * scale + nl * lh) + 2 * g


def check_rows(grid, ds, layout):
    """Row 1 the foregrounds, row 2 the backgrounds, row 3 each pixel from one of them, the pasted box the foreground's."""
    scale = layout['scale']
    assert len(layout['boxes']) == 3
    mixed = 0
    for col in range(layout['num']):
        fg, bg = raw(ds, layout['foreground'][col]), raw(ds, layout['background'][col])
        assert np.array_equal(cell(grid, layout['boxes'][0][col], scale), fg)
        assert np.array_equal(cell(grid, layout['boxes'][1][col], scale), bg)
        out = cell(grid, layout['boxes'][2][col], scale)
        # full upscaled cell: every scale x scale block is constant
        left, top, right, bottom = layout['boxes'][2][col]
        big = np.asarray(grid)[top:bottom, left:right]
        assert np.array_equal(big, np.repeat(np.repeat(out, scale, 0), scale, 1))
        from_fg = (out == fg).all(-1)
        from_bg = (out == bg).all(-1)
        assert (from_fg | from_bg).all()
        pasted = from_fg & ~from_bg
        lam = layout['lam'][col]
        if lam < 1:
            # the pasted region is a rectangle holding the foreground, the rest is the background
            ys, xs = np.nonzero(~from_bg)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            assert np.array_equal(out[y0:y1, x0:x1], fg[y0:y1, x0:x1])
            outside = np.ones(from_bg.shape, bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(out[outside], bg[outside])
            box_frac = (y1 - y0) * (x1 - x0) / from_bg.size
            assert box_frac >= pasted.mean() and abs((1 - lam) - box_frac) < 1e-6
            if lam > 0:
                assert pasted.any() and from_bg.any()  # pixels of both source images
                mixed += 1
        else:
            assert np.array_equal(out, bg)
    return mixed


def test_main_writes_grid_on_cifar10_lt(tmp_path, cifar10_dir, cifar_lt, capsys):
    out = tmp_path / 'sub' / 'cmo.png'
    ret = preview.main(['--data-dir', str(cifar10_dir / 'train.tar'), '--imb-ratio', '100', '--num', '8',
                        '--scale', '4', '--seed', '0', '--out', str(out)])
    assert ret == 0 and str(out) in capsys.readouterr().out
    assert out.is_file() and os.listdir(out.parent) == ['cmo.png']  # no temporary file left behind
    grid = Image.open(out)
    assert grid.format == 'PNG' and grid.mode == 'RGB'
    assert grid.size == expected_size(8, 32, 32, 4) == preview.grid_size(8, (32, 32), 4)
    layout = layout_of(grid)
    assert layout['num'] == 8 and layout['img_size'] == [32, 32]
    assert [len(r) for r in layout['boxes']] == [8, 8, 8]
    # the three rows lie one below the other, the columns side by side
    tops = [layout['boxes'][r][0][1] for r in range(3)]
    assert tops == sorted(tops) and len(set(tops)) == 3
    # foregrounds come from the tail half of CIFAR-10-LT's classes (dog .. truck)
    assert layout['tail_classes'] == [5, 6, 7, 8, 9]
    assert set(layout['foreground_classes']) <= {5, 6, 7, 8, 9}
    assert len(set(layout['foreground'])) == 8
    assert all(f != b for f, b in zip(layout['foreground'], layout['background']))
    assert cifar_lt.targets[layout['foreground']].tolist() == layout['foreground_classes']
    assert cifar_lt.targets[layout['background']].tolist() == layout['background_classes']
    grid = grid.convert('RGB')
    assert check_rows(grid, cifar_lt, layout) >= 4


def test_size_follows_num_and_scale(cifar_lt):
    img = preview.make_preview(cifar_lt, num=3, scale=2, seed=1)
    assert img.size == expected_size(3, 32, 32, 2)
    assert check_rows(img, cifar_lt, layout_of(img)) >= 0
    img = preview.make_preview(cifar_lt, num=2, scale=1, seed=1, size=16)
    assert img.size == expected_size(2, 16, 16, 1)


def test_make_preview_reproducible(cifar_lt):
    a = preview.make_preview(cifar_lt, num=6, seed=5)
    b = preview.make_preview(cifar_lt, num=6, seed=5)
    c = preview.make_preview(cifar_lt, num=6, seed=6)
    assert a.tobytes() == b.tobytes() and layout_of(a) == layout_of(b)
    assert a.tobytes() != c.tobytes() and layout_of(a)['foreground'] != layout_of(c)['foreground']


def test_batch_mode_one_box(cifar_lt, tmp_path):
    img = preview.make_preview(cifar_lt, num=5, seed=2, mode='batch', out=str(tmp_path / 'b.png'))
    layout = layout_of(img)
    assert len(set(layout['lam'])) == 1
    saved = Image.open(tmp_path / 'b.png')
    assert layout_of(saved) == layout and saved.convert('RGB').tobytes() == img.tobytes()
    check_rows(img, cifar_lt, layout)


def test_raw_images_and_transform_restored():
    """Tensor images of mixed sizes are shown raw (the transform is switched off, then restored) at --size."""

    class Toy(torch.utils.data.Dataset):
        classes = ['a', 'b', 'c', 'd']

        def __init__(self):
            self.targets = [0] * 20 + [1] * 10 + [2] * 4 + [3] * 2
            self.transform = lambda img: 'transformed'

        def __getitem__(self, i):
            side = 8 + i % 3
            img = torch.full((3, side, side), (i * 7) % 256, dtype=torch.uint8)
            return (self.transform(img) if self.transform else img), self.targets[i]

        def __len__(self):
            return len(self.targets)

    ds = Toy()
    transform = ds.transform
    img = preview.make_preview(ds, num=2, scale=3, size=8, seed=0)
    assert ds.transform is transform
    layout = layout_of(img)
    assert img.size == expected_size(2, 8, 8, 3)
    assert set(layout['foreground_classes']) <= {2, 3} == set(preview.tail_classes([20, 10, 4, 2]))


def test_tail_classes_and_fallback():
    assert preview.tail_classes([5000, 10, 300, 0, 2]) == [1, 4]
    assert preview.tail_classes([7]) == [0]
    targets = np.array([0] * 50 + [1] * 2)
    # only 2 images in the tail: the rest of the row is filled with other draws from Q, all distinct
    picked = preview._draw_foregrounds(targets, 6, r=1.0, seed=0, tail=[1])
    assert len(picked) == 6 and len(set(picked)) == 6 and set(picked) >= {50, 51}
    assert picked[:2] in ([50, 51], [51, 50])


def test_bad_arguments(cifar_lt):
    with pytest.raises(ValueError, match='num'):
        preview.make_preview(cifar_lt, num=0)
    with pytest.raises(ValueError, match='scale'):
        preview.make_preview(cifar_lt, scale=0)
    with pytest.raises(SystemExit):
        preview.main(['--out', 'x.png'])  # --data-dir is required


@pytest.mark.parametrize('argv,message', [
    (['--imb-ratio', '100', '--imb-max', '20'], 'classes [6, 7, 8, 9] without images'),
    (['--list-file', 'missing.txt'], "missing.txt' does not exist"),
])
def test_bad_data_is_a_flag_error(cifar10_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        preview.main(['--data-dir', str(cifar10_dir), '--out', str(tmp_path / 'x.png')] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f'--data-dir {cifar10_dir}:' in err and message in err
    assert not (tmp_path / 'x.png').exists()
