"""Remix: the relabelling rule at both thresholds, exact pixels, soft targets, seeds, the law of lambda."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from timm_cmo.data.cmo import MixInfo
from timm_cmo.data.remix import RemixMixup, remix_label_weights
from timm_cmo.losses import create_loss

# class 0: 300 images, 1: 100, 2: 99, 3: 101, 4: 34, 5: 33
COUNTS = [300, 100, 99, 101, 34, 33]
C = len(COUNTS)


def _rule(lam, n_i, n_j, kappa=3.0, tau=0.5):
    """The paper's Eq. 10 in plain Python."""
    if n_i / n_j >= kappa and lam < tau:
        return 0.
    if n_i / n_j <= 1 / kappa and 1 - lam < tau:
        return 1.
    return lam


def _weights(lam, pairs, kappa=3.0, tau=0.5):
    n_i = torch.tensor([float(a) for a, _ in pairs], dtype=torch.float64)
    n_j = torch.tensor([float(b) for _, b in pairs], dtype=torch.float64)
    return remix_label_weights(lam, n_i, n_j, kappa, tau).tolist()


@pytest.mark.parametrize('lam', [0.2, 0.4999, 0.5, 0.5001, 0.8])
def test_rule_at_both_thresholds(lam):
    # ratios just below, at and just above kappa = 3, and their inverses
    pairs = [(300, 101), (300, 100), (300, 99), (101, 300), (100, 300), (99, 300), (100, 100), (34, 100), (33, 100)]
    got = _weights(lam, pairs)
    want = [_rule(lam, a, b) for a, b in pairs]
    assert got == pytest.approx(want)
    if lam < 0.5:  # the partner dominates the image: relabelled to it when sample i is the majority
        assert got[:3] == pytest.approx([lam, 0., 0.]) and got[3:6] == pytest.approx([lam] * 3)
    elif lam > 0.5:  # sample i dominates: relabelled to it when it is the minority
        assert got[:3] == pytest.approx([lam] * 3) and got[3:6] == pytest.approx([lam, 1., 1.])
    else:  # lam = 1 - lam = tau: strict inequalities, no relabelling
        assert got == pytest.approx([0.5] * len(pairs))
    assert got[6] == pytest.approx(lam)


def test_rule_tau_and_kappa_options():
    pairs = [(300, 100), (100, 300)]
    # tau = 0.3: lam 0.29 relabels the majority sample, lam 0.31 does not
    assert _weights(0.29, pairs, tau=0.3) == pytest.approx([0., 0.29])
    assert _weights(0.31, pairs, tau=0.3) == pytest.approx([0.31, 0.31])
    assert _weights(0.71, pairs, tau=0.3) == pytest.approx([0.71, 1.])
    assert _weights(0.69, pairs, tau=0.3) == pytest.approx([0.69, 0.69])
    # kappa = 2.5: ratio 3 qualifies; kappa = 3.01: it does not
    assert _weights(0.2, pairs, kappa=2.5) == pytest.approx([0., 0.2])
    assert _weights(0.2, pairs, kappa=3.01) == pytest.approx([0.2, 0.2])
    # tau > 0.5: both lambda conditions hold, the count ratio decides
    assert _weights(0.5, pairs, tau=0.7) == pytest.approx([0., 1.])


def _batch(b=12, h=16, w=16, seed=0):
    """Sample i has every pixel equal to i + 1: each mixed pixel tells which samples it came from."""
    x = (1. + torch.arange(b, dtype=torch.float32)).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    y = torch.randint(0, C, (b,), generator=torch.Generator().manual_seed(seed))
    return x, y


def _perm_of(remix, b, seed):
    """The permutation and lambda a seeded RemixMixup draws (same host draws, replayed)."""
    rng = np.random.default_rng(seed)
    if remix.prob < 1:
        rng.random()
    lam = float(rng.beta(remix.alpha, remix.alpha))
    return lam, rng.permutation(b), rng


def test_mixup_pixels_and_targets_exact():
    remix = RemixMixup(C, COUNTS, seed=3)
    x, y = _batch()
    x0 = x.clone()
    out, target = remix(x, y)
    lam, perm, _ = _perm_of(remix, len(y), 3)
    assert out is x  # in place, as timm's Mixup
    torch.testing.assert_close(out, lam * x0 + (1 - lam) * x0[perm])
    info = remix.last
    assert isinstance(info, MixInfo) and info.lam.dtype == torch.float32 and info.lam.shape == (len(y),)
    assert torch.equal(info.y_b, y) and torch.equal(info.y_f, y[perm])
    expected = [_rule(lam, COUNTS[a], COUNTS[b]) for a, b in zip(y.tolist(), y[perm].tolist())]
    assert info.lam.tolist() == pytest.approx(expected)
    w = torch.tensor(expected).unsqueeze(1)
    ref = w * F.one_hot(y, C) + (1 - w) * F.one_hot(y[perm], C)
    torch.testing.assert_close(target, ref.float())
    torch.testing.assert_close(target.sum(1), torch.ones(len(y)))


def test_cutmix_pixels_exact_and_lambda_is_kept_area():
    for seed in range(20):
        remix = RemixMixup(C, COUNTS, mode='cutmix', seed=seed)
        x, y = _batch(seed=seed)
        x0 = x.clone()
        out, target = remix(x, y)
        _, perm, _ = _perm_of(remix, len(y), seed)
        own = out == x0
        pasted = out == x0[perm]
        fixed = torch.from_numpy(perm) == torch.arange(len(y))
        assert bool((own | pasted).all())
        # one box, the same for every sample and channel
        box = pasted[~fixed][:, 0] & ~own[~fixed][:, 0]
        if len(box):
            assert bool((box == box[:1]).all())
        kept = 1. - box[0].float().mean().item() if len(box) else None
        lam_x = 1. - (~own[~fixed][:, 0]).float().mean(dim=(1, 2)) if len(box) else None
        if kept is not None:
            torch.testing.assert_close(lam_x, torch.full_like(lam_x, kept))
            expected = [_rule(kept, COUNTS[a], COUNTS[b]) for a, b in zip(y.tolist(), y[perm].tolist())]
            assert remix.last.lam.tolist() == pytest.approx(expected, abs=1e-6)
        torch.testing.assert_close(target.sum(1), torch.ones(len(y)))


def test_label_smoothing_and_mix_loss_path():
    remix = RemixMixup(C, COUNTS, label_smoothing=0.1, seed=0)
    x, y = _batch()
    _, target = remix(x, y)
    info = remix.last
    torch.testing.assert_close(target, info.target(C))
    torch.testing.assert_close(target.sum(1), torch.ones(len(y)))
    assert float(target.min()) >= 0.1 / C - 1e-7
    # the losses' per-term path equals the soft-target loss without class weights
    loss = create_loss('ce', COUNTS)
    logits = torch.randn(len(y), C, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss(logits, target, mix=info), loss(logits, target))


def test_seed_reproducible_and_reseed():
    outs = []
    for _ in range(2):
        remix = RemixMixup(C, COUNTS, mode='cutmix', prob=0.7, seed=11)
        run = []
        for i in range(5):
            x, y = _batch(seed=i)
            out, target = remix(x, y)
            run.append((out.clone(), target.clone(), remix.last.lam))
        outs.append(run)
    for (a, ta, la), (b, tb, lb) in zip(*outs):
        assert torch.equal(a, b) and torch.equal(ta, tb)
        assert torch.equal(torch.as_tensor(la), torch.as_tensor(lb))
    remix.reseed(11)
    x, y = _batch(seed=0)
    out, _ = remix(x, y)
    assert torch.equal(out, outs[0][0][0])


def test_prob_zero_gives_unmixed_batches():
    remix = RemixMixup(C, COUNTS, prob=0., seed=0)
    x, y = _batch()
    x0 = x.clone()
    out, target = remix(x, y)
    assert torch.equal(out, x0)
    torch.testing.assert_close(target, F.one_hot(y, C).float())
    assert remix.last == MixInfo(y, y, 1., 0.)


def test_prob_is_honoured():
    remix = RemixMixup(C, COUNTS, prob=0.3, seed=5)
    n = 400
    mixed = 0
    for _ in range(n):
        x, y = _batch(b=4, h=2, w=2)
        remix(x, y)
        mixed += isinstance(remix.last.lam, torch.Tensor)
    assert stats.binomtest(mixed, n, 0.3).pvalue > 1e-3


@pytest.mark.parametrize('alpha', [1.0, 0.4])
def test_lambda_is_beta_distributed(alpha):
    """With equal class counts nothing is relabelled: lam_y is the Beta(alpha, alpha) draw."""
    remix = RemixMixup(2, [10, 10], alpha=alpha, seed=0)
    lams = []
    for _ in range(1500):
        x = torch.zeros(2, 1, 1, 1)
        remix(x, torch.tensor([0, 1]))
        lams.append(float(remix.last.lam[0]))
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize('kwargs,message', [
    (dict(kappa=1.0), 'kappa'), (dict(kappa=0.5), 'kappa'), (dict(tau=0.0), 'tau'), (dict(tau=1.0), 'tau'),
    (dict(alpha=0.0), 'alpha'), (dict(mode='manifold'), 'manifold'), (dict(prob=1.5), 'prob'),
    (dict(label_smoothing=1.0), 'label_smoothing'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RemixMixup(C, COUNTS, **kwargs)


def test_bad_counts_and_shapes():
    with pytest.raises(ValueError, match='class_counts'):
        RemixMixup(3, [5, 0, 2])
    with pytest.raises(ValueError, match='class_counts'):
        RemixMixup(3, [5, -1, 2])
    with pytest.raises(ValueError, match='3 entries'):
        RemixMixup(4, [5, 1, 2])
    remix = RemixMixup(C, COUNTS)
    with pytest.raises(ValueError, match='shape'):
        remix(torch.zeros(4, 3, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='shape'):
        remix(torch.zeros(4, 3, 8, 8), torch.zeros(5, dtype=torch.long))
