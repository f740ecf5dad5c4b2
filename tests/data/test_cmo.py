"""The CMO mixing step: exact paste, exact lambda, soft targets, probabilities, the paper's box."""
import numpy as np
import pytest
import torch
from scipy import stats

from timm_cmo.data import CMOMixup, rand_bbox

C = 10


def _batches(b=8, h=32, w=32):
    """Backgrounds of value -1 - i and foregrounds of value 1 + i: every pixel tells where it came from."""
    x_bg = -1. - torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    x_fg = 1. + torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    y_bg = torch.arange(b) % C
    y_fg = (torch.arange(b) + 3) % C
    return x_bg, y_bg, x_fg, y_fg


def _check_pasted(x, x_bg, x_fg, lam):
    """Pixels are exactly background or the same sample's foreground; lambda is the kept-area ratio."""
    from_fg = x == x_fg
    from_bg = x == x_bg
    assert bool((from_fg ^ from_bg).all())
    kept = from_bg[:, 0].float().mean(dim=(1, 2))
    torch.testing.assert_close(kept, torch.as_tensor(lam, dtype=torch.float32).expand_as(kept))
    # the pasted region is one axis-aligned box, the same in every channel
    assert bool((from_fg == from_fg[:, :1]).all())
    for m in from_fg[:, 0]:
        if m.any():
            rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
            box = m[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert bool(box.all())


def _check_targets(target, y_bg, y_fg, lam):
    lam = torch.as_tensor(lam, dtype=torch.float32).expand(len(y_bg))
    torch.testing.assert_close(target.sum(1), torch.ones(len(y_bg)))
    idx = torch.arange(len(y_bg))
    torch.testing.assert_close(target[idx, y_bg], lam)
    torch.testing.assert_close(target[idx, y_fg], 1 - lam)


def test_batch_mode_paste_is_exact():
    mixer = CMOMixup(C, prob=1.0, seed=0)
    for _ in range(20):
        x_bg, y_bg, x_fg, y_fg = _batches()
        orig_bg = x_bg.clone()
        x, target = mixer(x_bg, y_bg, x_fg, y_fg)
        lam = mixer.last.lam
        assert isinstance(lam, float)
        _check_pasted(x, orig_bg, x_fg, lam)
        _check_targets(target, y_bg, y_fg, lam)
        assert torch.equal(mixer.last.y_b, y_bg) and torch.equal(mixer.last.y_f, y_fg)
        # one box for the whole batch
        m = (x == x_fg)[:, 0]
        assert bool((m == m[:1]).all())


def test_elem_mode_per_sample_boxes():
    mixer = CMOMixup(C, prob=1.0, mode='elem', seed=1)
    x_bg, y_bg, x_fg, y_fg = _batches(b=16)
    orig_bg = x_bg.clone()
    x, target = mixer(x_bg, y_bg, x_fg, y_fg)
    lam = mixer.last.lam
    assert lam.shape == (16,)
    _check_pasted(x, orig_bg, x_fg, lam)
    _check_targets(target, y_bg, y_fg, lam)
    masks = (x == x_fg)[:, 0]
    assert len({m.numpy().tobytes() for m in masks}) > 8  # boxes differ between samples


def test_elem_mode_apply_mask():
    mixer = CMOMixup(C, mode='elem', seed=2)
    x_bg, y_bg, x_fg, y_fg = _batches(b=6)
    apply = torch.tensor([True, False, True, False, False, True])
    orig_bg = x_bg.clone()
    x, target, lam = mixer.mix(x_bg, y_bg, x_fg, y_fg, apply=apply)
    assert torch.equal(x[~apply], orig_bg[~apply])
    assert bool((lam[~apply] == 1).all())
    torch.testing.assert_close(target[~apply], torch.eye(C)[y_bg[~apply]])
    assert torch.equal(mixer.last.y_f[~apply], y_bg[~apply])


def test_label_smoothing_targets():
    mixer = CMOMixup(C, prob=1.0, label_smoothing=0.1, seed=0)
    x_bg, y_bg, x_fg, y_fg = _batches()
    _, target = mixer(x_bg, y_bg, x_fg, y_fg)
    lam = mixer.last.lam
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    off, on = 0.1 / C, 0.9 + 0.1 / C
    idx = torch.arange(8)
    torch.testing.assert_close(target[idx, y_bg], torch.full((8,), lam * on + (1 - lam) * off))


def test_blend_variant():
    mixer = CMOMixup(C, prob=1.0, blend=True, seed=0)
    x_bg, y_bg, x_fg, y_fg = _batches()
    orig = x_bg.clone()
    x, target = mixer(x_bg, y_bg, x_fg, y_fg)
    lam = mixer.last.lam
    torch.testing.assert_close(x, lam * orig + (1 - lam) * x_fg)
    _check_targets(target, y_bg, y_fg, lam)


@pytest.mark.parametrize('mode', ['batch', 'elem'])
def test_prob_is_honoured(mode):
    mixer = CMOMixup(C, prob=0.3, mode=mode, seed=3)
    mixed, n = 0, 0
    for _ in range(400):
        x_bg, y_bg, x_fg, y_fg = _batches(b=4, h=8, w=8)
        mixer(x_bg, y_bg, x_fg, y_fg)
        lam = torch.as_tensor(mixer.last.lam).expand(4)
        is_mixed = mixer.last.y_f != mixer.last.y_b
        mixed += int(is_mixed.sum()) if mode == 'elem' else 4 * int(bool(is_mixed.any()))
        n += 4
        assert bool((lam[~is_mixed] == 1).all())
    expected = 0.3 * n
    assert stats.binomtest(mixed // (1 if mode == 'elem' else 4), n // (1 if mode == 'elem' else 4), 0.3).pvalue > 1e-3, (mixed, expected)


def test_prob_zero_and_one():
    x_bg, y_bg, x_fg, y_fg = _batches()
    orig = x_bg.clone()
    x, target = CMOMixup(C, prob=0.0, seed=0)(x_bg, y_bg, x_fg, y_fg)
    assert torch.equal(x, orig)
    torch.testing.assert_close(target, torch.eye(C)[y_bg])


def paper_rand_bbox(size, lam):
    """The CutMix box of the paper's code, verbatim apart from np.int -> int."""
    W = size[2]
    H = size[3]
    cut_rat = np.sqrt(1. - lam)
    cut_w = int(W * cut_rat)
    cut_h = int(H * cut_rat)
    cx = np.random.randint(W)
    cy = np.random.randint(H)
    bbx1 = np.clip(cx - cut_w // 2, 0, W)
    bby1 = np.clip(cy - cut_h // 2, 0, H)
    bbx2 = np.clip(cx + cut_w // 2, 0, W)
    bby2 = np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def test_lambda_distribution_matches_papers_code():
    """Corrected lambda (kept-area ratio) from our mixer vs the paper's Beta + rand_bbox (two-sample KS)."""
    np.random.seed(0)
    ref = []
    for _ in range(4000):
        lam = np.random.beta(1.0, 1.0)
        x1, y1, x2, y2 = paper_rand_bbox((1, 3, 32, 32), lam)
        ref.append(1 - ((x2 - x1) * (y2 - y1) / (32 * 32)))
    mixer = CMOMixup(C, prob=1.0, seed=0)
    ours = []
    for _ in range(4000):
        x_bg, y_bg, x_fg, y_fg = _batches(b=1)
        mixer(x_bg, y_bg, x_fg, y_fg)
        ours.append(mixer.last.lam)
    assert stats.ks_2samp(ref, ours).pvalue > 1e-3
    assert abs(np.mean(ours) - np.mean(ref)) < 0.02


def test_rand_bbox_box_law():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.99, 1.0):
        y0, y1, x0, x1 = rand_bbox((32, 24), lam, rng)
        cut_h, cut_w = int(32 * np.sqrt(1 - lam)), int(24 * np.sqrt(1 - lam))
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 24
        assert y1 - y0 <= 2 * (cut_h // 2) and x1 - x0 <= 2 * (cut_w // 2)


@pytest.mark.parametrize('kwargs,message', [
    (dict(prob=1.5), 'prob must be in'), (dict(beta=0.), 'beta must be > 0'),
    (dict(mode='pixel'), "'pixel'"), (dict(label_smoothing=-0.1), 'label_smoothing'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CMOMixup(C, **kwargs)


def test_shape_mismatch():
    x_bg, y_bg, x_fg, y_fg = _batches()
    with pytest.raises(ValueError, match='differ in shape'):
        CMOMixup(C, prob=1.0)(x_bg, y_bg, x_fg[:4], y_fg[:4])


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _normalised(b, seed):
    """Normalised images (B, 3, 16, 16) of random 0-255 pixels, and the (1, 3, 1, 1) mean / std on the 0-255 scale."""
    raw = torch.randint(0, 256, (b, 3, 16, 16), generator=torch.Generator().manual_seed(seed)).float()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (raw - mean) / std, mean, std


@pytest.mark.parametrize('variant', ['blur', 'jitter'])
def test_augment_variants_replace_the_batch_with_the_augmented_foreground(variant):
    """Table 12's blur / jitter: the foreground, blurred (torchvision's gaussian_blur, sigma ~ U(0.1, 2)) or
    jittered (torchvision's brightness / contrast / saturation on the unnormalised image, factors ~ U(0.6, 1.4), in a
    random order), replaces the background; lambda 0, the target the foreground's label."""
    from timm_cmo.data.cmo import CMOConfig
    import torchvision.transforms.functional as TF
    mixer = CMOConfig(variant=variant, prob=1.0).mixer(C, mean=MEAN, std=STD)
    mixer.reseed(4)
    x_bg, _, _ = _normalised(8, 0)
    x_fg, mean, std = _normalised(8, 1)
    y_bg, y_fg = torch.arange(8) % C, (torch.arange(8) + 3) % C
    out, target = mixer(x_bg, y_bg, x_fg.clone(), y_fg)
    assert mixer.last.lam == 0. and torch.equal(mixer.last.y_f, y_fg)
    torch.testing.assert_close(target, torch.eye(C)[y_fg])
    rng = np.random.default_rng(4)
    rng.random()  # the batch-mode mixing decision
    if variant == 'blur':
        sigma = rng.uniform(0.1, 2.0, size=8)
        assert sigma.min() < 0.7 and sigma.max() > 1.4
        for i in range(8):
            ref = TF.gaussian_blur(x_fg[i], kernel_size=[13, 13], sigma=[float(np.float32(sigma[i]))] * 2)
            torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
    else:
        factors = rng.uniform(0.6, 1.4, size=(8, 3)).astype(np.float32)
        order = np.argsort(rng.random((8, 3)), axis=1)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        for i in range(8):
            ref = (x_fg[i] * std[0] + mean[0]) / 255
            for op in order[i]:
                ref = ops[op](ref, float(factors[i, op]))
            torch.testing.assert_close(out[i], (ref * 255 - mean[0]) / std[0], rtol=0, atol=1e-4)
    assert not torch.allclose(out, x_fg, atol=1e-3)  # augmented, not copied


@pytest.mark.parametrize('variant', ['blur', 'jitter'])
def test_augment_variants_in_elem_mode_replace_the_planned_positions(variant):
    mixer = CMOMixup(C, mode='elem', augment=variant, mean=MEAN, std=STD, seed=0)
    x_bg, _, _ = _normalised(6, 0)
    x_fg, _, _ = _normalised(6, 1)
    orig = x_bg.clone()
    y_bg = torch.arange(6)
    y_planned = torch.tensor([-1, 5, -1, -1, 8, 9])  # foregrounds for positions 1, 4, 5 (the plan's form)
    out, target = mixer.paste(x_bg, y_bg, x_fg[[1, 4, 5]].clone(), y_planned)
    apply = y_planned >= 0
    assert torch.equal(out[~apply], orig[~apply])
    assert not torch.allclose(out[apply], orig[apply])
    assert mixer.last.lam.tolist() == [1., 0., 1., 1., 0., 0.]
    assert mixer.last.y_f.tolist() == [0, 5, 2, 3, 8, 9]
    torch.testing.assert_close(target, torch.eye(C)[mixer.last.y_f])


def test_augment_option_errors():
    with pytest.raises(ValueError, match="augment must be one of"):
        CMOMixup(C, augment='sharpen')
    with pytest.raises(ValueError, match='cannot also blend'):
        CMOMixup(C, augment='blur', blend=True)
