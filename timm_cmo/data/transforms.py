""" Image transforms: the paper's CIFAR training crop for timm pipelines, the normalisation of uint8
batches, and batched per-image Gaussian blur and colour jitter on the device (CMO's Table 12 variants). """
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data.loader import adapt_to_chs
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms


def img_size_of(input_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) of an input size given as an int, (H, W) or (C, H, W)."""
    if isinstance(input_size, int):
        return input_size, input_size
    return tuple(input_size[-2:])


def pad_crop_transform(
        transform: transforms.Compose,
        input_size: Union[int, Sequence[int]],
        padding: int = 4,
) -> transforms.Compose:
    """Replace the random-resized crop of a timm training transform with pad + random crop.

    The CIFAR recipe of the paper: zero-pad ``padding`` pixels on each side, then crop the input
    size at a random offset. Flips, colour and auto augmentation and the final tensor conversion
    stay as timm built them.

    Args:
        transform: A timm training transform whose first step is a random-resized crop.
        input_size: Model input size (int, (H, W) or (C, H, W)).
        padding: Zero padding on each side. Default 4.
    """
    if padding < 0:
        raise ValueError(f'crop padding must be >= 0, got {padding}')
    steps = list(getattr(transform, 'transforms', []))
    if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
        raise ValueError(f'Expected a timm training transform starting with a random-resized crop, got {transform}')
    steps[0] = transforms.RandomCrop(img_size_of(input_size), padding=padding, pad_if_needed=True)
    return transforms.Compose(steps)


def normalization(
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on the 0-255 scale, shaped (1, C, 1, 1), for normalising uint8 batches.

    Scaled in double precision before the cast, as timm's ``PrefetchLoader`` does, so both paths
    normalise to the same bits (scaling after the cast differs by an ulp and the runs drift apart).
    A scalar, or a length other than ``channels``, is adapted as timm does (repeated / averaged).
    """
    mean, std = adapt_to_chs(mean, channels), adapt_to_chs(std, channels)
    shape = (1, channels, 1, 1)
    return (torch.tensor([m * 255 for m in mean], device=device, dtype=dtype).view(shape),
            torch.tensor([s * 255 for s in std], device=device, dtype=dtype).view(shape))


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Blur each image of a batch with its own Gaussian: torchvision's ``gaussian_blur`` per image, batched.

    The kernel has ``2 * radius + 1`` taps ``exp(-t^2 / (2 sigma^2))``, normalised to sum 1, applied along
    rows and columns with reflect padding (the radius is cut to ``min(H, W) - 1``, as reflection needs).
    With reflect padding and a kernel summing to 1 the blur commutes with per-channel normalisation
    ``(x - mean) / std``, so normalised batches can be blurred directly.

    Args:
        x: (B, C, H, W) float.
        sigma: (B,) standard deviations, > 0, on ``x``'s device.
        radius: Kernel half-width. Default 6 (3 sigma at sigma 2).

    Returns:
        (B, C, H, W) blurred, a new tensor.
    """
    b, c, h, w = x.shape
    r = max(0, min(radius, h - 1, w - 1))
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(x.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B * C, 2r + 1)
    out = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode='reflect')
    out = F.conv2d(out, kernel.view(b * c, 1, 1, 2 * r + 1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, 2 * r + 1, 1), groups=b * c)
    return out.view(b, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images (torchvision's weights), the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other, ratio: torch.Tensor, bound: float) -> torch.Tensor:
    return (ratio * x + (1.0 - ratio) * other).clamp(0, bound)


JITTER_OPS = ('brightness', 'contrast', 'saturation')


def color_jitter_batch(
        x: torch.Tensor,
        factors: torch.Tensor,
        order: torch.Tensor,
        bound: float = 1.0,
) -> torch.Tensor:
    """torchvision's ``adjust_brightness``, ``adjust_contrast`` and ``adjust_saturation``, per image, batched.

    Image i gets the three adjustments in the order ``order[i]`` (a permutation of 0, 1, 2 indexing
    :data:`JITTER_OPS`) with factors ``factors[i]`` (brightness, contrast, saturation), as
    ``ColorJitter`` applies them: each step ``(f * x + (1 - f) * y).clamp(0, bound)`` with ``y`` zero
    (brightness), the image's mean luma (contrast) or its luma (saturation; none for one channel).

    Args:
        x: (B, C, H, W) float images on the ``[0, bound]`` scale, C = 1 or 3.
        factors: (B, 3) float factors, on ``x``'s device.
        order: (B, 3) int64 permutations, on ``x``'s device.
        bound: The white level (1 for [0, 1] images, 255 for the 0-255 scale).

    Returns:
        (B, C, H, W), a new tensor.
    """
    if x.shape[1] not in (1, 3):
        raise ValueError(f'colour jitter needs 1 or 3 channels, got {x.shape[1]}')
    factors = factors.to(x.dtype)
    view = (-1, 1, 1, 1)
    for step in range(3):
        op = order[:, step]
        f = factors.gather(1, op[:, None]).view(view)
        gray = _grayscale(x)
        brightness = _blend(x, 0., f, bound)
        contrast = _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), f, bound)
        saturation = _blend(x, gray, f, bound) if x.shape[1] == 3 else x
        op = op.view(view)
        x = torch.where(op == 0, brightness, torch.where(op == 1, contrast, saturation))
    return x
