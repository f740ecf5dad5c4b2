"""bench/train_speed.py: the figures it reports from the epochs it timed (a scripted clock, real data)."""
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'bench'))
import train_speed  # noqa: E402


def test_median_of_timed_epochs(cifar10_dir, tmp_path, monkeypatch):
    # every time.time() call advances the clock by the next step: decode (0.5 s), then per epoch a start and an end
    durations = [9.0, 1.0, 3.0, 2.0, 6.0]  # warm-up epoch, then 4 timed epochs: median 2.5 (the middle two's mean)
    ticks = itertools.accumulate([0.0, 0.5] + [x for d in durations for x in (0.0, d)])
    monkeypatch.setattr(train_speed, 'time', SimpleNamespace(time=lambda: next(ticks)))
    out = tmp_path / 'speed.json'
    train_speed.main(['--data-dir', str(cifar10_dir), '--imb-max', '200', '--paths', 'fast', '--cmo', 'on',
                      '--epochs', '4', '--threads', '1', '--device', 'cpu', '--out', str(out)])
    report = json.loads(out.read_text())
    (row,) = report['rows']
    assert row['epochs_s'] == durations
    assert row['s_per_epoch'] == 2.5
    images = report['train_images'] // 128 * 128  # the device loader drops the last incomplete batch
    assert row['images_per_s'] == round(images / 2.5, 1)
    assert row['projected_200_epochs_min'] == round((200 * 2.5 + 0.5) / 60, 1)
    assert report['decode_s'] == 0.5
