"""ClassAccuracy against a plain-Python reference, incl. valid masking, calibration and a 2-process gloo all_reduce."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_cmo.metrics import ClassAccuracy, head_middle_tail

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference(logits, target, train_counts, valid=None, many=100, few=20):
    """Per-class and summary numbers computed with Python loops only."""
    num_classes = len(train_counts)
    logits, target = logits.tolist(), target.tolist()
    valid = [True] * len(target) if valid is None else valid.tolist()
    k = min(5, num_classes)
    n, c1, c5 = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for row, t, v in zip(logits, target, valid):
        if not v:
            continue
        ranked = sorted(range(num_classes), key=lambda j: -row[j])
        n[t] += 1
        c1[t] += ranked[0] == t
        c5[t] += t in ranked[:k]
    acc = [100. * c1[c] / n[c] if n[c] else None for c in range(num_classes)]

    def mean(classes):
        values = [acc[c] for c in classes if acc[c] is not None]
        return sum(values) / len(values) if values else None

    order = sorted(range(num_classes), key=lambda c: (-train_counts[c], c))
    n30 = int(0.3 * num_classes)
    total = sum(n)
    return dict(
        count=n, acc1=acc, acc5=[100. * c5[c] / n[c] if n[c] else None for c in range(num_classes)],
        top1=100. * sum(c1) / total, top5=100. * sum(c5) / total, samples=total,
        many=mean([c for c in range(num_classes) if train_counts[c] > many]),
        medium=mean([c for c in range(num_classes) if few <= train_counts[c] <= many]),
        few=mean([c for c in range(num_classes) if train_counts[c] < few]),
        head=mean(order[:n30]), middle=mean(order[n30:num_classes - n30]), tail=mean(order[num_classes - n30:]),
    )


def assert_matches(metric: ClassAccuracy, ref, train_counts):
    per_class = metric.per_class()
    assert per_class['count'].tolist() == ref['count']
    for key, ref_key in (('top1', 'acc1'), ('top5', 'acc5')):
        for got, want in zip(per_class[key].tolist(), ref[ref_key]):
            assert (math.isnan(got) and want is None) or got == pytest.approx(want)
    summary = metric.summary(train_counts)
    assert set(summary) == {'top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail', 'samples',
                            'ece', 'mce', 'nll'}
    assert summary['samples'] == ref['samples'] and isinstance(summary['samples'], int)
    for key in ('top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail'):
        assert summary[key] == (None if ref[key] is None else pytest.approx(ref[key])), key


def random_batch(num_samples, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (num_samples,), generator=g)
    # logits biased towards the target so that accuracies are neither 0 nor 100
    logits = torch.randn(num_samples, num_classes, generator=g)
    logits[torch.arange(num_samples), target] += 1.5 * torch.rand(num_samples, generator=g)
    return logits, target


# shuffled counts with all three shot groups; class 7 has no test samples
TRAIN_COUNTS = [500, 12, 300, 90, 20, 5000, 19, 101, 100, 3, 60, 250]


def test_matches_reference_in_batches_with_valid_mask():
    num_classes = len(TRAIN_COUNTS)
    logits, target = random_batch(600, num_classes, seed=0)
    target[target == 7] = 8
    valid = torch.rand(600, generator=torch.Generator().manual_seed(1)) > 0.2
    metric = ClassAccuracy(num_classes)
    for i in range(0, 600, 64):
        metric.update(logits[i:i + 64], target[i:i + 64], valid[i:i + 64])
    ref = reference(logits, target, TRAIN_COUNTS, valid)
    assert ref['acc1'][7] is None and 0 < ref['top1'] < 100 and ref['top5'] > ref['top1']
    assert_matches(metric, ref, TRAIN_COUNTS)

    metric.reset()
    metric.update(logits, target)
    assert_matches(metric, reference(logits, target, TRAIN_COUNTS), TRAIN_COUNTS)


def test_few_classes_topk_and_empty_groups():
    counts = [300, 150]  # C=2: top-5 is top-2 (always right), no medium/few, no head/tail
    logits, target = random_batch(50, 2, seed=3)
    metric = ClassAccuracy(2, device='cpu')
    metric.update(logits, target)
    summary = metric.summary(counts)
    assert summary['top5'] == 100.
    assert summary['medium'] is None and summary['few'] is None
    assert summary['head'] is None and summary['tail'] is None and summary['middle'] is not None
    assert_matches(metric, reference(logits, target, counts), counts)


def test_head_middle_tail_cifar10_split():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    split = head_middle_tail(counts)
    assert [s.tolist() for s in split.values()] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    split = head_middle_tail([10, 30, 30, 20, 5, 1, 7, 7, 9, 40])  # stable on ties
    assert [s.tolist() for s in split.values()] == [[9, 1, 2], [3, 0, 8, 6], [7, 4, 5]]


def test_empty_and_errors():
    metric = ClassAccuracy(10)
    summary = metric.summary([10] * 10)
    assert summary['samples'] == 0 and math.isnan(summary['top1']) and summary['few'] is None
    assert np.isnan(metric.per_class()['top1']).all()
    with pytest.raises(ValueError, match='shape'):
        metric.update(torch.zeros(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='11 entries'):
        metric.summary([1] * 11)


_DIST_SCRIPT = '''
import json, os, sys
import torch
import torch.distributed as dist
from timm_cmo.metrics import ClassAccuracy

dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
data = torch.load(sys.argv[1], weights_only=True)
metric = ClassAccuracy(data['logits'].shape[1])
shard = slice(rank, None, world)
metric.update(data['logits'][shard], data['target'][shard], data['valid'][shard])
local = int(metric.per_class()['count'].sum())
metric.all_reduce()
if rank == 0:
    out = dict(local=local, summary=metric.summary(data['train_counts'].tolist()),
               count=metric.per_class()['count'].tolist(), calibration=metric.calibration()['count'].tolist())
    with open(sys.argv[2], 'w') as f:
        json.dump(out, f)
dist.destroy_process_group()
'''


def test_all_reduce_two_processes_gloo(tmp_path):
    num_classes = len(TRAIN_COUNTS)
    logits, target = random_batch(301, num_classes, seed=5)
    valid = torch.ones(301, dtype=torch.bool)
    valid[-7:] = False  # padded duplicates
    torch.save(dict(logits=logits, target=target, valid=valid, train_counts=torch.tensor(TRAIN_COUNTS)),
               tmp_path / 'data.pt')
    (tmp_path / 'script.py').write_text(textwrap.dedent(_DIST_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(tmp_path / 'script.py'), str(tmp_path / 'data.pt'), str(tmp_path / 'out.json')],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / 'out.json').read_text())
    ref = reference(logits, target, TRAIN_COUNTS, valid)
    assert out['local'] == 151 - 4  # rank 0: even indices, 294..300 padded
    assert out['count'] == ref['count'] and out['summary']['samples'] == 294
    for key in ('top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail'):
        assert out['summary'][key] == pytest.approx(ref[key]), key
    # calibration sums across ranks too
    single = ClassAccuracy(num_classes)
    single.update(logits, target, valid)
    for key in ('ece', 'mce', 'nll'):
        assert out['summary'][key] == pytest.approx(single.summary(TRAIN_COUNTS)[key], rel=1e-9, abs=1e-9), key
    assert out['calibration'] == single.calibration()['count'].tolist()


# ---- calibration: ECE / MCE (15 bins, right-closed) and NLL ----

def reference_calibration(logits, target, valid=None, num_bins=15, scale=1.0):
    """MiSLAS's utils/metric.py calibration (np.digitize right=True) and the mean NLL, in float64 numpy."""
    logp = torch.log_softmax(scale * logits.double(), dim=1)
    conf, pred = logp.exp().max(dim=1)
    keep = np.ones(len(target), bool) if valid is None else valid.numpy()
    conf, pred, true = conf.numpy()[keep], pred.numpy()[keep], target.numpy()[keep]
    nll = float(-logp[torch.arange(len(target)), target].numpy()[keep].mean())
    index = np.digitize(conf, np.linspace(0., 1., num_bins + 1), right=True)
    acc, cnf, cnt = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins, np.int64)
    for b in range(num_bins):
        sel = index == b + 1
        if sel.any():
            acc[b], cnf[b], cnt[b] = (true[sel] == pred[sel]).mean(), conf[sel].mean(), sel.sum()
    gaps = np.abs(acc - cnf)
    return dict(ece=100. * np.sum(gaps * cnt) / cnt.sum(), mce=100. * gaps.max(), nll=nll, count=cnt,
                accuracy=np.where(cnt > 0, acc, np.nan), confidence=np.where(cnt > 0, cnf, np.nan))


def _from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_calibration_hand_computed_with_empty_bins():
    probs = [[0.9, 0.05, 0.03, 0.02], [0.9, 0.05, 0.03, 0.02], [0.1, 0.5, 0.2, 0.2], [0.35, 0.3, 0.2, 0.15]]
    target = torch.tensor([0, 1, 1, 2])
    metric = ClassAccuracy(4)
    metric.update(_from_probs(probs), target)
    cal = metric.calibration()
    # bins: 0.9 -> (13/15, 14/15], 0.5 -> (7/15, 8/15], 0.35 -> (5/15, 6/15]
    assert cal['count'].tolist() == [0] * 5 + [1, 0, 1] + [0] * 5 + [2, 0]
    assert cal['count'].sum() == cal['samples'] == 4
    np.testing.assert_allclose(cal['accuracy'][[5, 7, 13]], [0., 1., 0.5])
    np.testing.assert_allclose(cal['confidence'][[5, 7, 13]], [0.35, 0.5, 0.9], rtol=1e-6)
    assert np.isnan(cal['accuracy'][[0, 6, 14]]).all() and np.isnan(cal['confidence'][[0, 6, 14]]).all()
    np.testing.assert_allclose(cal['edges'], np.arange(16) / 15)
    # ECE = 2/4 * 0.4 + 1/4 * 0.5 + 1/4 * 0.35; MCE = 0.5 (empty bins do not count)
    summary = metric.summary([10, 10, 10, 10])
    assert summary['ece'] == pytest.approx(41.25, abs=1e-4) and cal['ece'] == summary['ece']
    assert summary['mce'] == pytest.approx(50., abs=1e-4)
    assert summary['nll'] == pytest.approx(-(math.log(0.9) + math.log(0.05) + math.log(0.5) + math.log(0.2)) / 4,
                                           rel=1e-6)


def test_calibration_perfect_and_over_confident():
    # 0.8-confident: 8 of 10 right; 0.6-confident: 3 of 5 right -> accuracy equals confidence in each bin
    logits = torch.cat([_from_probs([[0.8, 0.2]] * 10), _from_probs([[0.6, 0.4]] * 5)])
    target = torch.tensor([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
    metric = ClassAccuracy(2)
    metric.update(logits, target)
    summary = metric.summary([5, 5])
    assert summary['ece'] == pytest.approx(0., abs=1e-4) and summary['mce'] == pytest.approx(0., abs=1e-4)
    assert summary['top1'] == pytest.approx(100. * 11 / 15)
    # fully over-confident: probability ~1 on a wrong class, all in the last bin
    metric = ClassAccuracy(3)
    logits = torch.tensor([[30., 0., 0.]] * 6)
    metric.update(logits, torch.tensor([1, 2, 1, 2, 1, 2]))
    cal = metric.calibration()
    assert cal['count'][-1] == 6 and cal['count'][:-1].sum() == 0
    assert cal['ece'] == pytest.approx(100., abs=1e-6) and cal['mce'] == pytest.approx(100., abs=1e-6)
    assert cal['nll'] == pytest.approx(30. + math.log1p(2 * math.exp(-30.)), rel=1e-6)
    assert metric.summary([1, 1, 1])['top1'] == 0.


def test_calibration_matches_reference_in_batches_with_valid_mask():
    num_classes = len(TRAIN_COUNTS)
    logits, target = random_batch(500, num_classes, seed=7)
    logits = logits * 2.
    valid = torch.rand(500, generator=torch.Generator().manual_seed(8)) > 0.3
    metric = ClassAccuracy(num_classes)
    for i in range(0, 500, 48):
        metric.update(logits[i:i + 48].float(), target[i:i + 48], valid[i:i + 48])
    ref = reference_calibration(logits, target, valid)
    cal = metric.calibration()
    assert cal['count'].tolist() == ref['count'].tolist() and cal['count'].sum() == int(valid.sum())
    np.testing.assert_allclose(cal['accuracy'], ref['accuracy'], rtol=1e-9)
    np.testing.assert_allclose(cal['confidence'], ref['confidence'], rtol=1e-6)
    summary = metric.summary(TRAIN_COUNTS)
    for key in ('ece', 'mce'):
        assert summary[key] == pytest.approx(ref[key], abs=1e-4), key
    assert summary['nll'] == pytest.approx(ref['nll'], rel=1e-6)
    # no process group: all_reduce changes nothing
    metric.all_reduce()
    assert metric.summary(TRAIN_COUNTS) == summary


def test_logit_scale_for_cosine_heads():
    g = torch.Generator().manual_seed(3)
    cosines = torch.rand(64, 10, generator=g) * 2 - 1  # a NormedLinear head's logits
    target = torch.randint(0, 10, (64,), generator=g)
    plain, scaled, reference = ClassAccuracy(10), ClassAccuracy(10, logit_scale=30.), ClassAccuracy(10)
    plain.update(cosines, target)
    scaled.update(cosines, target)
    reference.update(30. * cosines, target)
    counts = [10] * 10
    s, r, p = scaled.summary(counts), reference.summary(counts), plain.summary(counts)
    assert s == pytest.approx(r)
    assert s['top1'] == p['top1'] and s['top5'] == p['top5']
    # unscaled cosines: nearly flat softmax, every confidence <= e / (e + 9 / e) = 0.451, in bins 0..6
    assert plain.calibration()['count'][7:].sum() == 0 and scaled.calibration()['count'][7:].sum() > 0
    assert scaled.calibration()['logit_scale'] == 30.
    with pytest.raises(ValueError, match='logit_scale'):
        ClassAccuracy(10, logit_scale=0.)
    with pytest.raises(ValueError, match='num_bins'):
        ClassAccuracy(10, num_bins=0)


def test_calibration_empty_and_reset():
    metric = ClassAccuracy(3, device='cpu')
    cal = metric.calibration()
    assert cal['samples'] == 0 and cal['count'].tolist() == [0] * 15 and math.isnan(cal['ece'])
    summary = metric.summary([1, 2, 3])
    assert math.isnan(summary['ece']) and math.isnan(summary['mce']) and math.isnan(summary['nll'])
    metric.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    assert metric.calibration()['samples'] == 5
    metric.reset()
    assert metric.calibration()['samples'] == 0 and metric.summary([1, 2, 3])['samples'] == 0
