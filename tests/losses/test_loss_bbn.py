"""BBN's cumulative-learning loss: alpha's law, the loss against float64 equations (plain, with CMO's mix in batch and
elem mode, with label smoothing; values and gradients), the denominators of gradient accumulation, bad input."""
import numpy as np
import pytest
import torch

import timm_cmo
from timm_cmo.data import DualBatch, MixInfo
from timm_cmo.losses import BBNLoss, bbn_alpha

COUNTS = [500, 200, 80, 30, 12, 5]


def test_alpha_first_last_and_law():
    """alpha = 1 - (t / T)^2 in 0-based epoch t: 1 in the first epoch, 1 - ((T - 1) / T)^2 in the last (BBN's
    1 - ((epoch - 1) / T)^2 with its 1-based epoch), decreasing, and T = 200 for the 180-epoch iNaturalist schedule."""
    loss = timm_cmo.create_loss('bbn', COUNTS, epochs=200)
    assert loss.alpha_epochs == 200
    loss.set_epoch(0)
    assert loss.alpha == 1.0
    loss.set_epoch(199)
    assert loss.alpha == pytest.approx(1 - (199 / 200) ** 2, abs=1e-15) == pytest.approx(0.009975, abs=1e-12)
    alphas = []
    for t in range(200):
        loss.set_epoch(t)
        bbn_epoch = t + 1  # the authors' combiner: l = 1 - ((self.epoch - 1) / self.div_epoch) ** 2
        assert loss.alpha == pytest.approx(1 - ((bbn_epoch - 1) / 200) ** 2, abs=1e-15)
        alphas.append(loss.alpha)
    assert all(a > b for a, b in zip(alphas, alphas[1:])) and min(alphas) > 0
    inat = timm_cmo.create_loss('bbn', COUNTS, epochs=180, alpha_epochs=200)
    inat.set_epoch(179)
    assert inat.alpha == pytest.approx(1 - (179 / 200) ** 2) == pytest.approx(0.19898, abs=1e-5)
    assert bbn_alpha(50, 100) == 0.75


def ce64(z, y, smoothing=0.0):
    """Per-sample cross-entropy in float64 from its definition, timm's smoothing: t = (1 - s) e_y + s / C."""
    z = z.double()
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    c = z.shape[1]
    t = torch.full_like(z, smoothing / c)
    t[torch.arange(len(y)), y] += 1 - smoothing
    return -(t * logp).sum(1)


@pytest.mark.parametrize('case', ['plain', 'cmo-batch', 'cmo-elem', 'smoothing', 'cmo-smoothing'])
@pytest.mark.parametrize('epoch', [0, 3, 7])
def test_loss_is_the_papers_with_and_without_cmo(case, epoch):
    """alpha * CE(y_c) + (1 - alpha) * CE(y_r); with CMO alpha * [lam CE(y_b) + (1 - lam) CE(y_f)] + (1 - alpha)
    CE(y_r) (lam per sample in elem mode); each CE a batch mean; gradients w.r.t. the logits as the float64 one's
    (to float32 round-off with smoothing: the plugin's smoothed targets are float32, as timm's)."""
    g = torch.Generator().manual_seed(epoch)
    b, c = 12, len(COUNTS)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64).requires_grad_()
    y_b, y_f, y_r = (torch.randint(0, c, (b,), generator=g) for _ in range(3))
    s = 0.1 if 'smoothing' in case else 0.0
    lam = torch.rand(b, generator=g, dtype=torch.float64) if case == 'cmo-elem' else 0.35
    loss_fn = timm_cmo.create_loss('bbn', COUNTS, epochs=8)
    loss_fn.set_epoch(epoch)
    alpha = 1 - (epoch / 8) ** 2
    dual = DualBatch(torch.zeros(b, 3, 4, 4), y_r, s)
    with torch.no_grad():
        if case.startswith('cmo'):
            conventional = (lam * ce64(logits, y_b, s)).mean() + ((1 - lam) * ce64(logits, y_f, s)).mean()
        else:
            conventional = ce64(logits, y_b, s).mean()
        expected = alpha * conventional + (1 - alpha) * ce64(logits, y_r, s).mean()
    if case.startswith('cmo'):
        mix = MixInfo(y_b, y_f, lam, s)
        got = loss_fn(logits, mix.target(c).double(), mix=mix, dual=dual)
    elif s:
        mix = MixInfo(y_b, y_b, 1., s)  # the loader's smoothed, unmixed batch
        got = loss_fn(logits, mix.target(c).double(), mix=mix, dual=dual)
    else:
        got = loss_fn(logits, y_b, dual=dual)
    tol = dict(rtol=1e-6, atol=1e-7) if s else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, **tol)
    got.backward()
    ref = logits.detach().clone().requires_grad_()
    if case.startswith('cmo'):
        conv = (lam * ce64(ref, y_b, s)).mean() + ((1 - lam) * ce64(ref, y_f, s)).mean()
    else:
        conv = ce64(ref, y_b, s).mean()
    (alpha * conv + (1 - alpha) * ce64(ref, y_r, s).mean()).backward()
    torch.testing.assert_close(logits.grad, ref.grad, **tol)


def test_micro_batch_denominators_add_up_to_the_whole_batch():
    """normalizer gives the three denominators; the micro-batch losses with their sums as norm add up to the
    concatenated batch's loss (what --grad-accum-steps relies on), mixed and unmixed micro-batches together."""
    g = torch.Generator().manual_seed(0)
    loss_fn = timm_cmo.create_loss('bbn', COUNTS, epochs=4)
    loss_fn.set_epoch(2)
    parts = []
    for b, lam in ((8, 0.4), (5, 1.0), (7, torch.rand(7, generator=g))):
        z = torch.randn(b, 6, generator=g, dtype=torch.float64)
        y_b, y_f, y_r = (torch.randint(0, 6, (b,), generator=g) for _ in range(3))
        mix = MixInfo(y_b, y_b if isinstance(lam, float) and lam == 1. else y_f, lam, 0.1)
        parts.append((z, mix, DualBatch(torch.zeros(b, 1), y_r, 0.1)))
    norms = [loss_fn.normalizer(mix.target(6), mix, dual=dual) for _, mix, dual in parts]
    assert all(n.shape == (3,) for n in norms)
    total = sum(norms)
    summed = sum(loss_fn(z, mix.target(6), mix=mix, norm=total, dual=dual) for z, mix, dual in parts)
    z = torch.cat([p[0] for p in parts])
    lam = torch.cat([torch.as_tensor(m.lam, dtype=torch.float64).expand(len(m.y_b)) for _, m, _ in parts])
    mix = MixInfo(torch.cat([m.y_b for _, m, _ in parts]), torch.cat([m.y_f for _, m, _ in parts]), lam, 0.1)
    whole = loss_fn(z, mix.target(6), mix=mix, dual=DualBatch(None, torch.cat([d.y for *_, d in parts]), 0.1))
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="reweight must be 'none'"):
        timm_cmo.create_loss('bbn', COUNTS, reweight='drw', epochs=10)
    with pytest.raises(ValueError, match='needs the number of epochs'):
        BBNLoss(COUNTS)
    with pytest.raises(ValueError, match=r'alpha_epochs must be >= epochs \(10\)'):
        BBNLoss(COUNTS, epochs=10, alpha_epochs=9)
    loss = BBNLoss(COUNTS, epochs=10)
    with pytest.raises(ValueError, match='needs the dual'):
        loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='3 labels for a batch of 4'):
        loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), dual=DualBatch(None, torch.zeros(3, dtype=torch.long)))
    assert loss.needs_dual and 'bbn' in timm_cmo.list_losses()
    assert np.isclose(loss.alpha, 1.0)
