""" The paper's CIFAR training crop for timm transform pipelines. """
from typing import Sequence, Tuple, Union

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
