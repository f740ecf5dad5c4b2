"""Class-weighted sampling: probabilities, draw frequencies, distributed split, reproducibility."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

from timm_cmo.data import ClassWeightedSampler, class_sampling_probs, long_tail_counts

COUNTS = long_tail_counts(5000, 10, 100)


def reference_probs(counts, r=1.0, effective=False):
    """The class probability of the paper's code, written out: per-sample weight w_k, class mass n_k * w_k."""
    total = float(sum(counts))
    mass = []
    for n in counts:
        if effective:
            b = (total - 1) / total
            w = (1 - b) / (1 - b ** n)
        else:
            w = n ** -r
        mass.append(n * w)
    return np.array(mass) / sum(mass)


@pytest.mark.parametrize('r', [0.0, 0.5, 1.0, 2.0])
def test_class_sampling_probs(r):
    probs = class_sampling_probs(COUNTS, r=r)
    np.testing.assert_allclose(probs, reference_probs(COUNTS, r), rtol=1e-12)
    assert probs.sum() == pytest.approx(1.0)
    if r == 1.0:
        np.testing.assert_allclose(probs, 0.1)
    if r == 0.0:
        np.testing.assert_allclose(probs, np.array(COUNTS) / sum(COUNTS))


def test_class_sampling_probs_effective():
    probs = class_sampling_probs(COUNTS, effective=True)
    np.testing.assert_allclose(probs, reference_probs(COUNTS, effective=True), rtol=1e-9)
    # the effective number lies between r=0 and r=1: head classes still above uniform
    assert probs[0] > 0.1 > probs[-1]


def _lt_targets(counts, seed=0):
    targets = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    np.random.default_rng(seed).shuffle(targets)
    return targets


@pytest.mark.parametrize('r,effective', [(1.0, False), (2.0, False), (0.5, False), (0.0, False), (1.0, True)])
def test_draw_frequencies_chi_square(cifar10_train_full, r, effective):
    """Draws over the real CIFAR-10-LT labels follow the class probabilities (chi-square, fixed seed)."""
    from timm_cmo.data import long_tail_indices
    targets = np.asarray(cifar10_train_full.targets)[long_tail_indices(cifar10_train_full.targets, COUNTS)]
    sampler = ClassWeightedSampler(targets, r=r, effective=effective, num_samples=100_000, seed=0)
    draws = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(draws) == 100_000 and len(sampler) == 100_000
    observed = np.bincount(targets[draws], minlength=10)
    expected = reference_probs(COUNTS, r, effective) * len(draws)
    keep = expected > 5  # r=2 makes the head classes almost never drawn
    assert observed[~keep].sum() <= 5 * max(1, (~keep).sum())
    obs, exp = observed[keep], expected[keep]
    exp = exp * obs.sum() / exp.sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_uniform_within_class():
    targets = _lt_targets([40, 10])
    sampler = ClassWeightedSampler(targets, r=1.0, num_samples=40_000, seed=1)
    draws = np.fromiter(iter(sampler), dtype=np.int64)
    head = draws[targets[draws] == 0]
    counts = np.bincount(head, minlength=len(targets))[targets == 0]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_reproducible_per_epoch_and_pass():
    targets = _lt_targets([50, 20, 5])
    a = ClassWeightedSampler(targets, seed=7)
    b = ClassWeightedSampler(targets, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # a second pass in the same epoch draws afresh
    a.set_epoch(3)
    assert list(a) == first
    a.set_epoch(4)
    assert list(a) != first
    assert list(ClassWeightedSampler(targets, seed=8)) != list(ClassWeightedSampler(targets, seed=7))


def test_replica_slices_partition_the_draw():
    targets = _lt_targets([50, 20, 5])
    full = ClassWeightedSampler(targets, num_samples=75, seed=3, num_replicas=1, rank=0)
    parts = [ClassWeightedSampler(targets, num_samples=75, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for p in parts + [full]:
        p.set_epoch(2)
    shares = [list(p) for p in parts]
    assert len(shares[0]) == len(shares[1]) == 38  # ceil(75 / 2), padded like DistributedSampler
    interleaved = [idx for pair in zip(*shares) for idx in pair]
    assert interleaved == parts[0].draw(2).tolist()
    assert list(full) == full.draw(2).tolist()[:75] + [] and len(full) == 75


@pytest.mark.parametrize('kwargs,message', [
    (dict(targets=[0, 1, 1], num_samples=0), 'num_samples'),
    (dict(targets=[0, 1, 1], num_samples=-3), '-3'),
    (dict(targets=[0, 1, 1], r=-1.0), 'r must be >= 0'),
    (dict(targets=[], r=1.0), 'non-empty'),
    (dict(targets=[0, -1], r=1.0), 'negative label'),
])
def test_sampler_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassWeightedSampler(**kwargs)


def test_probs_bad_input():
    with pytest.raises(ValueError, match=r'Classes \[1\] have zero training images'):
        class_sampling_probs([10, 0, 3], r=1.0)
    with pytest.raises(ValueError, match='negative'):
        class_sampling_probs([10, -2, 3])
    # r=0 needs no weight of an empty class
    np.testing.assert_allclose(class_sampling_probs([10, 0, 30], r=0.0), [0.25, 0, 0.75])


def test_distributed_two_processes(tmp_path):
    """Two gloo processes under torchrun: disjoint, different shares that together are the full draw."""
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f'''
        import json, os, sys
        import numpy as np
        import torch.distributed as dist
        from timm_cmo.data import ClassWeightedSampler
        dist.init_process_group('gloo')
        targets = np.repeat(np.arange(4), [60, 30, 8, 2])
        sampler = ClassWeightedSampler(targets, seed=5)  # replicas and rank from the process group
        out = {{}}
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out[epoch] = list(sampler)
        out['replicas'] = [sampler.num_replicas, sampler.rank]
        out['full'] = sampler.draw(1).tolist()
        with open(os.path.join(r"{tmp_path}", f"rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))
    assert r0['replicas'] == [2, 0] and r1['replicas'] == [2, 1]
    for epoch in ('0', '1'):
        assert len(r0[epoch]) == len(r1[epoch]) == 50
        assert r0[epoch] != r1[epoch]
    assert r0['0'] != r0['1']
    assert [i for pair in zip(r0['1'], r1['1']) for i in pair] == r0['full']
