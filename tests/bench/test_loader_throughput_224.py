"""bench/loader_throughput_224.py: the generated ImageNet-sized long-tailed folder and the report on it."""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'bench'))
import loader_throughput_224 as bench  # noqa: E402

from timm_cmo.data import long_tail_counts  # noqa: E402
from timm_cmo.data.decode import fast_decode_available, is_plain_jpeg  # noqa: E402

TINY = ['--num-classes', '3', '--imb-ratio', '2', '--n-max', '4']  # class counts 4, 2, 2


def test_folder_is_long_tailed_imagenet_sized_and_kept(cifar10_dir, tmp_path):
    root = tmp_path / 'lt'
    args = argparse.Namespace(tar=str(cifar10_dir / 'train.tar'), n_max=4, num_classes=3, imb_ratio=2., quality=90,
                              grain=20., seed=0)
    manifest = bench.make_folder(str(root), args.tar, bench.folder_spec(args))
    assert manifest['class_counts'] == long_tail_counts(4, 3, 2) == [4, 2, 2]
    files = bench.image_files(str(root))
    assert len(files) == manifest['images'] == 8
    assert [len(os.listdir(root / f'c{c:03d}')) for c in range(3)] == [4, 2, 2]
    sizes = []
    for f in files:
        with Image.open(f) as img:
            assert img.format == 'JPEG' and img.mode == 'RGB' and not img.info.get('progressive')
            sizes.append(img.size)
        assert is_plain_jpeg(Path(f).read_bytes())
    assert sizes.count((375, 500)) == 2 and sizes.count((500, 375)) == 6  # every fourth image is portrait
    assert 0.4 < manifest['bytes_per_pixel'] < 0.8  # ImageNet-like (~0.6 bytes per pixel at quality 90)
    mtimes = [os.path.getmtime(f) for f in files]
    assert bench.make_folder(str(root), args.tar, bench.folder_spec(args)) == manifest  # same spec: kept as it is
    assert [os.path.getmtime(f) for f in files] == mtimes
    args.grain = 10.
    smoother = bench.make_folder(str(root), args.tar, bench.folder_spec(args))  # another spec: made again
    assert smoother['spec']['grain'] == 10. and smoother['bytes_per_pixel'] < manifest['bytes_per_pixel']
    same_seed = np.asarray(bench.synth_image(Image.new('RGB', (32, 32), 'red'), (50, 40), np.random.default_rng(1)))
    assert np.array_equal(same_seed, np.asarray(bench.synth_image(Image.new('RGB', (32, 32), 'red'), (50, 40),
                                                                  np.random.default_rng(1))))


def test_report_counts_reads_and_shares(cifar10_dir, tmp_path):
    out = tmp_path / 'r.json'
    made = bench.main(['--data-dir', str(cifar10_dir), '--make-data', str(tmp_path / 'lt'), *TINY, '--make-only',
                       '--out', str(out)])
    assert made['data']['images'] == 8 and made['workers'] == {}
    assert not out.exists() and len(bench.image_files(str(tmp_path / 'lt'))) == 8
    bench.main(['--data-dir', str(cifar10_dir), '--make-data', str(tmp_path / 'lt'), *TINY, '--batch-size', '2',
                '--workers', '0', '--repeats', '2', '--warmup-batches', '1', '--profile-images', '4', '--out', str(out)])
    report = json.loads(out.read_text())
    assert report['data']['images'] == 8 and report['fast_decode'] == fast_decode_available()
    prof = report['profile']
    assert prof['images'] == 4 and prof['fast_decode_identical'] == (4 if fast_decode_available() else 0)
    assert prof['box_max_abs_diff'] >= 0 and prof['resize_box_ms'] < prof['resize_ms']
    s = report['workers']['0']
    for name in bench.LOADERS:
        assert len(s[name]['runs']) == 2 and all(r['images'] == 8 for r in s[name]['runs'])  # 4 batches of 2
        assert 0 < s[name]['decode_share'] < 1
    assert s['timm']['reads_per_sample'] == s['plain']['reads_per_sample'] == 1.0
    assert s['two_loader']['reads_per_sample'] == 2.0
    # both CMO loaders read the same plan: the same mixed batches, foregrounds only for those
    assert [r['reads'] for r in s['cmo']['runs']] == [r['reads'] for r in s['cmo_pillow']['runs']]
    assert 1.0 <= s['cmo']['reads_per_sample'] <= 2.0
    assert all(r['reads'] in (8, 10, 12, 14, 16) for r in s['cmo']['runs'])  # 8 backgrounds + 2 per mixed batch
    r = s['ratios']
    assert r['cmo_vs_timm'] == s['cmo']['images_per_s'] / s['timm']['images_per_s']
    assert r['plain_vs_timm'] == s['plain']['images_per_s'] / s['timm']['images_per_s']
    assert s['goals_met'] == dict(cmo_vs_timm=r['cmo_vs_timm'] >= 0.85, plain_vs_timm=r['plain_vs_timm'] >= 1.2)
