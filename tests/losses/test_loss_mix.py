"""The paper's CMO loss form, lam * L(y_b) + (1 - lam) * L(y_f) per term, on every path of every loss."""
import pytest
import torch
import torch.nn.functional as F

from timm_cmo.data import MixInfo, soft_target
from timm_cmo.losses import class_balanced_weights, create_loss, list_losses
from timm_cmo.losses.registry import _loss_entrypoints

# single-head, single-batch losses on logits alone (the multi-expert RIDE losses, the feature-weighted IB losses and
# BBN's, which also takes the dual batch, have their own tests: tests/losses/test_loss_ride.py, test_loss_ib.py,
# test_loss_bbn.py)
SINGLE_HEAD = [n for n in list_losses() if not getattr(_loss_entrypoints[n], 'needs_experts', False)
               and not getattr(_loss_entrypoints[n], 'needs_features', False)
               and not getattr(_loss_entrypoints[n], 'needs_dual', False)]
# losses whose unweighted soft-target form is the per-term form; LADE's regulariser averages each class over its
# samples, so a soft target alone normalises jointly like a weighted loss (tests/losses/test_loss_lade.py)
PER_SAMPLE = [n for n in SINGLE_HEAD if n != 'lade']

COUNTS = [500, 200, 80, 30, 12, 5]
C = len(COUNTS)
B = 24
DRW_EPOCH = 3


def batch(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y_b = torch.randint(0, C, (B,), generator=g)
    y_f = torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    return logits, y_b, y_f, lam


def make(name, reweight, epoch):
    loss = create_loss(name, COUNTS, reweight=reweight, drw_epoch=DRW_EPOCH if reweight == 'drw' else None)
    loss.set_epoch(epoch)
    return loss


def loss_grid():
    for name in SINGLE_HEAD:
        for reweight, epoch in (('none', 0), ('cb', 0), ('drw', DRW_EPOCH - 1), ('drw', DRW_EPOCH)):
            yield pytest.param(name, reweight, epoch, id=f'{name}-{reweight}-e{epoch}')


def value_and_grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize('name,reweight,epoch', list(loss_grid()))
def test_batch_mode_is_the_papers_two_calls(name, reweight, epoch):
    """The paper's code: lam * criterion(out, y_b) + (1 - lam) * criterion(out, y_f), values and gradients."""
    loss = make(name, reweight, epoch)
    logits, y_b, y_f, _ = batch(1)
    lam = 0.37
    soft = lam * F.one_hot(y_b, C).double() + (1 - lam) * F.one_hot(y_f, C).double()
    got, g_got = value_and_grad(lambda x: loss(x, soft, mix=MixInfo(y_b, y_f, lam)), logits)
    ref, g_ref = value_and_grad(lambda x: lam * loss(x, y_b) + (1 - lam) * loss(x, y_f), logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    # the MixInfo may also stand in for the target
    torch.testing.assert_close(loss(logits, MixInfo(y_b, y_f, lam)), ref)
    # an unmixed batch of a CMO loader: the hard-label loss
    torch.testing.assert_close(loss(logits, soft, mix=MixInfo(y_b, y_b, 1.0)), loss(logits, y_b))


def reference_ce_family(name, logits, y, weight, smoothing):
    """Independent per-sample (numerator, denominator) for the cross-entropy family (ce, bs, la)."""
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    offset = torch.log(counts / counts.sum()) if name in ('bs', 'la') else torch.zeros(C, dtype=torch.float64)
    logp = F.log_softmax(logits + offset, dim=1)
    t = F.one_hot(y, C).double() * (1 - smoothing) + smoothing / C
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    return -(t * w * logp).sum(1), (t * w).sum(1)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('name', ['ce', 'bs', 'la'])
@pytest.mark.parametrize('reweight,epoch', [('none', 0), ('drw', DRW_EPOCH - 1), ('drw', DRW_EPOCH), ('cb', 0)])
def test_per_sample_lambda_and_smoothing_reference(name, reweight, epoch, smoothing):
    """Elem mode / Remix (per-sample lam) and label smoothing against a direct evaluation of
    sum_i lam_i n_i(y_b) / sum_i d_i(y_b) + sum_i (1 - lam_i) n_i(y_f) / sum_i d_i(y_f)."""
    loss = make(name, reweight, epoch)
    logits, y_b, y_f, lam = batch(2)
    weight = class_balanced_weights(COUNTS) if (reweight == 'cb' or (reweight == 'drw' and epoch >= DRW_EPOCH)) else None
    nb, db = reference_ce_family(name, logits, y_b, weight, smoothing)
    nf, df = reference_ce_family(name, logits, y_f, weight, smoothing)
    expected = (lam * nb).sum() / db.sum() + ((1 - lam) * nf).sum() / df.sum()
    info = MixInfo(y_b, y_f, lam, smoothing)
    torch.testing.assert_close(loss(logits, info.target(C).double(), mix=info), expected)
    # batch-mode lambda with smoothing: the same formula with a constant lam
    info = MixInfo(y_b, y_f, 0.6, smoothing)
    expected = 0.6 * nb.sum() / db.sum() + 0.4 * nf.sum() / df.sum()
    torch.testing.assert_close(loss(logits, info.target(C).double(), mix=info), expected)


@pytest.mark.parametrize('name', PER_SAMPLE)
def test_unweighted_mix_equals_the_soft_target_loss(name):
    """Without class weights the per-term form and the soft-target loss are the same loss."""
    loss = make(name, 'drw', DRW_EPOCH - 1)  # DRW not yet active
    logits, y_b, y_f, lam = batch(3)
    for info in (MixInfo(y_b, y_f, lam), MixInfo(y_b, y_f, 0.25), MixInfo(y_b, y_f, lam, 0.1)):
        torch.testing.assert_close(loss(logits, info), loss(logits, info.target(C).double()))


def test_weighted_soft_target_alone_is_not_the_papers_loss():
    """After the DRW switch the soft target alone normalises jointly: the mix must be passed to the loss."""
    loss = make('ce', 'drw', DRW_EPOCH)
    logits, y_b, y_f, _ = batch(4)
    info = MixInfo(y_b, y_f, 0.5)
    paper = 0.5 * loss(logits, y_b) + 0.5 * loss(logits, y_f)
    torch.testing.assert_close(loss(logits, info), paper)
    assert not torch.allclose(loss(logits, info.target(C).double()), paper, rtol=1e-3)


def test_reductions_sum_and_none():
    loss_none = create_loss('ldam', COUNTS, reweight='cb', reduction='none')
    loss_sum = create_loss('ldam', COUNTS, reweight='cb', reduction='sum')
    logits, y_b, y_f, lam = batch(5, scale=0.3)
    w = class_balanced_weights(COUNTS).double()
    per = loss_none(logits, MixInfo(y_b, y_f, lam))
    expected = lam * w[y_b] * loss_none.hard_losses(logits, y_b) + (1 - lam) * w[y_f] * loss_none.hard_losses(logits, y_f)
    torch.testing.assert_close(per, expected)
    torch.testing.assert_close(loss_sum(logits, MixInfo(y_b, y_f, lam)), expected.sum())


def test_bad_mix_is_named():
    loss = create_loss('ce', COUNTS)
    logits, y_b, y_f, lam = batch(6)
    with pytest.raises(ValueError, match='mix.lam has 3 entries'):
        loss(logits, MixInfo(y_b, y_f, lam[:3]))
    with pytest.raises(ValueError, match=r'class indices must be in \[0, 6\)'):
        loss(logits, MixInfo(y_b, y_f + 10, 0.5))


def test_mix_info_target_matches_soft_target():
    _, y_b, y_f, lam = batch(7)
    info = MixInfo(y_b, y_f, lam.float(), 0.2)
    expected = lam.float()[:, None] * soft_target(y_b, C, 0.2) + (1 - lam.float()[:, None]) * soft_target(y_f, C, 0.2)
    torch.testing.assert_close(info.target(C), expected)
    torch.testing.assert_close(MixInfo(y_b, y_b, 1.0, 0.2).target(C), soft_target(y_b, C, 0.2))
