"""timm's Mixup / CutMix on the device: the same batches and targets as timm's Mixup from the same generator state,
odd batches, the off epoch, the per-term loss under DRW, the law of lambda, bad options."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from timm.data import Mixup

from timm_cmo.data import MixInfo, MixupCutmix, cutmix_box
from timm_cmo.losses import class_balanced_weights, create_loss

C = 10

CONFIGS = {
    'mixup': dict(mixup_alpha=1.0),
    'cutmix-prob': dict(mixup_alpha=0., cutmix_alpha=1.0, prob=0.7),
    'both-switch': dict(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.3, prob=0.8),
    'minmax': dict(mixup_alpha=0.4, cutmix_minmax=(0.2, 0.8)),
    'cutmix-uncorrected': dict(mixup_alpha=0., cutmix_alpha=0.5, correct_lam=False),
}


@pytest.fixture
def global_numpy_state():
    """timm's Mixup draws from numpy's global generator: put it back after the test."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)


@pytest.mark.parametrize('config', list(CONFIGS))
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_same_batches_and_targets_as_timms_mixup(global_numpy_state, mode, config):
    """Started from the same generator state, ours and timm's Mixup give the same pixels and soft targets, bit for bit,
    batch after batch: the same decisions, lambdas, Mixup / CutMix choices and boxes, drawn in the same order."""
    ours = MixupCutmix(C, mode=mode, label_smoothing=0.1, seed=3, **CONFIGS[config])
    timms = Mixup(num_classes=C, mode=mode, label_smoothing=0.1, **CONFIGS[config])
    np.random.set_state(ours.rng.get_state())
    g = torch.Generator().manual_seed(0)
    mixed = 0
    for i in range(25):
        x = torch.randn(8, 3, 16, 12, generator=g)
        y = torch.randint(0, C, (8,), generator=g)
        xa, ta = ours(x.clone(), y)
        xb, tb = timms(x.clone(), y)
        assert torch.equal(xa, xb), i
        assert torch.equal(ta, tb), i
        torch.testing.assert_close(ours.last.target(C), ta, rtol=0, atol=0)
        mixed += int(not torch.equal(xa, x))
    assert mixed > 5
    assert np.random.rand() == ours.rng.rand()  # the streams are still in step


def coded_batch(b, h=8, w=8):
    """Sample i has every pixel equal to i + 1."""
    return (1. + torch.arange(b, dtype=torch.float32)).view(b, 1, 1, 1).expand(b, 3, h, w).clone()


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('cutmix', [False, True])
def test_odd_batch_mixes_its_middle_with_itself_or_not_at_all(mode, cutmix):
    """An odd batch (timm refuses one): every sample mixes with its reverse partner; the middle sample is its own
    partner (batch, elem) or unmixed (pair); pixels come from the sample and its partner only, lambda is their share."""
    b = 7
    kw = dict(mixup_alpha=0., cutmix_alpha=1.0) if cutmix else dict(mixup_alpha=1.0)
    mixer = MixupCutmix(C, mode=mode, seed=1, **kw)
    for _ in range(10):
        x = coded_batch(b)
        y = torch.arange(b)
        out, target = mixer(x, y)
        info = mixer.last
        assert torch.equal(info.y_b, y) and torch.equal(info.y_f, y.flip(0))
        lam = torch.as_tensor(info.lam, dtype=torch.float32).expand(b)
        own, partner = 1. + torch.arange(b).float(), 1. + torch.arange(b).flip(0).float()
        if cutmix:
            from_own = out[:, 0] == own.view(b, 1, 1)
            assert bool((from_own | (out[:, 0] == partner.view(b, 1, 1))).all())
            kept = from_own.float().mean(dim=(1, 2))
            kept[b // 2] = lam[b // 2]  # the middle sample's own and partner pixels are the same
            torch.testing.assert_close(kept, lam)
        else:
            torch.testing.assert_close(out[:, 0, 0, 0], lam * own + (1 - lam) * partner)
        if mode == 'pair':
            assert lam[b // 2] == 1 and bool((lam == lam.flip(0)).all())
        torch.testing.assert_close(target, info.target(C))
        torch.testing.assert_close(target.sum(1), torch.ones(b))


def test_off_epoch_stops_mixing_and_draws(global_numpy_state):
    """From ``off_epoch`` on nothing is mixed and nothing drawn, as timm's Mixup with ``mixup_enabled = False``."""
    mixer = MixupCutmix(C, mixup_alpha=1.0, cutmix_alpha=1.0, mode='elem', off_epoch=3, seed=0)
    assert [mixer.active(e) for e in range(5)] == [True, True, True, False, False]
    assert MixupCutmix(C, off_epoch=0).active(10 ** 6)
    timms = Mixup(num_classes=C, mixup_alpha=1.0, cutmix_alpha=1.0, mode='elem', label_smoothing=0.)
    for epoch in range(5):
        mixer.reseed(epoch)
        mixer.set_epoch(epoch)
        timms.mixup_enabled = epoch < 3
        np.random.set_state(mixer.rng.get_state())
        x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
        xa, ta = mixer(x.clone(), y)
        xb, tb = timms(x.clone(), y)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
        if epoch >= 3:
            assert torch.equal(xa, x) and bool((mixer.last.lam == 1).all())
            assert mixer.rng.rand() == np.random.rand() == np.random.RandomState(np.random.MT19937(epoch)).rand()


@pytest.mark.parametrize('mode', ['batch', 'elem'])
def test_mix_info_gives_the_per_term_loss_under_drw(mode):
    """With DRW weights on, ``loss(logits, target, mix=mixer.last)`` is lam * L(y) + (1 - lam) * L(y reversed), each term
    normalised by its own weights (per sample lam_i in elem mode), from a float64 reference."""
    counts = [500, 200, 80, 30, 12, 6, 3, 2, 2, 1]
    loss_fn = create_loss('ce', counts, reweight='drw', drw_epoch=0)
    loss_fn.set_epoch(0)
    mixer = MixupCutmix(C, mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, seed=5)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, C, (16,), generator=g)
    _, target = mixer(x, y)
    info = mixer.last
    logits = torch.randn(16, C, generator=g, dtype=torch.float64)
    w = class_balanced_weights(counts).double()
    lam = torch.as_tensor(info.lam, dtype=torch.float64).expand(16)
    ref = 0.
    for labels, share in ((y, lam), (y.flip(0), 1 - lam)):
        nll = F.cross_entropy(logits, labels, reduction='none')
        ref = ref + (share * w[labels] * nll).sum() / w[labels].sum()
    assert bool((lam < 1).any())
    torch.testing.assert_close(loss_fn(logits, target, mix=info), ref)


def test_lambda_law_and_switch_prob():
    """Batch mode: lambda ~ Beta(alpha, alpha) for Mixup; CutMix chosen with probability switch_prob; prob honoured."""
    mixer = MixupCutmix(C, mixup_alpha=0.4, prob=1.0, seed=0)
    lams = []
    for _ in range(1500):
        mixer(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
        lams.append(mixer.last.lam)
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    mixer = MixupCutmix(C, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3, prob=0.6, seed=1)
    n, mixed, cut = 1500, 0, 0
    for _ in range(n):
        x = coded_batch(2, 16, 16)
        out, _ = mixer(x, torch.tensor([0, 1]))
        if mixer.last.lam != 1.:
            mixed += 1
            cut += int(bool(((out == 1.) | (out == 2.)).all()))  # a CutMix batch has only whole pixel values
    assert stats.binomtest(mixed, n, 0.6).pvalue > 1e-3
    assert stats.binomtest(cut, mixed, 0.3).pvalue > 1e-3


def test_cutmix_box_is_timms():
    """The box extends (cut + 1) // 2 past the centre (the CMO paper's box: cut // 2); minmax sides are in [lo, hi)."""
    rng = np.random.RandomState(0)
    for lam in (0.0, 0.3, 0.7, 1.0):
        (y0, y1, x0, x1), corrected = cutmix_box((32, 24), lam, rng)
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 24
        assert y1 - y0 <= int(32 * np.sqrt(1 - lam)) and x1 - x0 <= int(24 * np.sqrt(1 - lam))
        assert corrected == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (32 * 24))
    (y0, y1, x0, x1), lam = cutmix_box((32, 32), 0.0, np.random.RandomState(1), correct_lam=False)
    assert lam == 0.0 and 16 <= y1 - y0 <= 32 and 16 <= x1 - x0 <= 32  # lambda as drawn, the box clipped
    sides = [cutmix_box((20, 20), 0.5, rng, minmax=(0.2, 0.8))[0] for _ in range(400)]
    heights = {y1 - y0 for y0, y1, _, _ in sides}
    assert heights == set(range(4, 16))
    with pytest.raises(ValueError, match='leaves no box size for 2x2'):
        cutmix_box((2, 2), 0.5, rng, minmax=(0.2, 0.4))


def test_unmixed_batch_and_reproducibility():
    mixer = MixupCutmix(C, prob=0.0, seed=0)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    out, target = mixer(x.clone(), y)
    assert torch.equal(out, x) and mixer.last == MixInfo(y, y, 1., 0.)
    torch.testing.assert_close(target, F.one_hot(y, C).float())
    runs = []
    for _ in range(2):
        mixer = MixupCutmix(C, mixup_alpha=1.0, cutmix_alpha=1.0, mode='pair', seed=9)
        runs.append([mixer(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)), y) for i in range(4)])
    for (xa, ta), (xb, tb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


@pytest.mark.parametrize('kwargs,message', [
    (dict(mixup_alpha=-1.), 'mixup_alpha must be >= 0'), (dict(cutmix_alpha=-0.5), 'cutmix_alpha must be >= 0'),
    (dict(mixup_alpha=0.), 'nothing to mix'), (dict(cutmix_minmax=(0.5,)), 'cutmix_minmax must be two'),
    (dict(cutmix_minmax=(0.8, 0.2)), 'cutmix_minmax must be two'), (dict(prob=1.5), 'prob must be in'),
    (dict(switch_prob=-0.1), 'switch_prob must be in'), (dict(mode='half'), "'half'"),
    (dict(label_smoothing=1.0), 'label_smoothing'), (dict(off_epoch=-1), 'off_epoch must be >= 0'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixupCutmix(C, **kwargs)


def test_bad_shapes():
    mixer = MixupCutmix(C)
    with pytest.raises(ValueError, match='shape'):
        mixer(torch.zeros(4, 3, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='shape'):
        mixer(torch.zeros(4, 3, 8, 8), torch.zeros(5, dtype=torch.long))
