"""RIDE losses: each term against plain-torch references, DRW / temperature switch, mixed labels, router loss."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_cmo  # noqa: F401  (registers the losses)
from timm_cmo.data.cmo import MixInfo
from timm_cmo.losses import create_loss, list_losses
from timm_cmo.losses.ride import RIDE_LOSS_DEFAULTS, RIDELoss, RIDERouterLoss, ride_diversity_temperature

COUNTS = [500, 300, 180, 100, 60, 36, 20, 12, 8, 5]
C, E, B, S = len(COUNTS), 3, 16, 30.0


def fixed_output(seed: int = 0, requires_grad: bool = False):
    """Scaled cosine logits as a RIDE model gives them: expert logits (B, E, C) in [-30, 30] and their mean."""
    g = torch.Generator().manual_seed(seed)
    experts = (torch.rand(B, E, C, generator=g) * 2 - 1) * S * 0.6
    experts.requires_grad_(requires_grad)
    return experts.mean(dim=1), experts


def labels(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def ref_margins(max_m: float = 0.5) -> torch.Tensor:
    m = 1.0 / np.sqrt(np.sqrt(np.array(COUNTS, dtype=np.float64)))
    return torch.tensor(m * (max_m / m.max()), dtype=torch.float32)


def ref_cb_weights(beta: float = 0.9999) -> torch.Tensor:
    n = np.array(COUNTS, dtype=np.float64)
    w = (1 - beta) / (1 - np.power(beta, n))
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


def ref_temperature(reweight_factor: float = 0.05) -> torch.Tensor:
    n = np.array(COUNTS, dtype=np.float64)
    t = len(n) * n / n.sum() * reweight_factor + 1 - reweight_factor
    return torch.tensor(t / t.max(), dtype=torch.float32)


def ref_ldam(z: torch.Tensor, y: torch.Tensor, weight=None) -> torch.Tensor:
    """RIDE's LDAM on scaled logits: subtract s * m_y from the target logit, then (weighted) cross-entropy."""
    zm = z.clone()
    zm[torch.arange(len(y)), y] -= S * ref_margins()[y]
    return F.cross_entropy(zm, y, weight=weight)


def ref_kl(ensemble: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
    """Explicit batch-mean KL(softmax(ensemble / t) || softmax(z / t))."""
    p = torch.softmax(ensemble / t, dim=1)
    return (p * (torch.log(p) - torch.log_softmax(z / t, dim=1))).sum() / z.shape[0]


def test_registered_and_defaults():
    assert {'ride', 'ride_ea'} <= set(list_losses())
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=5, epochs=10)
    assert isinstance(loss, RIDELoss) and loss.drw_epoch == 5
    assert loss.ldam.max_m == 0.5 and loss.s == 30 and loss.additional_diversity_factor == -0.2
    assert loss.reweight_factor == 0.05 and loss.base_diversity_temperature == 1.0 and loss.cb_beta == 0.9999
    assert create_loss('ride', COUNTS, reweight='drw', epochs=200).drw_epoch == 160
    assert RIDE_LOSS_DEFAULTS['cifar100_lt'] == dict(additional_diversity_factor=-0.45, reweight_factor=0.05,
                                                     drw_epoch=160)
    assert RIDE_LOSS_DEFAULTS['imagenet_lt']['reweight_factor'] == 0.02
    assert RIDE_LOSS_DEFAULTS['inat2018']['reweight_factor'] == 0.015
    torch.testing.assert_close(ride_diversity_temperature(COUNTS, 0.05), ref_temperature(0.05))
    with pytest.raises(ValueError, match='too large'):
        ride_diversity_temperature([1000, 1], reweight_factor=5.0)


def test_plain_logits_rejected():
    """A (B, C) tensor (a model's ordinary output) is refused, saying how to get the experts' output."""
    loss = create_loss('ride', COUNTS, reweight='drw', epochs=10)
    assert loss.needs_experts and create_loss('ride_ea', COUNTS).needs_experts
    assert not create_loss('ldam', COUNTS).needs_experts  # the base class's default
    with pytest.raises(ValueError, match=r'--loss ride needs a multi-expert model \(e.g. ride_resnet32_cifar\)'):
        loss(torch.randn(B, C), labels())
    model = timm.create_model('ride_resnet20_cifar', num_classes=C).train()
    with pytest.raises(ValueError, match=r'model.set_expert_training\(True\)'):
        loss(model(torch.randn(2, 3, 32, 32)), labels()[:2])
    model.set_expert_training(True)
    assert torch.isfinite(loss(model(torch.randn(2, 3, 32, 32)), labels()[:2]))


@pytest.mark.parametrize('epoch', [0, 4])
def test_terms_before_reweight_epoch(epoch):
    """Epochs < drw_epoch: unweighted LDAM per expert, T = 1 diversity; each term and the total."""
    logits, experts = fixed_output()
    y = labels()
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=5, additional_diversity_factor=-0.45)
    loss.set_epoch(epoch)
    assert not loss.reweighting
    ldam = sum(ref_ldam(experts[:, e], y) for e in range(E))
    div = sum(ref_kl(logits, experts[:, e], 1.0) for e in range(E))
    torch.testing.assert_close(loss.diversity(logits, experts), div)
    individual = RIDELoss(COUNTS, drw_epoch=5, additional_diversity_factor=0., zero_diversity_uses_ensemble=False)
    torch.testing.assert_close(individual((logits, experts), y), ldam)
    torch.testing.assert_close(loss((logits, experts), y), ldam - 0.45 * div)


@pytest.mark.parametrize('epoch', [5, 9])
def test_terms_after_reweight_epoch(epoch):
    """From drw_epoch on: class-balanced LDAM weights, class-wise T_k, factor mean(T)^2."""
    logits, experts = fixed_output(seed=3)
    y = labels(seed=4)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=5, additional_diversity_factor=-0.2)
    loss.set_epoch(epoch)
    assert loss.reweighting
    w, t = ref_cb_weights(), ref_temperature().unsqueeze(0)
    ldam = sum(ref_ldam(experts[:, e], y, weight=w) for e in range(E))
    div = sum(t.mean() ** 2 * ref_kl(logits, experts[:, e], t) for e in range(E))
    torch.testing.assert_close(loss.diversity(logits, experts), div)
    torch.testing.assert_close(loss((logits, experts), y), ldam - 0.2 * div)
    loss.set_epoch(4)  # back before the switch
    assert not loss.reweighting
    torch.testing.assert_close(
        loss((logits, experts), y),
        sum(ref_ldam(experts[:, e], y) - 0.2 * ref_kl(logits, experts[:, e], 1.) for e in range(E)))


def test_reweight_none_and_cb():
    logits, experts = fixed_output(seed=5)
    y = labels(seed=6)
    none = create_loss('ride', COUNTS, reweight='none')
    cb = create_loss('ride', COUNTS, reweight='cb')
    none.set_epoch(500)
    assert not none.reweighting and cb.reweighting
    w, t = ref_cb_weights(), ref_temperature().unsqueeze(0)
    torch.testing.assert_close(
        none((logits, experts), y),
        sum(ref_ldam(experts[:, e], y) - 0.2 * ref_kl(logits, experts[:, e], 1.) for e in range(E)))
    torch.testing.assert_close(
        cb((logits, experts), y),
        sum(ref_ldam(experts[:, e], y, w) - 0.2 * t.mean() ** 2 * ref_kl(logits, experts[:, e], t) for e in range(E)))


@pytest.mark.parametrize('elem', [False, True])
def test_mixed_labels_per_term(elem):
    """With a MixInfo each expert's LDAM term is lam * L(y_b) + (1 - lam) * L(y_f), each normalised by its own
    weights; the diversity term does not depend on labels."""
    logits, experts = fixed_output(seed=7)
    y_b, y_f = labels(seed=8), labels(seed=9)
    lam = torch.linspace(0.1, 0.9, B) if elem else 0.3
    mix = MixInfo(y_b, y_f, lam)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=2, additional_diversity_factor=-0.45)
    lam_t = torch.as_tensor(lam, dtype=torch.float32).expand(B)
    for epoch, weighted in ((0, False), (2, True)):
        loss.set_epoch(epoch)
        w = ref_cb_weights() if weighted else torch.ones(C)
        t = ref_temperature().unsqueeze(0) if weighted else torch.ones(1, C)
        ldam = 0.
        for e in range(E):
            for y, share in ((y_b, lam_t), (y_f, 1 - lam_t)):
                zm = experts[:, e].clone()
                zm[torch.arange(B), y] -= S * ref_margins()[y]
                per_sample = F.cross_entropy(zm, y, reduction='none')
                ldam = ldam + (share * w[y] * per_sample).sum() / w[y].sum()
        div = sum(t.mean() ** 2 * ref_kl(logits, experts[:, e], t) for e in range(E))
        torch.testing.assert_close(loss((logits, experts), y_b, mix=mix), ldam - 0.45 * div)
        torch.testing.assert_close(loss((logits, experts), mix), ldam - 0.45 * div)  # MixInfo as the target


def test_soft_one_hot_equals_hard():
    logits, experts = fixed_output(seed=10)
    y = labels(seed=11)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=0)
    torch.testing.assert_close(loss((logits, experts), F.one_hot(y, C).float()), loss((logits, experts), y))


def test_output_formats():
    logits, experts = fixed_output(seed=12)
    y = labels(seed=13)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=0)
    ref = loss((logits, experts), y)
    torch.testing.assert_close(loss(experts, y), ref)  # bare (B, E, C)
    torch.testing.assert_close(loss({'output': logits, 'logits': experts}, y), ref)  # RIDE's returns_feat dict
    torch.testing.assert_close(loss((logits, experts, torch.zeros(B, E - 1)), y), ref)  # router logits ignored
    with pytest.raises(ValueError, match='expert logits must have 10 classes'):
        loss(experts[..., :5], y)


def test_zero_factor_uses_ensemble_like_ride():
    """RIDE's code: with additional_diversity_factor == 0 every expert's LDAM term sees the ensemble logits."""
    logits, experts = fixed_output(seed=14)
    y = labels(seed=15)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=3, additional_diversity_factor=0.)
    torch.testing.assert_close(loss((logits, experts), y), E * ref_ldam(logits, y))


def test_ensemble_side_has_no_gradient():
    logits, experts = fixed_output(seed=16, requires_grad=True)
    ensemble = logits.detach().requires_grad_(True)
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=0)
    loss.diversity(ensemble, experts).backward()
    assert ensemble.grad is None and experts.grad.abs().sum() > 0


def test_set_epoch_drives_both_switches():
    loss = create_loss('ride', COUNTS, reweight='drw', drw_epoch=160)
    loss.set_epoch(159)
    assert loss.weight is None and loss.ldam.weight is None and loss.temperature() == (1.0, 1.0)
    loss.set_epoch(160)
    assert loss.ldam.weight is not None
    t, t_mean = loss.temperature()
    torch.testing.assert_close(t, ref_temperature().unsqueeze(0))
    assert t_mean == pytest.approx(float(ref_temperature().double().mean()))


def test_router_targets_and_loss():
    """h_i = (mean of experts 0..i wrong) and (a later cumulative mean right); BCE with pos_weight, averaged."""
    experts = torch.zeros(4, 3, 3)
    experts[:, 0] = torch.tensor([5., 0, 0])  # expert 0 says class 0
    experts[:, 1] = torch.tensor([0., 12, 0])  # 0 + 1 -> class 1
    experts[:, 2] = torch.tensor([0., 0, 30])  # 0 + 1 + 2 -> class 2
    y = torch.tensor([0, 1, 2, 1])
    # sample 0: right at once -> (0, 0); 1: right after 2 -> (1, 0); 2: right after 3 -> (1, 1); 3: like 1 -> (1, 0)
    expected = torch.tensor([[0., 0.], [1., 0.], [1., 1.], [1., 0.]])
    torch.testing.assert_close(RIDERouterLoss.router_targets(experts, y), expected)

    loss = create_loss('ride_ea', [10, 5, 2])
    assert loss.pos_weight == 100.
    router = torch.tensor([[0.3, -1.], [2., 0.], [-0.5, 1.5], [0., 0.]])
    ref = 0.
    for i in range(2):
        p, h = router[:, i], expected[:, i]
        ref = ref + (-(100. * h * F.logsigmoid(p) + (1 - h) * F.logsigmoid(-p))).mean() / 2
    torch.testing.assert_close(loss((experts.mean(1), experts, router), y), ref)
    torch.testing.assert_close(loss((experts.mean(1), experts, router), F.one_hot(y, 3).float()), ref)
    with pytest.raises(ValueError, match='router logits'):
        loss((experts.mean(1), experts), y)
    with pytest.raises(ValueError, match='without CMO'):
        loss((experts.mean(1), experts, router), y, mix=MixInfo(y, y, 0.5))
    with pytest.raises(ValueError, match='re-weighting'):
        create_loss('ride_ea', [10, 5, 2], reweight='drw', epochs=10)


@pytest.mark.parametrize('reweight', ['drw', 'none'])
def test_micro_batches_with_the_summed_normalizer_add_up_to_the_concatenated_batch(reweight):
    """RIDE's LDAM terms (class-weighted denominators) and its diversity term (a batch mean) both split exactly:
    sum_j loss(out_j, mix_j, norm=sum_j normalizer) == loss(concatenation); the router loss likewise."""
    loss_fn = RIDELoss(COUNTS, reweight=reweight, drw_epoch=0)
    g = torch.Generator().manual_seed(5)
    parts = []
    for j, b in enumerate((5, 5, 3)):
        experts = torch.randn(b, 3, len(COUNTS), generator=g, dtype=torch.float64)
        y_b, y_f = torch.randint(0, len(COUNTS), (b,), generator=g), torch.randint(0, len(COUNTS), (b,), generator=g)
        parts.append(((experts.mean(1), experts), MixInfo(y_b, y_b if j == 2 else y_f, (0.4, 0.9, 1.0)[j])))
    norm = sum(loss_fn.normalizer(None, m) for _, m in parts)
    assert norm.shape == (3,) and norm[2] == 13
    total = sum(loss_fn(out, None, mix=m, norm=norm) for out, m in parts)
    experts = torch.cat([out[1] for out, _ in parts])
    lam = torch.cat([torch.full((m.y_b.shape[0],), float(m.lam), dtype=torch.float64) for _, m in parts])
    mix = MixInfo(torch.cat([m.y_b for _, m in parts]), torch.cat([m.y_f for _, m in parts]), lam)
    torch.testing.assert_close(total, loss_fn((experts.mean(1), experts), None, mix=mix), rtol=1e-12, atol=1e-12)

    router_loss = RIDERouterLoss(COUNTS)
    outs = [(out[0], out[1], torch.randn(out[1].shape[0], 2, generator=g, dtype=torch.float64)) for out, _ in parts]
    ys = [m.y_b for _, m in parts]
    norm = sum(router_loss.normalizer(y) for y in ys)
    total = sum(router_loss(o, y, norm=norm) for o, y in zip(outs, ys))
    cat = tuple(torch.cat([o[i] for o in outs]) for i in range(3))
    torch.testing.assert_close(total, router_loss(cat, torch.cat(ys)), rtol=1e-12, atol=1e-12)
