"""Held-out validation sets and shifted-prior test sets: disjoint from training, seeded, the protocol's counts."""
import numpy as np
import pytest

from timm_cmo.data import long_tail_counts, long_tail_indices
from timm_cmo.data.splits import (
    PriorFileError, describe_prior, leftover_holdout_indices, read_prior_file, shifted_test_indices,
    stratified_holdout, stratified_holdout_counts, shifted_prior_counts)

C = 10
SOURCE = np.repeat(np.arange(C), 500)  # a balanced training source, 500 images a class
RNG = np.random.RandomState(7)
SOURCE = SOURCE[RNG.permutation(len(SOURCE))]  # interleaved, as a real source's order
LT = long_tail_indices(SOURCE, long_tail_counts(100, C, 10), seed=0)  # the long-tailed subset: 100 ... 10


def test_leftover_holdout_is_balanced_unseen_and_seeded():
    held = leftover_holdout_indices(SOURCE, LT, per_class=40, num_classes=C, seed=3)
    assert len(held) == 40 * C and len(np.unique(held)) == len(held)
    assert not set(held.tolist()) & set(LT.tolist())  # never a training image
    assert np.bincount(SOURCE[held], minlength=C).tolist() == [40] * C
    again = leftover_holdout_indices(SOURCE, LT, per_class=40, num_classes=C, seed=3)
    other = leftover_holdout_indices(SOURCE, LT, per_class=40, num_classes=C, seed=4)
    assert np.array_equal(held, again) and not np.array_equal(np.sort(held), np.sort(other))
    # class 0 kept 100 of its 500 images: 400 are left, so 401 is too many for it (and only for it)
    with pytest.raises(ValueError, match=r'1 classes have fewer than 401 .* \{0: 400\}'):
        leftover_holdout_indices(SOURCE, LT, per_class=401, num_classes=C)
    with pytest.raises(ValueError, match='positive integer'):
        leftover_holdout_indices(SOURCE, LT, per_class=0, num_classes=C)


def test_stratified_holdout_counts_and_split():
    targets = SOURCE[LT]
    counts = np.bincount(targets, minlength=C)
    held_counts = stratified_holdout_counts(counts, 0.2)
    assert held_counts == [min(n - 1, max(1, round(0.2 * n))) for n in counts]
    assert stratified_holdout_counts([1, 2, 3], 0.1) == [0, 1, 1]  # one image stays for training
    kept, held = stratified_holdout(targets, 0.2, C, seed=1)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(targets)))
    assert np.bincount(targets[held], minlength=C).tolist() == held_counts
    assert np.array_equal(held, stratified_holdout(targets, 0.2, C, seed=1)[1])
    assert not np.array_equal(held, stratified_holdout(targets, 0.2, C, seed=2)[1])
    with pytest.raises(ValueError, match='fraction must be in'):
        stratified_holdout(targets, 1.0, C)


def _lade_counts(n_max, rho, reverse):
    """LADE's IMBALANCECIFAR test set (get_img_num_per_cls with test_imb_ratio 1/rho, reverse), written out."""
    f = 1. / rho
    return [int(n_max * f ** (((C - 1 - i) if reverse else i) / (C - 1.))) for i in range(C)]


@pytest.mark.parametrize('rho', [2, 10, 50])
def test_forward_and_backward_are_ladess_test_sets(rho):
    test = [1000] * C
    assert shifted_prior_counts('forward', test, imb_ratio=rho) == _lade_counts(1000, rho, False)
    assert shifted_prior_counts('backward', test, imb_ratio=rho) == _lade_counts(1000, rho, True)
    assert shifted_prior_counts('uniform', test) == [1000] * C


def test_forward_follows_the_training_order_of_the_classes():
    """Classes not sorted by training size (ImageNet-LT): forward gives the largest test share to the largest
    training class, backward to the smallest."""
    train = [5, 50, 500, 20, 200, 2, 100, 10, 1000, 1]
    forward = shifted_prior_counts('forward', [50] * C, train_counts=train, imb_ratio=10)
    backward = shifted_prior_counts('backward', [50] * C, train_counts=train, imb_ratio=10)
    by_rank = long_tail_counts(50, C, 10)
    order = np.argsort(-np.asarray(train), kind='stable')
    assert [forward[c] for c in order] == by_rank and [backward[c] for c in order] == by_rank[::-1]
    assert forward[8] == 50 and backward[9] == 50


def test_profile_from_weights_and_errors():
    assert shifted_prior_counts([4., 2., 1., 0., 1., 1., 1., 1., 1., 1.], [100] * C) == [100, 50, 25, 0] + [25] * 6
    assert shifted_prior_counts('uniform', [30, 20, 50] + [40] * 7) == [20] * C  # n_max: the smallest test class
    with pytest.raises(ValueError, match='needs an imbalance ratio'):
        shifted_prior_counts('forward', [100] * C)
    with pytest.raises(ValueError, match='leaves classes without test images'):
        shifted_prior_counts('forward', [20] * C, imb_ratio=50)
    with pytest.raises(ValueError, match='3 class weights for 10 classes'):
        shifted_prior_counts([1., 2., 3.], [100] * C)


def test_shifted_indices_have_the_counts_and_are_seeded():
    targets = np.repeat(np.arange(C), 100)
    counts = shifted_prior_counts('backward', [100] * C, imb_ratio=10)
    idx = shifted_test_indices(targets, counts, seed=0)
    assert np.bincount(targets[idx], minlength=C).tolist() == counts and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, shifted_test_indices(targets, counts, seed=0))
    assert not np.array_equal(idx, shifted_test_indices(targets, counts, seed=1))
    record = describe_prior(counts)
    assert record['images'] == sum(counts) and record['measured_imb_ratio'] == pytest.approx(10.)
    assert sum(record['prior']) == pytest.approx(1.)


def test_prior_file(tmp_path):
    good = tmp_path / 'prior.txt'
    good.write_text('# class weights\n' + '\n'.join(str(w) for w in range(1, C + 1)) + '\n\n')
    assert read_prior_file(str(good), C).tolist() == list(range(1, C + 1))
    cases = {
        'short': ('1\n2\n3\n', f'3 class weights for {C} classes'),
        'negative': ('1\n-2\n' + '1\n' * (C - 2), 'line 2: \'-2\': class weights must be finite and >= 0'),
        'text': ('1\nmany\n', "line 2: 'many' is not a number"),
        'zeros': ('0\n' * C, 'all zero'),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f'{name}.txt'
        path.write_text(text)
        with pytest.raises(PriorFileError, match=message) as e:
            read_prior_file(str(path), C)
        assert str(path) in str(e.value)
    with pytest.raises(PriorFileError, match='cannot read'):
        read_prior_file(str(tmp_path / 'missing.txt'))
