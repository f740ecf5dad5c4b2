"""Label-aware smoothing (MiSLAS) against plain-torch references: eps per shape, hard, soft and mix paths."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm_cmo
from timm_cmo.data.cmo import MixInfo
from timm_cmo.losses import LAS_DEFAULTS, LabelAwareSmoothingLoss, las_smoothing

# not sorted: eps follows the count, not the class index
COUNTS = [40, 500, 5, 120, 12, 500, 60]
C = len(COUNTS)


def mislas_eps(counts, head, tail, shape, power=None):
    """MiSLAS's formula written out per class with math only."""
    n1, nk = max(counts), min(counts)
    out = []
    for n in counts:
        x = (n - nk) / (n1 - nk)
        if shape == 'concave':
            out.append(tail + (head - tail) * math.sin((n - nk) * math.pi / (2 * (n1 - nk))))
        elif shape == 'linear':
            out.append(tail + (head - tail) * x)
        elif shape == 'convex':
            out.append(head + (head - tail) * math.sin(1.5 * math.pi + (n - nk) * math.pi / (2 * (n1 - nk))))
        else:
            out.append(tail + (head - tail) * x ** power)
    return out


def reference_las(logits, target, eps):
    """Cross-entropy against (1 - eps_y) onehot(y) + eps_y / C, per sample."""
    logp = torch.log_softmax(logits, dim=1)
    e = eps[target].unsqueeze(1)
    t = (1 - e) * F.one_hot(target, logits.shape[1]).to(logits) + e / logits.shape[1]
    return -(t * logp).sum(1)


def batch(seed=0, b=16, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (b,), generator=g)
    y2 = torch.randint(0, C, (b,), generator=g)
    lam = torch.rand(b, generator=g, dtype=torch.float64)
    return logits, y, y2, lam


@pytest.mark.parametrize('shape,power', [('concave', None), ('linear', None), ('convex', None), ('exp', 0.5),
                                         ('exp', 3.0)])
@pytest.mark.parametrize('head,tail', [(0.4, 0.1), (0.3, 0.0), (0.0, 0.2)])
def test_eps_matches_mislas_formula(shape, power, head, tail):
    eps = las_smoothing(COUNTS, head, tail, shape, power)
    assert eps.dtype == torch.float32 and eps.shape == (C,)
    np.testing.assert_allclose(eps.numpy(), mislas_eps(COUNTS, head, tail, shape, power), rtol=1e-6, atol=1e-7)
    # the end points: the largest count gets smooth_head, the smallest smooth_tail
    assert eps[1].item() == pytest.approx(head) and eps[5].item() == pytest.approx(head)
    assert eps[2].item() == pytest.approx(tail, abs=1e-7)
    loss = timm_cmo.create_loss('las', COUNTS, smooth_head=head, smooth_tail=tail, shape=shape, power=power)
    torch.testing.assert_close(loss.smoothing, eps)
    assert 'smoothing' in dict(loss.named_buffers())


def test_eps_balanced_counts_get_smooth_head():
    torch.testing.assert_close(las_smoothing([7, 7, 7], 0.3, 0.1), torch.full((3,), 0.3))


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_hard_targets_match_reference(reduction):
    loss = timm_cmo.create_loss('las', COUNTS, smooth_head=0.4, smooth_tail=0.1, reduction=reduction)
    logits, y, _, _ = batch(1)
    ref = reference_las(logits, y, loss.smoothing.double())
    expected = {'mean': ref.mean(), 'sum': ref.sum(), 'none': ref}[reduction]
    torch.testing.assert_close(loss(logits, y), expected)
    # MiSLAS's form: confidence * nll + smoothing * mean(-log p)
    logp = F.log_softmax(logits, dim=1)
    eps = loss.smoothing.double()[y]
    mislas = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) + eps * -logp.mean(1))
    torch.testing.assert_close(ref, mislas)


def test_soft_targets_and_one_hot_equal_hard():
    loss = LabelAwareSmoothingLoss(COUNTS, smooth_head=0.3, smooth_tail=0.0)
    logits, y, y2, lam = batch(2)
    torch.testing.assert_close(loss(logits, F.one_hot(y, C).double()), loss(logits, y))
    t = lam[:, None] * F.one_hot(y, C).double() + (1 - lam[:, None]) * F.one_hot(y2, C).double()
    eps = loss.smoothing.double()
    expected = (lam * reference_las(logits, y, eps) + (1 - lam) * reference_las(logits, y2, eps)).mean()
    torch.testing.assert_close(loss(logits, t), expected)


@pytest.mark.parametrize('reweight', ['none', 'cb'])
def test_mix_path_is_the_per_term_form(reweight):
    loss = timm_cmo.create_loss('las', COUNTS, reweight=reweight, **LAS_DEFAULTS['cifar100'])
    logits, y, y2, lam = batch(3)
    # per-sample lambda (Remix, elem mode)
    info = MixInfo(y, y2, lam)
    if reweight == 'none':
        eps = loss.smoothing.double()
        expected = (lam * reference_las(logits, y, eps)).mean() + ((1 - lam) * reference_las(logits, y2, eps)).mean()
        torch.testing.assert_close(loss(logits, info.target(C).double(), mix=info), expected)
    # batch lambda: the paper's two calls (MiSLAS's mixup_criterion), values and gradients
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    got = loss(x1, MixInfo(y, y2, 0.3))
    ref = 0.3 * loss(x2, y) + 0.7 * loss(x2, y2)
    torch.testing.assert_close(got, ref)
    got.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_gradient_and_low_precision():
    loss = timm_cmo.create_loss('las', COUNTS)
    logits, y, _, _ = batch(4)
    x = logits.float().requires_grad_(True)
    loss(x, y).backward()
    eps = loss.smoothing[y].unsqueeze(1)
    t = (1 - eps) * F.one_hot(y, C) + eps / C
    torch.testing.assert_close(x.grad, (torch.softmax(x.detach(), 1) - t) / len(y))
    out = loss(logits.half(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_defaults_table():
    for name in ('cifar10', 'cifar100', 'cifar10_if10', 'cifar100_if50', 'imagenet_lt', 'inat2018', 'places_lt'):
        loss = timm_cmo.create_loss('las', COUNTS, **LAS_DEFAULTS[name])
        assert loss.shape == 'concave'
    assert LAS_DEFAULTS['cifar100'] == dict(smooth_head=0.4, smooth_tail=0.1, shape='concave')
    assert LAS_DEFAULTS['imagenet_lt'] == dict(smooth_head=0.3, smooth_tail=0.0, shape='concave')


@pytest.mark.parametrize('kwargs,message', [
    (dict(smooth_head=1.0), 'smooth_head'), (dict(smooth_head=-0.1), 'smooth_head'),
    (dict(smooth_tail=1.2), 'smooth_tail'), (dict(smooth_tail=float('nan')), 'smooth_tail'),
    (dict(shape='cubic'), 'cubic'), (dict(shape='exp'), 'power'), (dict(shape='exp', power=0.0), 'power'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm_cmo.create_loss('las', COUNTS, **kwargs)


def test_registered_and_repr():
    assert 'las' in timm_cmo.list_losses()
    r = repr(timm_cmo.create_loss('las', COUNTS, shape='exp', power=2.0))
    assert "shape='exp'" in r and 'power=2.0' in r
