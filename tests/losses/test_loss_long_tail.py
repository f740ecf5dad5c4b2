"""Long-tail losses vs. independent float64 references written with plain formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm_cmo
from timm_cmo.losses import class_balanced_weights, create_loss, ldam_margins

COUNTS = [1000, 400, 150, 60, 20, 7, 3]
C = len(COUNTS)
B = 10
NAMES = ['ce', 'ldam', 'bs', 'focal', 'la']
KWARGS = {'ce': {}, 'ldam': {'s': 30.0, 'max_m': 0.5}, 'bs': {}, 'focal': {'gamma': 2.0},
          'la': {'tau': 1.5}}
DRW_EPOCH = 3


# ---------------------------------------------------------------- independent references

def ref_cb_weights(counts, beta=0.9999):
    w = [(1.0 - beta) / (1.0 - beta ** n) for n in counts]
    total = sum(w)
    return [wk / total * len(counts) for wk in w]


def ref_ce(a, k):
    """-log softmax(a)_k = log(sum_j exp(a_j - a_k)), accurate also when a_k dominates."""
    others = torch.cat([a[:, :k], a[:, k + 1:]], dim=1) - a[:, k:k + 1]  # a_j - a_k, j != k
    mx = others.max(dim=1).values.clamp_min(0)
    general = mx + torch.log(torch.exp(-mx) + torch.exp(others - mx[:, None]).sum(dim=1))
    top = torch.log1p(torch.exp(others.clamp_max(0)).sum(dim=1))  # a_k is the max
    return torch.where(mx == 0, top, general)


def ref_class_losses(name, x, counts, s=30.0, max_m=0.5, gamma=2.0, tau=1.5):
    """(B, C) float64 per-class losses l_ik; O(B C^2) and loop-based on purpose."""
    n = torch.tensor(counts, dtype=torch.float64)
    log_prior = torch.log(n / n.sum())
    cols = []
    for k in range(x.shape[1]):
        if name == 'ldam':
            m = [1.0 / c ** 0.25 for c in counts]
            m_k = m[k] * max_m / max(m)
            a = s * (x - m_k * F.one_hot(torch.tensor(k), x.shape[1]).to(x))
        elif name == 'bs':
            a = x + log_prior
        elif name == 'la':
            a = x + tau * log_prior
        else:
            a = x
        ce_k = ref_ce(a, k)
        if name == 'focal':
            p_k = torch.exp(-ce_k)
            ce_k = (1.0 - p_k) ** gamma * ce_k
        cols.append(ce_k)
    return torch.stack(cols, dim=1)


def ref_loss(name, x, target, weights=None, reduction='mean', **kw):
    """Target-weighted sum normalised by sum t_ik w_k (integer targets as one-hot)."""
    L = ref_class_losses(name, x, COUNTS, **kw)
    Bn, Cn = L.shape
    if not target.is_floating_point():
        target = F.one_hot(target, Cn).double()
    w = [1.0] * Cn if weights is None else weights
    per_sample, norm = [], 0.0
    for i in range(Bn):
        acc = 0.0
        for k in range(Cn):
            acc = acc + target[i, k] * w[k] * L[i, k]
            norm = norm + float(target[i, k]) * w[k]
        per_sample.append(acc)
    per_sample = torch.stack(per_sample)
    if reduction == 'none':
        return per_sample
    return per_sample.sum() if reduction == 'sum' else per_sample.sum() / norm


# ---------------------------------------------------------------- helpers

def make_logits(name, seed, b=B, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if name == 'ldam':  # cosine classifier outputs
        return (torch.rand(b, C, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    return (torch.randn(b, C, generator=g, dtype=torch.float64) * 2).to(dtype)


def make_targets(kind, seed, b=B):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == 'hard':
        return torch.randint(0, C, (b,), generator=g)
    t = torch.rand(b, C, generator=g, dtype=torch.float64) ** 3  # rows not normalised on purpose
    t[0] = 0
    t[0, C - 1] = 1.0
    return t.float()


def build(name, reweight, **extra):
    kw = dict(KWARGS[name], **extra)
    loss = create_loss(name, COUNTS, reweight=reweight, drw_epoch=DRW_EPOCH, **kw)
    if reweight == 'drw':
        loss.set_epoch(DRW_EPOCH)
    return loss


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    g, = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize('reweight', ['none', 'cb', 'drw'])
@pytest.mark.parametrize('kind', ['hard', 'soft'])
@pytest.mark.parametrize('name', NAMES)
def test_matches_reference(name, kind, reweight):
    loss = build(name, reweight)
    weights = None if reweight == 'none' else ref_cb_weights(COUNTS)
    x = make_logits(name, seed=3)
    t = make_targets(kind, seed=3)
    t64 = t.double() if kind == 'soft' else t
    out, grad = value_and_grad(lambda z: loss(z, t), x)
    ref, ref_grad = value_and_grad(lambda z: ref_loss(name, z, t64, weights, **KWARGS[name]), x.double())
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize('reduction', ['sum', 'none'])
@pytest.mark.parametrize('kind', ['hard', 'soft'])
@pytest.mark.parametrize('name', NAMES)
def test_reductions_match_reference(name, kind, reduction):
    loss = build(name, 'cb', reduction=reduction)
    x = make_logits(name, seed=5)
    t = make_targets(kind, seed=5)
    t64 = t.double() if kind == 'soft' else t
    out, grad = value_and_grad(lambda z: loss(z, t), x)
    ref, ref_grad = value_and_grad(
        lambda z: ref_loss(name, z, t64, ref_cb_weights(COUNTS), reduction=reduction, **KWARGS[name]),
        x.double())
    assert out.shape == ((B,) if reduction == 'none' else ())
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('name', NAMES)
def test_defaults_match_reference(name):
    """Default hyper-parameters: ldam s=30, max_m=0.5; focal gamma=1; la tau=1."""
    loss = create_loss(name, COUNTS)
    x = make_logits(name, seed=9)
    t = make_targets('soft', seed=9)
    kw = {'ce': {}, 'bs': {}, 'ldam': {'s': 30.0, 'max_m': 0.5}, 'focal': {'gamma': 1.0},
          'la': {'tau': 1.0}}[name]
    ref = ref_loss(name, x.double(), t.double(), **kw)
    torch.testing.assert_close(loss(x, t).double(), ref, rtol=2e-6, atol=1e-6)


def test_la_tau_one_is_balanced_softmax():
    x, t = make_logits('la', 1), make_targets('hard', 1)
    torch.testing.assert_close(create_loss('la', COUNTS)(x, t), create_loss('bs', COUNTS)(x, t))


def test_focal_gamma_zero_is_ce():
    x, t = make_logits('focal', 2), make_targets('hard', 2)
    torch.testing.assert_close(
        create_loss('focal', COUNTS, gamma=0.0)(x, t), create_loss('ce', COUNTS)(x, t))


@pytest.mark.parametrize('name', NAMES)
def test_one_hot_soft_equals_hard(name):
    loss = build(name, 'cb')
    x, y = make_logits(name, 4), make_targets('hard', 4)
    torch.testing.assert_close(loss(x, F.one_hot(y, C).float()), loss(x, y), rtol=1e-6, atol=1e-6)


def test_ce_explicit_weight():
    w = torch.linspace(0.5, 2.0, C)
    loss = create_loss('ce', COUNTS, weight=w)
    x, y = make_logits('ce', 6), make_targets('hard', 6)
    torch.testing.assert_close(loss.weight, w)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, weight=w))
    t = make_targets('soft', 6)
    ref = ref_loss('ce', x.double(), t.double(), w.double().tolist())
    torch.testing.assert_close(loss(x, t).double(), ref, rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------- paper code, bit for bit

class PaperLDAMLoss(torch.nn.Module):
    """LDAMLoss from the LDAM-DRW code (CPU edition)."""

    def __init__(self, cls_num_list, max_m=0.5, weight=None, s=30):
        super().__init__()
        m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
        m_list = m_list * (max_m / np.max(m_list))
        self.m_list = torch.FloatTensor(m_list)
        self.s = s
        self.weight = weight

    def forward(self, x, target):
        index = torch.zeros_like(x, dtype=torch.uint8)
        index.scatter_(1, target.data.view(-1, 1), 1)
        index_float = index.type(torch.FloatTensor)
        batch_m = torch.matmul(self.m_list[None, :], index_float.transpose(0, 1))
        batch_m = batch_m.view((-1, 1))
        x_m = x - batch_m
        output = torch.where(index.bool(), x_m, x)
        return F.cross_entropy(self.s * output, target, weight=self.weight)


def paper_drw_weights(cls_num_list, epoch, drw_epoch):
    idx = epoch // drw_epoch
    betas = [0, 0.9999]
    effective_num = 1.0 - np.power(betas[idx], cls_num_list)
    per_cls_weights = (1.0 - betas[idx]) / np.array(effective_num)
    per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
    return torch.FloatTensor(per_cls_weights)


@pytest.mark.parametrize('epoch', [0, 159, 160, 199])
def test_ldam_drw_bitwise_equals_paper_code(epoch):
    ours = create_loss('ldam', COUNTS, reweight='drw', epochs=200)
    ours.set_epoch(epoch)
    paper = PaperLDAMLoss(COUNTS, weight=paper_drw_weights(COUNTS, epoch, 160))
    x, y = make_logits('ldam', 7, b=64), torch.randint(0, C, (64,))
    assert torch.equal(ours(x, y), paper(x, y))
    if epoch >= 160:
        assert torch.equal(ours.weight, paper.weight)


# ---------------------------------------------------------------- CMO mixing

@pytest.mark.parametrize('name', NAMES)
def test_cmo_scalar_lambda_unweighted(name):
    """Unweighted: soft lam*onehot(y_b)+(1-lam)*onehot(y_f) == lam*L(y_b)+(1-lam)*L(y_f)."""
    loss = create_loss(name, COUNTS, **KWARGS[name])
    x = make_logits(name, 11)
    y_b, y_f = make_targets('hard', 11), make_targets('hard', 12)
    lam = 0.3137
    t = lam * F.one_hot(y_b, C).float() + (1 - lam) * F.one_hot(y_f, C).float()
    torch.testing.assert_close(loss(x, t), lam * loss(x, y_b) + (1 - lam) * loss(x, y_f))
    _, g = value_and_grad(lambda z: loss(z, t), x)
    _, g_ref = value_and_grad(lambda z: lam * loss(z, y_b) + (1 - lam) * loss(z, y_f), x)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize('name', NAMES)
def test_cmo_per_sample_lambda_unweighted(name):
    loss = create_loss(name, COUNTS, **KWARGS[name])
    per = create_loss(name, COUNTS, reduction='none', **KWARGS[name])
    x = make_logits(name, 13)
    y_b, y_f = make_targets('hard', 13), make_targets('hard', 14)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(0))
    t = lam[:, None] * F.one_hot(y_b, C) + (1 - lam[:, None]) * F.one_hot(y_f, C)
    expected = lam * per(x, y_b) + (1 - lam) * per(x, y_f)
    torch.testing.assert_close(per(x, t), expected)
    torch.testing.assert_close(loss(x, t), expected.mean())


@pytest.mark.parametrize('name', ['ldam', 'bs', 'ce'])
def test_cmo_weighted_is_joint_normalisation(name):
    """Weighted: the soft target normalises jointly; the paper's per-term form needs 2 calls."""
    loss = build(name, 'cb')
    per = build(name, 'cb', reduction='none')
    w = loss.weight
    x = make_logits(name, 15)
    y_b, y_f = make_targets('hard', 15), make_targets('hard', 16)
    lam = 0.6
    t = lam * F.one_hot(y_b, C).float() + (1 - lam) * F.one_hot(y_f, C).float()
    joint = (lam * per(x, y_b) + (1 - lam) * per(x, y_f)).sum() / (lam * w[y_b] + (1 - lam) * w[y_f]).sum()
    torch.testing.assert_close(loss(x, t), joint)
    paper = lam * loss(x, y_b) + (1 - lam) * loss(x, y_f)
    assert not torch.allclose(loss(x, t), paper)


# ---------------------------------------------------------------- re-weighting

def test_class_balanced_weights():
    w = class_balanced_weights(COUNTS)
    assert w.dtype == torch.float32 and w.shape == (C,)
    assert math.isclose(float(w.double().sum()), C, rel_tol=1e-6)
    torch.testing.assert_close(w.double(), torch.tensor(ref_cb_weights(COUNTS), dtype=torch.float64))
    torch.testing.assert_close(class_balanced_weights(COUNTS, beta=0.0), torch.ones(C))
    assert torch.equal(class_balanced_weights(COUNTS), paper_drw_weights(COUNTS, 1, 1))
    with pytest.raises(ValueError, match='1.0'):
        class_balanced_weights(COUNTS, beta=1.0)


@pytest.mark.parametrize('name', NAMES)
def test_drw_switches_exactly_at_drw_epoch(name):
    loss = create_loss(name, COUNTS, reweight='drw', drw_epoch=DRW_EPOCH, **KWARGS[name])
    plain = create_loss(name, COUNTS, **KWARGS[name])
    cb = create_loss(name, COUNTS, reweight='cb', **KWARGS[name])
    x, y, t = make_logits(name, 17), make_targets('hard', 17), make_targets('soft', 17)
    assert loss.weight is None  # epoch 0
    loss.set_epoch(DRW_EPOCH - 1)
    assert loss.weight is None
    assert torch.equal(loss(x, y), plain(x, y)) and torch.equal(loss(x, t), plain(x, t))
    loss.set_epoch(DRW_EPOCH)
    assert torch.equal(loss.weight, class_balanced_weights(COUNTS))
    assert torch.equal(loss(x, y), cb(x, y)) and torch.equal(loss(x, t), cb(x, t))
    assert not torch.allclose(loss(x, y), plain(x, y))
    loss.set_epoch(DRW_EPOCH + 50)
    assert torch.equal(loss.weight, class_balanced_weights(COUNTS))


@pytest.mark.parametrize('epochs,expected', [(200, 160), (100, 80), (10, 8)])
def test_drw_default_epoch(epochs, expected):
    loss = create_loss('ldam', COUNTS, reweight='drw', epochs=epochs)
    assert loss.drw_epoch == expected
    assert create_loss('ce', COUNTS, reweight='drw', drw_epoch=5, epochs=epochs).drw_epoch == 5


def test_drw_needs_epoch():
    with pytest.raises(ValueError, match='drw_epoch.*epochs'):
        create_loss('ce', COUNTS, reweight='drw')


def test_cb_weight_constant_and_none_unweighted():
    assert create_loss('bs', COUNTS).weight is None
    loss = create_loss('bs', COUNTS, reweight='cb')
    for epoch in (0, 500):
        loss.set_epoch(epoch)
        assert torch.equal(loss.weight, class_balanced_weights(COUNTS))


# ---------------------------------------------------------------- LDAM margins and stability

def test_ldam_margins():
    for max_m in (0.5, 0.3):
        loss = create_loss('ldam', COUNTS, max_m=max_m)
        m = loss.margins.double()
        assert math.isclose(float(m.max()), max_m, rel_tol=1e-6)
        assert int(m.argmax()) == C - 1  # rarest class
        ratio = m * torch.tensor(COUNTS, dtype=torch.float64) ** 0.25
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-6, atol=0)
        torch.testing.assert_close(ldam_margins(COUNTS, max_m), loss.margins)


def confident_logits():
    g = torch.Generator().manual_seed(21)
    cos = -0.999 + 0.002 * torch.rand(B, C, generator=g, dtype=torch.float64)
    cos[torch.arange(B), torch.arange(B) % C] = 0.999  # cosine logits near +-1
    raw = torch.randn(B, C, generator=g, dtype=torch.float64) * 50  # raw logits, |x| ~ 50
    raw[0, 0] = 60.0
    raw[0, 1:] = -60.0
    return [cos.float(), raw.float()]


@pytest.mark.parametrize('which', [0, 1])
@pytest.mark.parametrize('reweight', ['none', 'cb'])
def test_ldam_soft_stable_with_confident_logits(which, reweight):
    x = confident_logits()[which]
    loss = build('ldam', reweight)
    weights = None if reweight == 'none' else ref_cb_weights(COUNTS)
    y_top = x.argmax(1)
    targets = [
        make_targets('soft', 22),
        F.one_hot(y_top, C).float(),  # the (near-certain) top class: loss ~ 0
        0.5 * F.one_hot(y_top, C).float() + 0.5 * F.one_hot((y_top + 1) % C, C).float(),
    ]
    for t in targets:
        out, g = value_and_grad(lambda z: loss(z, t), x)
        ref, g_ref = value_and_grad(lambda z: ref_loss('ldam', z, t.double(), weights), x.double())
        assert torch.isfinite(out) and torch.isfinite(g).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    # per-class losses of the top class: tiny but accurate (relative), never negative
    l32 = loss.class_losses(x)
    l64 = ref_class_losses('ldam', x.double(), COUNTS)
    assert (l32 >= 0).all()
    top32 = l32.gather(1, y_top[:, None]).double()
    top64 = l64.gather(1, y_top[:, None])
    torch.testing.assert_close(top32, top64, rtol=1e-3, atol=1e-37)


def test_ldam_soft_stable_float64_extreme():
    x = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = create_loss('ldam', [10, 5, 1])
    out = loss(x, torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize('name', NAMES)
def test_low_precision_logits_give_float32(name):
    loss = create_loss(name, COUNTS)
    x, y, t = make_logits(name, 23), make_targets('hard', 23), make_targets('soft', 23)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        for target in (y.to(torch.int32), t.to(dtype)):
            out = loss(xl, target)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, loss(xl.float(), target.float() if target.is_floating_point() else target))


def test_float64_logits_stay_float64():
    loss = create_loss('ldam', COUNTS)
    x = make_logits('ldam', 24, dtype=torch.float64)
    assert loss(x, make_targets('hard', 24)).dtype == torch.float64
    assert loss(x, make_targets('soft', 24).double()).dtype == torch.float64


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('counts,indices', [([5, 0, 3], '[1]'), ([5, -2, 3, 0], '[1, 3]'),
                                            ([1.0, float('nan')], '[1]')])
@pytest.mark.parametrize('name', NAMES)
def test_bad_counts(name, counts, indices):
    with pytest.raises(ValueError, match=r'classes \[.*\] have counts') as e:
        create_loss(name, counts)
    assert indices in str(e.value)


def test_bad_counts_shape():
    with pytest.raises(ValueError, match='1-D'):
        create_loss('ce', [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match='1-D'):
        create_loss('ce', [])


@pytest.mark.parametrize('name', NAMES)
def test_bad_targets(name):
    loss = create_loss(name, COUNTS)
    x = make_logits(name, 25)
    with pytest.raises(ValueError, match=r'\[0, 7\); got 7'):
        loss(x, torch.tensor([0, 1, 7, 2, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match='got -1'):
        loss(x, torch.full((B,), -1))
    t = make_targets('soft', 25)
    t[3, 2] = -0.5
    with pytest.raises(ValueError, match='non-negative; found -0.5'):
        loss(x, t)
    with pytest.raises(ValueError, match=r'shape of the logits \(10, 7\), got \(10, 6\)'):
        loss(x, t[:, :6].abs())
    with pytest.raises(ValueError, match=r'shape \(10,\)'):
        loss(x, torch.zeros(B, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='bool'):
        loss(x, torch.zeros(B, dtype=torch.bool))


@pytest.mark.parametrize('name', NAMES)
def test_bad_logits(name):
    loss = create_loss(name, COUNTS)
    with pytest.raises(ValueError, match=r'\(B, 7\).*\(10, 6\)'):
        loss(torch.randn(B, 6), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match=r'\(B, 7\).*\(7,\)'):
        loss(torch.randn(C), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match='floating-point'):
        loss(torch.zeros(B, C, dtype=torch.long), torch.zeros(B, dtype=torch.long))


def test_validate_off_skips_value_checks_but_not_shapes():
    loss = create_loss('bs', COUNTS, validate=False)
    t = make_targets('soft', 26)
    t[0, 0] = -0.1
    assert torch.isfinite(loss(make_logits('bs', 26), t))  # not checked
    with pytest.raises(ValueError, match='shape'):
        loss(torch.randn(B, 6), torch.zeros(B, dtype=torch.long))


def test_bad_options():
    with pytest.raises(ValueError, match="'cb'.*both|both"):
        create_loss('ce', COUNTS, reweight='cb', weight=torch.ones(C))
    with pytest.raises(ValueError, match=r'\(7,\)'):
        create_loss('ce', COUNTS, weight=torch.ones(3))
    with pytest.raises(ValueError, match="'nope'.*'none', 'cb', 'drw'"):
        create_loss('ce', COUNTS, reweight='nope')
    with pytest.raises(ValueError, match="'avg'"):
        create_loss('ce', COUNTS, reduction='avg')
    with pytest.raises(ValueError, match='-1'):
        create_loss('ldam', COUNTS, s=-1)
    with pytest.raises(ValueError, match='-2'):
        create_loss('ce', COUNTS, reweight='drw', drw_epoch=-2)
    with pytest.raises(ValueError, match='1.5'):
        create_loss('ce', COUNTS).set_epoch(1.5)


def test_state_dict_round_trip():
    a = create_loss('ldam', COUNTS, reweight='cb')
    b = create_loss('ldam', COUNTS, reweight='cb')
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {'class_counts', 'class_weight', 'margins'}
    assert isinstance(a, timm_cmo.losses.LongTailLoss)


# ---------------------------------------------------------------- accumulation: norm= and normalizer()

def _micro_batches(seed=0, sizes=(6, 6, 4)):
    """Micro-batches with (B_j, C) logits and a MixInfo each: two scalar lams, an unmixed one (lam 1, y_f = y_b)."""
    from timm_cmo.data.cmo import MixInfo
    g = torch.Generator().manual_seed(seed)
    out = []
    for j, b in enumerate(sizes):
        logits = torch.randn(b, C, generator=g, dtype=torch.float64)
        y_b = torch.randint(0, C, (b,), generator=g)
        y_f = y_b if j == 2 else torch.randint(0, C, (b,), generator=g)
        out.append((logits, MixInfo(y_b, y_f, (0.3, 0.8, 1.0)[j], 0.0)))
    return out


def _concatenated(batches, smoothing=0.0):
    from timm_cmo.data.cmo import MixInfo
    lam = torch.cat([torch.full((m.y_b.shape[0],), float(m.lam), dtype=torch.float64) for _, m in batches])
    return (torch.cat([x for x, _ in batches]),
            MixInfo(torch.cat([m.y_b for _, m in batches]), torch.cat([m.y_f for _, m in batches]), lam, smoothing))


@pytest.mark.parametrize('name', NAMES + ['las'])
@pytest.mark.parametrize('reweight', ['none', 'cb'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_micro_batch_losses_with_the_summed_normalizer_add_up_to_the_concatenated_batch(name, reweight, smoothing):
    """sum_j loss(x_j, mix_j, norm=sum_j normalizer(mix_j)) == loss(concatenation) for mixed, per-sample-lam and
    unmixed micro-batches of different sizes, with and without class weights (where the denominators differ)."""
    loss_fn = create_loss(name, COUNTS, reweight=reweight, **KWARGS.get(name, {}))
    batches = [(x, m._replace(smoothing=smoothing)) for x, m in _micro_batches()]
    norm = sum(loss_fn.normalizer(x, m) for x, m in batches)
    assert norm.shape == (2,)
    total = sum(loss_fn(x, None, mix=m, norm=norm) for x, m in batches)
    x, mix = _concatenated(batches, smoothing)
    torch.testing.assert_close(total, loss_fn(x, mix), rtol=1e-12, atol=1e-12)
    # plain integer labels (no mix): the weighted mean of the whole batch, F.cross_entropy's for CE
    ys = [m.y_b for _, m in batches]
    norm = sum(loss_fn.normalizer(y) for y in ys)
    total = sum(loss_fn(x, y, norm=norm) for (x, _), y in zip(batches, ys))
    torch.testing.assert_close(total, loss_fn(torch.cat([x for x, _ in batches]), torch.cat(ys)), rtol=1e-12, atol=1e-12)
    if name == 'ce':
        w = None if reweight == 'none' else class_balanced_weights(COUNTS).double()
        torch.testing.assert_close(total, F.cross_entropy(torch.cat([x for x, _ in batches]), torch.cat(ys), weight=w))
    # soft targets
    soft = [m.target(C).double() for _, m in batches]
    norm = sum(loss_fn.normalizer(t) for t in soft)
    total = sum(loss_fn(x, t, norm=norm) for (x, _), t in zip(batches, soft))
    torch.testing.assert_close(total, loss_fn(torch.cat([x for x, _ in batches]), torch.cat(soft)), rtol=1e-12,
                               atol=1e-12)


def test_norm_needs_the_mean_reduction():
    loss_fn = create_loss('ce', COUNTS, reduction='sum')
    with pytest.raises(ValueError, match="norm= applies to reduction='mean'"):
        loss_fn(torch.zeros(2, C), torch.zeros(2, dtype=torch.long), norm=torch.ones(2))
