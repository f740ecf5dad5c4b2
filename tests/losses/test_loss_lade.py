"""LADE (PC softmax + LADE regulariser) against a float64 loop written from the paper's equations; its mix forms and
its test-time prior correction."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm_cmo
from timm_cmo.data import MixInfo
from timm_cmo.losses import LADE_DEFAULTS, class_balanced_weights, create_loss, prior_corrected_logits

COUNTS = [400, 150, 60, 20, 7, 3]
C = len(COUNTS)
B = 12


def ref_lade(x, y, alpha=0.1, lam=0.1, counts=COUNTS, share=None, y2=None, smoothing=0.0, weight=None,
             soft=None):
    """L = CE(x + log p, y) + alpha * R, R = -sum_c p_c (T1_c - T2_c - lam T2_c^2), written with loops.

    ``share`` (B,) with ``y2``: the per-term mix ``share_i`` on ``y``, ``1 - share_i`` on ``y2``. ``soft``: a (B, C)
    soft target as soft class membership (no mix).
    """
    n = torch.tensor(counts, dtype=torch.float64)
    p = n / n.sum()
    Bn, Cn = x.shape
    w = torch.ones(Cn, dtype=torch.float64) if weight is None else weight.double()

    def ce_term(labels, s):
        num, den = 0., 0.
        for i in range(Bn):
            z = x[i] + torch.log(p)
            logp = z - torch.log(torch.exp(z).sum())
            t = torch.full((Cn,), smoothing / Cn, dtype=torch.float64)
            t[labels[i]] += 1 - smoothing
            num = num + s[i] * -(t * w * logp).sum()
            den = den + (t * w).sum()
        return num / den

    ones = torch.ones(Bn, dtype=torch.float64)
    if soft is not None:
        logp = torch.log_softmax(x + torch.log(p), dim=1)
        ce = -(soft * logp).sum() / soft.sum()
    elif y2 is None:
        ce = ce_term(y, ones)
    else:
        ce = ce_term(y, share) + ce_term(y2, 1 - share)
    R = 0.
    for c in range(Cn):
        if soft is not None:
            t1 = (soft[:, c] * x[:, c]).sum() / soft[:, c].sum()
        else:
            terms = [(y, ones)] if y2 is None else [(y, share), (y2, 1 - share)]
            t1 = 0.
            for labels, s in terms:
                members = [i for i in range(Bn) if labels[i] == c]
                if members:
                    t1 = t1 + sum(s[i] * x[i, c] for i in members) / len(members)
        # the balanced marginal's expectation from the batch, re-weighted by p_u(c) / p_s(c)
        t2 = torch.log(sum(torch.exp(x[i, c]) * (1. / Cn) / p[c] for i in range(Bn)) / Bn)
        R = R - p[c] * (t1 - t2 - lam * t2 ** 2)
    return ce + alpha * R


def batch(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C - 1, (B,), generator=g)  # the rarest class is absent from the batch
    y2 = torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    return x, y, y2, lam


def grads(fn, x):
    x = x.detach().clone().requires_grad_(True)
    v = fn(x)
    g, = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize('alpha,lam', [(0.1, 0.1), (0.1, 0.01), (0.05, 0.5), (1.0, 0.0)])
def test_values_and_gradients_match_the_papers_equations(alpha, lam):
    x, y, _, _ = batch(1)
    assert (y == C - 1).sum() == 0  # an absent class still enters R through T2
    loss = create_loss('lade', COUNTS, alpha=alpha, remine_lambda=lam)
    got, g_got = grads(lambda z: loss(z, y), x)
    ref, g_ref = grads(lambda z: ref_lade(z, y, alpha, lam), x)
    # the PC-softmax offset is kept as a float32 buffer (as Balanced Softmax's): float32-level agreement
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-6)
    # the regulariser alone is float64 throughout
    reg_ref = (ref_lade(x, y, 1.0, lam) - ref_lade(x, y, 0.0, lam))
    torch.testing.assert_close(loss.regularizer(x, y), reg_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    x, y, y2, lam = batch(2, scale=1.0)
    loss = create_loss('lade', COUNTS, alpha=0.3, remine_lambda=0.2)
    z = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))
    assert torch.autograd.gradcheck(lambda t: loss(t, MixInfo(y, y2, lam)), (z,))


def test_alpha_zero_is_balanced_softmax():
    x, y, _, _ = batch(3)
    torch.testing.assert_close(create_loss('lade', COUNTS, alpha=0.)(x, y), create_loss('bs', COUNTS)(x, y))


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mix_is_the_per_term_form(smoothing):
    """Scalar lam: lam L(y_b) + (1 - lam) L(y_f); per-sample lam and smoothing against the loop reference
    (smoothing smooths the CE target only; the regulariser's class membership stays the labels')."""
    x, y, y2, lam = batch(4)
    loss = create_loss('lade', COUNTS, alpha=0.2, remine_lambda=0.05)
    mixed, g_mixed = grads(lambda z: loss(z, MixInfo(y, y2, 0.3)), x)
    two, g_two = grads(lambda z: 0.3 * loss(z, y) + 0.7 * loss(z, y2), x)
    torch.testing.assert_close(mixed, two)
    torch.testing.assert_close(g_mixed, g_two)
    got, g_got = grads(lambda z: loss(z, MixInfo(y, y2, lam, smoothing)), x)
    ref, g_ref = grads(lambda z: ref_lade(z, y, 0.2, 0.05, share=lam, y2=y2, smoothing=smoothing), x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-6)
    # an unmixed batch of a CMO loader is the hard-label loss
    torch.testing.assert_close(loss(x, MixInfo(y, y, 1.0)), loss(x, y))


def test_smoothing_leaves_the_regulariser_alone():
    x, y, y2, lam = batch(5)
    loss = create_loss('lade', COUNTS)
    torch.testing.assert_close(loss.regularizer(x, MixInfo(y, y2, lam, 0.2)), loss.regularizer(x, MixInfo(y, y2, lam)))


def test_soft_target_is_soft_membership():
    x, y, y2, lam = batch(6)
    t = lam[:, None] * F.one_hot(y, C).double() + (1 - lam[:, None]) * F.one_hot(y2, C).double()
    loss = create_loss('lade', COUNTS, alpha=0.5, remine_lambda=0.1)
    got, g_got = grads(lambda z: loss(z, t), x)
    ref, g_ref = grads(lambda z: ref_lade(z, y, 0.5, 0.1, soft=t), x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-6)
    # the per-class means of T1 normalise a soft target jointly: not the paper's per-term loss of the mix
    assert not torch.allclose(loss(x, t), loss(x, MixInfo(y, y2, lam)), rtol=1e-4)


@pytest.mark.parametrize('reweight,epoch', [('cb', 0), ('drw', 1), ('drw', 2)])
def test_reweight_weighs_the_pc_softmax_only(reweight, epoch):
    x, y, y2, lam = batch(7)
    loss = create_loss('lade', COUNTS, reweight=reweight, drw_epoch=2, alpha=0.3, remine_lambda=0.1)
    loss.set_epoch(epoch)
    weight = class_balanced_weights(COUNTS) if loss.weight is not None else None
    assert (weight is None) == (reweight == 'drw' and epoch < 2)
    got = loss(x, MixInfo(y, y2, lam))
    torch.testing.assert_close(got, ref_lade(x, y, 0.3, 0.1, share=lam, y2=y2, weight=weight), rtol=1e-6, atol=1e-6)


def test_low_precision_and_float64():
    x, y, _, _ = batch(8)
    loss = create_loss('lade', COUNTS)
    out = loss(x.half(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, loss(x.half().float(), y))
    assert loss(x, y).dtype == torch.float64


def test_prior_correction():
    """Balanced test set: the raw logits (LADE's f + log(1/C) is a constant shift); a shifted prior adds its log."""
    x, _, _, _ = batch(9)
    loss = create_loss('lade', COUNTS)
    assert loss.logits_prior == 'uniform'
    assert loss.prior_corrected_logits(x) is x
    test_counts = [5, 10, 20, 40, 80, 160]
    p = torch.tensor(test_counts, dtype=torch.float64) / sum(test_counts)
    torch.testing.assert_close(loss.prior_corrected_logits(x, test_counts), x + torch.log(p))
    torch.testing.assert_close(prior_corrected_logits(x, p), x + torch.log(p))
    # a uniform target prior changes neither the prediction nor the softmax
    uniform = loss.prior_corrected_logits(x, [1.] * C)
    torch.testing.assert_close(F.softmax(uniform, 1), F.softmax(x, 1))
    # cross-entropy logits carry the training prior: logits - log p_train + log p_test
    n = torch.tensor(COUNTS, dtype=torch.float64)
    torch.testing.assert_close(prior_corrected_logits(x, p, logits_prior=COUNTS),
                               x - torch.log(n / n.sum()) + torch.log(p))
    # a test prior may leave a class out (never predicted); a logits prior may not
    out = prior_corrected_logits(x, [0., 1., 1., 1., 1., 1.])
    assert torch.isinf(out[:, 0]).all() and bool((out.argmax(1) != 0).all())
    with pytest.raises(ValueError, match='logits_prior must be finite and positive; classes \\[2\\]'):
        prior_corrected_logits(x, logits_prior=[1., 1., 0., 1., 1., 1.])
    with pytest.raises(ValueError, match='test_prior must have one entry per class \\(6\\)'):
        prior_corrected_logits(x, [1., 2.])
    with pytest.raises(ValueError, match='test_prior must be finite and non-negative'):
        prior_corrected_logits(x, [1., -1., 1., 1., 1., 1.])


def test_defaults_options_and_errors():
    assert timm_cmo.losses.is_loss('lade')
    loss = create_loss('lade', COUNTS)
    assert (loss.alpha, loss.remine_lambda) == (0.1, 0.1)
    assert 'alpha=0.1, remine_lambda=0.1' in repr(loss)
    assert LADE_DEFAULTS['cifar100_lt'] == dict(alpha=0.1, remine_lambda=0.01)
    assert LADE_DEFAULTS['inat2018'] == dict(alpha=0.05, remine_lambda=0.5)
    assert create_loss('lade', COUNTS, **LADE_DEFAULTS['imagenet_lt']).remine_lambda == 0.5
    with pytest.raises(ValueError, match="reduction='mean' only"):
        create_loss('lade', COUNTS, reduction='sum')
    with pytest.raises(ValueError, match='alpha must be finite and non-negative, got -1'):
        create_loss('lade', COUNTS, alpha=-1)
    with pytest.raises(ValueError, match='remine_lambda must be finite and non-negative'):
        create_loss('lade', COUNTS, remine_lambda=math.nan)
    x, y, _, _ = batch(10)
    with pytest.raises(ValueError, match=r'class indices must be in \[0, 6\)'):
        loss(x, y + 10)
