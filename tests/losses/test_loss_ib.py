"""Influence-balanced loss against a float64 loop written from the paper's equations (values, gradients with respect to
the logits and the features), the norms of its influence factor, its CE phase and its mix forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_cmo.data import MixInfo, soft_target
from timm_cmo.losses import class_balanced_weights, create_loss, ib_class_weights, influence_factor

COUNTS = [400, 150, 60, 20, 7, 3]
C = len(COUNTS)
B = 10
D = 5


def ref_ib(x, h, y, alpha=1000., eps=1e-3, weight=None, gamma=0., share=None, y2=None, smoothing=0.):
    """1/B sum_i w_y l_i(y) alpha / (||p_i - t_i||_1 ||h_i||_1 + eps), loop-based; ``y2`` with ``share``: the
    per-term mix share_i * n_i(y) + (1 - share_i) * n_i(y2)."""
    Bn, Cn = x.shape
    w = [1.] * Cn if weight is None else [float(v) for v in weight]

    def n_i(i, label):
        e = torch.exp(x[i] - x[i].max())
        p = e / e.sum()
        t = [smoothing / Cn + (1 - smoothing) * (k == label) for k in range(Cn)]
        grad_l1 = sum(abs(p[k] - t[k]) for k in range(Cn))  # |d CE / d logits|_1
        feat_l1 = sum(abs(h[i, d]) for d in range(h.shape[1]))
        loss = sum(t[k] * w[k] * (1 - p[k]) ** gamma * -torch.log(p[k]) for k in range(Cn))
        return loss * alpha / (grad_l1 * feat_l1 + eps)

    total = 0.
    for i in range(Bn):
        if y2 is None:
            total = total + n_i(i, int(y[i]))
        else:
            total = total + share[i] * n_i(i, int(y[i])) + (1 - share[i]) * n_i(i, int(y2[i]))
    return total / Bn


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    h = torch.randn(B, D, generator=g, dtype=torch.float64).relu() + 0.05  # post-ReLU pooled features
    y = torch.randint(0, C, (B,), generator=g)
    y2 = torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    return x, h, y, y2, lam


def make(name='ib', start_epoch=2, epoch=2, **kw):
    loss = create_loss(name, COUNTS, start_epoch=start_epoch, **kw)
    loss.set_epoch(epoch)
    return loss


def grads(fn, x, h):
    x = x.detach().clone().requires_grad_(True)
    h = h.detach().clone().requires_grad_(True)
    v = fn(x, h)
    gx, gh = torch.autograd.grad(v, (x, h))
    return v.detach(), gx, gh


def assert_same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


def test_class_weights_are_inverse_frequency_summing_to_c():
    w = ib_class_weights(COUNTS).double()
    inv = torch.tensor([1. / n for n in COUNTS], dtype=torch.float64)
    torch.testing.assert_close(w, inv / inv.sum() * C, rtol=1e-7, atol=0)
    assert float(w.sum()) == pytest.approx(C)


def test_influence_factor_norms():
    """||p - e_y||_1 = 2 (1 - p_y) for a hard label; ||h||_1 sums |h_d| over the feature dimensions."""
    x, h, y, _, _ = batch(1)
    h = h * torch.where(torch.arange(D) % 2 == 0, 1., -1.).double()  # negative entries count by magnitude
    p = F.softmax(x, 1)
    factor = influence_factor(p, F.one_hot(y, C).double(), h, 1000., 1e-3)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(factor, 1000. / (2 * (1 - p_y) * h.abs().sum(1) + 1e-3))
    assert not torch.allclose(factor, 1000. / (2 * (1 - p_y) * h.norm(dim=1) + 1e-3))  # L1, not L2


@pytest.mark.parametrize('name,gamma', [('ib', 0.), ('ib_focal', 1.), ('ib_focal', 2.)])
@pytest.mark.parametrize('weighting,reweight', [('inverse', 'none'), ('none', 'none'), ('none', 'cb')])
def test_values_and_gradients_match_the_papers_equations(name, gamma, weighting, reweight):
    x, h, y, _, _ = batch(2)
    loss = make(name, gamma=gamma, weighting=weighting, reweight=reweight)
    weight = {'inverse': ib_class_weights(COUNTS), 'none': None}[weighting]
    if reweight == 'cb':
        weight = class_balanced_weights(COUNTS)
    got = grads(lambda a, b: loss(a, y, features=b), x, h)
    ref = grads(lambda a, b: ref_ib(a, b, y, weight=weight, gamma=gamma), x, h)
    assert_same(got, ref, rtol=1e-6, atol=1e-8)  # the class weights are float32 buffers


def test_gradcheck_float64_through_logits_and_features():
    x, h, y, y2, lam = batch(3)
    loss = make(weighting='none', alpha=2.0)  # alpha scales the loss only
    xs, hs = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, y, features=b), (xs, hs))
    assert torch.autograd.gradcheck(lambda a, b: loss(a, MixInfo(y, y2, lam, 0.1), features=b), (xs, hs))


def test_ce_before_the_start_epoch():
    """Plain unweighted CE before start_epoch (the features are not read), IB from it on."""
    x, h, y, y2, _ = batch(4)
    loss = create_loss('ib', COUNTS, start_epoch=3)
    for epoch in range(3):
        loss.set_epoch(epoch)
        assert not loss.active
        torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y))
        torch.testing.assert_close(loss(x, MixInfo(y, y2, 0.4), features=None),
                                   0.4 * F.cross_entropy(x, y) + 0.6 * F.cross_entropy(x, y2))
    loss.set_epoch(3)
    assert loss.active
    with pytest.raises(ValueError, match='needs the penultimate features from its start epoch on'):
        loss(x, y)
    torch.testing.assert_close(loss(x, y, features=h), ref_ib(x, h, y, weight=ib_class_weights(COUNTS)), rtol=1e-6,
                               atol=1e-8)


def test_start_epoch_defaults_to_half_the_epochs():
    assert create_loss('ib', COUNTS, epochs=200).start_epoch == 100
    assert create_loss('ib', COUNTS, epochs=101).start_epoch == 50
    assert create_loss('ib', COUNTS, epochs=200, start_epoch=7).start_epoch == 7
    with pytest.raises(ValueError, match='needs its start epoch'):
        create_loss('ib', COUNTS)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mix_is_the_per_term_form(smoothing):
    """Each term's influence factor uses its own label: lam * L_IB(y_b) + (1 - lam) * L_IB(y_f)."""
    x, h, y, y2, lam = batch(5)
    loss = make()
    mixed = grads(lambda a, b: loss(a, MixInfo(y, y2, 0.3, smoothing), features=b), x, h)
    if smoothing == 0:
        two = grads(lambda a, b: 0.3 * loss(a, y, features=b) + 0.7 * loss(a, y2, features=b), x, h)
        assert_same(mixed, two)
    w = ib_class_weights(COUNTS)
    per_sample = grads(lambda a, b: loss(a, MixInfo(y, y2, lam, smoothing), features=b), x, h)
    ref = grads(lambda a, b: ref_ib(a, b, y, weight=w, share=lam, y2=y2, smoothing=smoothing), x, h)
    assert_same(per_sample, ref, rtol=1e-6, atol=1e-8)
    # not the influence of the mixed soft target: ||p - (lam e_b + (1 - lam) e_f)||_1 would differ
    t = MixInfo(y, y2, lam, smoothing).target(C).double()
    assert not torch.allclose(per_sample[0], loss(x, t, features=h), rtol=1e-3)
    torch.testing.assert_close(loss(x, MixInfo(y, y, 1.0), features=h), loss(x, y, features=h))


def test_soft_target_uses_its_own_gradient_norm():
    x, h, y, _, _ = batch(6)
    loss = make(weighting='none')
    t = soft_target(y, C, 0.2).double()
    p = F.softmax(x, 1)
    expected = ((-(t * F.log_softmax(x, 1)).sum(1)) * 1000. / ((p - t).abs().sum(1) * h.abs().sum(1) + 1e-3)).mean()
    torch.testing.assert_close(loss(x, t, features=h), expected)
    torch.testing.assert_close(loss(x, F.one_hot(y, C).double(), features=h), loss(x, y, features=h))


def test_reductions():
    x, h, y, _, _ = batch(7)
    per = make(reduction='none')(x, y, features=h)
    assert per.shape == (B,)
    torch.testing.assert_close(make(reduction='sum')(x, y, features=h), per.sum())
    torch.testing.assert_close(make()(x, y, features=h), per.sum() / B)  # divides by B, not by the weights' sum


def test_drw_switches_class_weights_in_the_ib_phase():
    x, h, y, _, _ = batch(8)
    loss = create_loss('ib', COUNTS, start_epoch=1, weighting='none', reweight='drw', drw_epoch=3)
    loss.set_epoch(2)
    torch.testing.assert_close(loss(x, y, features=h), ref_ib(x, h, y))
    loss.set_epoch(3)
    torch.testing.assert_close(loss(x, y, features=h), ref_ib(x, h, y, weight=class_balanced_weights(COUNTS)),
                               rtol=1e-6, atol=1e-8)


def test_low_precision():
    x, h, y, _, _ = batch(9)
    loss = make()
    out = loss(x.half(), y, features=h.half())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, loss(x.half().float(), y, features=h.half().float()))


def test_bad_input_and_options():
    x, h, y, _, _ = batch(10)
    loss = make()
    with pytest.raises(ValueError, match=r'\(B, D\) pooled pre-logit features of the batch of 10, got shape'):
        loss(x, y, features=h[:, :, None, None])
    with pytest.raises(ValueError, match='features must be a floating-point tensor'):
        loss(x, y, features=h.long())
    with pytest.raises(ValueError, match="own inverse-frequency class weights"):
        create_loss('ib', COUNTS, epochs=10, reweight='cb')
    with pytest.raises(ValueError, match="Unknown IB weighting 'sqrt'"):
        create_loss('ib', COUNTS, epochs=10, weighting='sqrt')
    with pytest.raises(ValueError, match='alpha must be finite and positive, got 0'):
        create_loss('ib', COUNTS, epochs=10, alpha=0)
    with pytest.raises(ValueError, match='start_epoch must be a non-negative integer'):
        create_loss('ib', COUNTS, start_epoch=-1)
    with pytest.raises(TypeError, match=r"\['max_m'\]"):
        create_loss('ib', COUNTS, epochs=10, max_m=0.5)


def test_registered_with_the_authors_defaults():
    ib, focal = create_loss('ib', COUNTS, epochs=200), create_loss('ib_focal', COUNTS, epochs=200)
    for loss in (ib, focal):
        assert type(loss).needs_features is True
        assert (loss.alpha, loss.epsilon, loss.start_epoch, loss.weighting) == (1000., 1e-3, 100, 'inverse')
    assert ib.gamma == 0. and focal.gamma == 1.
    assert 'start_epoch=100' in repr(ib) and 'gamma=1.0' in repr(focal)
    assert math.isclose(float(ib.weight.sum()), C, rel_tol=1e-6)
