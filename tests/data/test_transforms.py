"""Batched per-image blur and colour jitter (CMO's Table 12 variants) against torchvision's per-image functions."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from timm_cmo.data.transforms import color_jitter_batch, gaussian_blur_batch, normalization


def images(b=6, c=3, h=16, w=12, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('shape,radius', [((6, 3, 16, 12), 6), ((4, 1, 9, 9), 6), ((3, 3, 5, 7), 6), ((2, 3, 8, 8), 2)])
def test_blur_is_torchvisions_gaussian_blur_per_image(shape, radius):
    x = images(*shape)
    sigma = torch.linspace(0.1, 2.0, shape[0])
    out = gaussian_blur_batch(x, sigma, radius=radius)
    r = min(radius, shape[2] - 1, shape[3] - 1)  # reflection needs a radius below the image size
    for i in range(shape[0]):
        ref = TF.gaussian_blur(x[i], kernel_size=[2 * r + 1, 2 * r + 1], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=2e-6)


def test_blur_commutes_with_normalisation():
    """Kernel sums to 1 and reflect padding: blurring normalised images is normalising blurred ones."""
    x = images() * 255
    mean, std = normalization((0.49, 0.48, 0.45), (0.2, 0.19, 0.2), 3, torch.device('cpu'))
    sigma = torch.full((6,), 1.3)
    torch.testing.assert_close(gaussian_blur_batch((x - mean) / std, sigma),
                               (gaussian_blur_batch(x, sigma) - mean) / std, rtol=0, atol=1e-4)


OPS = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}


@pytest.mark.parametrize('channels', [3, 1])
def test_jitter_is_torchvisions_adjustments_in_the_drawn_order(channels):
    b = 12
    x = images(b, channels)
    rng = np.random.default_rng(0)
    factors = torch.from_numpy(rng.uniform(0.6, 1.4, size=(b, 3)).astype(np.float32))
    order = torch.from_numpy(np.argsort(rng.random((b, 3)), axis=1))
    assert len({tuple(o) for o in order.tolist()}) > 3  # several orders in one batch
    out = color_jitter_batch(x, factors, order)
    for i in range(b):
        ref = x[i]
        for op in order[i].tolist():
            ref = OPS[op](ref, float(factors[i, op]))
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6)
    # on the 0-255 scale with bound 255, the same images
    torch.testing.assert_close(color_jitter_batch(x * 255, factors, order, bound=255.) / 255, out, rtol=0, atol=1e-5)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_jitter_needs_one_or_three_channels():
    with pytest.raises(ValueError, match='1 or 3 channels, got 2'):
        color_jitter_batch(torch.rand(2, 2, 4, 4), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))
