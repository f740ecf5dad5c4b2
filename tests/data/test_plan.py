"""The epoch plan both training loaders read: steps, rank shares, ROS, the CMO window and variants, batch seeds."""
import numpy as np
import pytest
from scipy import stats

from timm_cmo.data import CMOConfig, EpochPlanner, class_sampling_probs, long_tail_counts

COUNTS = np.asarray(long_tail_counts(5000, 10, 100))  # CIFAR-10-LT, rho 100: 12,406 images
TARGETS = np.repeat(np.arange(10), COUNTS)


def test_steps_keep_or_drop_the_last_batch():
    """The paper's CIFAR loader keeps the last partial batch: 97 steps per epoch on CIFAR-10-LT; timm's drops it: 96."""
    assert len(TARGETS) == 12406
    assert len(EpochPlanner(TARGETS, 128, drop_last=False)) == 97
    assert len(EpochPlanner(TARGETS, 128, drop_last=True)) == 96
    plan = EpochPlanner(TARGETS, 128, drop_last=False).plan(0)
    assert len(plan) == 97 and len(plan[-1].index) == 12406 - 96 * 128
    assert sorted(np.concatenate([b.index for b in plan]).tolist()) == list(range(12406))  # a permutation


def test_rank_shares_and_seeds():
    shares = [EpochPlanner(TARGETS, 64, num_replicas=2, rank=r, drop_last=False) for r in range(2)]
    orders = [s.order(3) for s in shares]
    assert not set(orders[0]) & set(orders[1]) and len(set(orders[0]) | set(orders[1])) == 12406
    seeds = [b.seed for s in shares for b in s.plan(3)]
    assert len(set(seeds)) == len(seeds)  # every batch of every rank its own augmentation seed
    again = EpochPlanner(TARGETS, 64, num_replicas=2, rank=0, drop_last=False).plan(3)
    assert [b.seed for b in again] == [b.seed for b in shares[0].plan(3)]
    assert [b.index.tolist() for b in again] == [b.index.tolist() for b in shares[0].plan(3)]
    assert EpochPlanner(TARGETS, 64).order(4).tolist() != EpochPlanner(TARGETS, 64).order(3).tolist()


@pytest.mark.parametrize('r', [1.0, 0.5])
def test_ros_draws_follow_n_to_the_minus_r(r):
    planner = EpochPlanner(TARGETS, 128, ros_r=r, drop_last=False)
    labels = np.concatenate([TARGETS[planner.order(e)] for e in range(3)])
    assert len(labels) == 3 * 12406
    obs = np.bincount(labels, minlength=10)
    assert stats.chisquare(obs, class_sampling_probs(COUNTS, r=r) * len(labels)).pvalue > 1e-3


@pytest.mark.parametrize('variant', ['cmo', 'back', 'minor', 'blur', 'jitter'])
def test_window_decisions_and_variants(variant):
    cfg = CMOConfig(prob=0.5, start_epoch=1, end_epochs=1, variant=variant)  # mixes when 1 < epoch < 4 - 1
    planner = EpochPlanner(TARGETS, 128, cmo=cfg, epochs=4)
    assert [planner.cmo_active(e) for e in range(4)] == [False, False, True, False]
    q, p = class_sampling_probs(COUNTS, 1.0), COUNTS / COUNTS.sum()
    for epoch in range(4):
        plan = planner.plan(epoch)
        mixed = [b for b in plan if len(b.fg_index)]
        bg = TARGETS[np.concatenate([b.index for b in plan])]
        if not planner.cmo_active(epoch):  # outside the window: nothing mixed, backgrounds a shuffled epoch (P), for every variant
            assert not mixed and np.concatenate([b.index for b in plan]).tolist() == planner.order(epoch)[:96 * 128].tolist()
            continue
        assert stats.binomtest(len(mixed), len(plan), 0.5).pvalue > 1e-3
        assert all(b.fg_pos.tolist() == list(range(len(b.index))) for b in mixed)  # batch mode: every position
        fg = TARGETS[np.concatenate([b.fg_index for b in mixed])]
        law_bg = q if variant in ('back', 'minor') else p
        law_fg = p if variant == 'back' else q
        for labels, law in ((bg, law_bg), (fg, law_fg)):
            obs = np.bincount(labels, minlength=10)
            keep = law * len(labels) > 5
            assert stats.chisquare(obs[keep], law[keep] * len(labels) * obs[keep].sum() / (law[keep] * len(labels)).sum()
                                   ).pvalue > 1e-3


def test_elem_mode_positions():
    planner = EpochPlanner(TARGETS, 128, cmo=CMOConfig(prob=0.3, mode='elem', start_epoch=-1))
    plan = planner.plan(0)
    positions = np.concatenate([b.fg_pos for b in plan])
    assert stats.binomtest(len(positions), 96 * 128, 0.3).pvalue > 1e-3
    assert all(np.all(np.diff(b.fg_pos) > 0) and len(b.fg_pos) == len(b.fg_index) for b in plan)


def test_bad_options():
    with pytest.raises(ValueError, match='batch_size must be >= 1'):
        EpochPlanner(TARGETS, 0)
    with pytest.raises(ValueError, match='ros_r must be >= 0'):
        EpochPlanner(TARGETS, 8, ros_r=-1.)
    with pytest.raises(ValueError, match='dual_r must be >= 0'):
        EpochPlanner(TARGETS, 8, dual_r=-2.)


def bbn_reversed_sampler_law(counts):
    """BBN's dual sampler ('reverse', lib/dataset/imbalance_cifar.py): class k drawn with weight n_max / n_k, then an
    image of it uniformly."""
    weight = counts.max() / counts
    return weight / weight.sum()


def test_dual_batch_is_bbns_reversed_sampler():
    """The dual batch (dual_r=2): as many draws as each batch has images (the last, partial batch too), classes with
    BBN's reversed-sampler law (chi-square), each image of a class equally often; the law rejects instance-balanced
    and class-balanced draws alike."""
    planner = EpochPlanner(TARGETS, 128, drop_last=False, dual_r=2.0, seed=5)
    plans = [planner.plan(e) for e in range(3)]
    assert all(len(b.dual_index) == len(b.index) for plan in plans for b in plan)
    assert len(plans[0][-1].dual_index) == 12406 - 96 * 128
    drawn = np.concatenate([b.dual_index for plan in plans for b in plan])
    assert len(drawn) == 3 * 12406
    law = bbn_reversed_sampler_law(COUNTS)
    np.testing.assert_allclose(law, class_sampling_probs(COUNTS, r=2.0), rtol=1e-12)  # n_k^-2 per image
    obs = np.bincount(TARGETS[drawn], minlength=10)
    assert stats.chisquare(obs, law * len(drawn)).pvalue > 1e-3
    for other in (COUNTS / COUNTS.sum(), np.full(10, 0.1)):
        assert stats.chisquare(obs, other * len(drawn)).pvalue < 1e-100
    for k in (9, 5):  # within a class: uniform over its images
        images = drawn[TARGETS[drawn] == k]
        first = np.flatnonzero(TARGETS == k)[0]
        assert stats.chisquare(np.bincount(images - first, minlength=COUNTS[k])).pvalue > 1e-3
    assert planner.plan(1)[3].dual_index.tolist() == plans[1][3].dual_index.tolist()  # from (seed, epoch) alone
    assert plans[1][3].dual_index.tolist() != plans[2][3].dual_index.tolist()


@pytest.mark.parametrize('opts', [dict(), dict(ros_r=0.5), dict(cmo=CMOConfig(prob=0.5, start_epoch=-1, mode='elem'))])
def test_dual_stream_leaves_the_rest_of_the_plan(opts):
    """Adding the dual batch changes nothing else: same order, ROS draws, CMO decisions, foregrounds and seeds; a
    rank takes its slice of the one seeded draw."""
    plain = EpochPlanner(TARGETS, 100, seed=2, **opts).plan(1)
    dual = EpochPlanner(TARGETS, 100, seed=2, dual_r=2.0, **opts).plan(1)
    for a, b in zip(plain, dual):
        assert a.index.tolist() == b.index.tolist() and a.fg_index.tolist() == b.fg_index.tolist()
        assert a.fg_pos.tolist() == b.fg_pos.tolist() and a.seed == b.seed
        assert len(a.dual_index) == 0 and len(b.dual_index) == len(b.index)
    ranks = [EpochPlanner(TARGETS, 100, seed=2, dual_r=2.0, num_replicas=2, rank=r, **opts) for r in range(2)]
    for r, planner in enumerate(ranks):
        got = np.concatenate([b.dual_index for b in planner.plan(1)])
        full = planner.dual_sampler.draw(1).numpy()
        assert got.tolist() == full[r::2][:len(got)].tolist()


@pytest.mark.parametrize('recipe', ['cifar10_lt_r100_ce_crt', 'cifar10_lt_r100_ce_cmo_lws'])
def test_second_stage_recipes_sample_class_balanced(recipe):
    """The cRT / LWS recipes' sampler on mini CIFAR-10-LT (1000 ... 10, 2,478 images): every class equally often
    (chi-square against 1/C), every image of the rarest class equally often; the same test rejects the
    instance-balanced epoch a stage 1 trains with."""
    import yaml
    from pathlib import Path
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / 'hparams' / f'{recipe}.yaml').read_text())
    assert config['ros'] is True
    targets = np.repeat(np.arange(10), long_tail_counts(1000, 10, 100))
    planner = EpochPlanner(targets, config['batch_size'], ros_r=config['ros_r'], drop_last=config['drop_last'], seed=3)
    drawn = np.concatenate([planner.order(e) for e in range(10)])
    assert len(drawn) == 10 * len(targets) == 24780
    assert stats.chisquare(np.bincount(targets[drawn], minlength=10)).pvalue > 1e-3
    rare = drawn[targets[drawn] == 9]
    assert stats.chisquare(np.bincount(rare - rare.min(), minlength=10)).pvalue > 1e-3
    plain = np.concatenate([EpochPlanner(targets, 128, seed=3).order(e) for e in range(10)])
    assert stats.chisquare(np.bincount(targets[plain], minlength=10)).pvalue < 1e-100
