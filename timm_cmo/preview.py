""" A picture of what CMO does to a long-tailed dataset, like Figure 2 of the paper.

``python -m timm_cmo.preview --data-dir <root> --out cmo.png`` writes a PNG grid of three rows of
``--num`` images:

1. *minority foreground (x_f ~ Q)*: images drawn with :class:`~timm_cmo.data.ClassWeightedSampler`
   (per-sample weight n_k^-r). Draws from Q are kept only when their class is in the *tail half*
   of the classes (the ``C // 2`` classes with the fewest training images, at least one class), and
   each image at most once, so the row shows minority classes as the paper's figure does. Should Q
   rarely land in the tail (small ``r``), the row is filled up with the remaining draws from Q.
2. *majority background (x_b ~ P)*: images drawn uniformly from the dataset (P, mostly head
   classes), never the same image as the foreground of its column.
3. *CMO result*: :class:`~timm_cmo.data.CMOMixup` (``prob=1``, ``beta=1``) pastes the foreground's
   CutMix box into the background. In ``elem`` mode (default) each column has its own box and
   lambda; ``batch`` mode uses one box for the whole row, as one training batch would.

Only the dataset's raw images are used (its transform is switched off while reading), resized to a
common size (the first shown image's size, or ``size``), mixed as uint8-valued float tensors
without normalisation, then upscaled ``scale`` times (nearest). Each image has its class name (and
class size n) under it; results show ``lam`` (the kept background fraction) and ``bg/fg`` names.
The layout (cell boxes, indices, labels, lambdas) is stored in the PNG's ``cmo-preview`` text chunk.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .data.cmo import CMOMixup
from .data.dataset import create_lt_dataset, dataset_class_names, dataset_targets
from .data.sampler import ClassWeightedSampler
from .files import atomic_write

__all__ = ['make_preview', 'main', 'tail_classes', 'grid_size', 'cell_box', 'ROW_TITLES']

ROW_TITLES = (
    ('minority foreground', '(x_f ~ Q)'),
    ('majority background', '(x_b ~ P)'),
    ('CMO result', '(x_f box in x_b)'),
)
MARGIN = 8  # outer border (px)
TITLE_W = 130  # width of the row-title column (px)
GAP = 6  # between columns and between rows (px)
LINE_H = 14  # one label line (px)
LABEL_LINES = 2  # label lines under every image
BG_COLOUR = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
INFO_KEY = 'cmo-preview'
_MAX_PASSES = 50


def grid_size(num: int, img_size: Tuple[int, int], scale: int) -> Tuple[int, int]:
    """(width, height) of the preview PNG for ``num`` columns of ``img_size`` (H, W) images upscaled ``scale`` times."""
    cell_h, cell_w = img_size[0] * scale, img_size[1] * scale
    width = 2 * MARGIN + TITLE_W + num * cell_w + (num - 1) * GAP
    height = 2 * MARGIN + 3 * (cell_h + LABEL_LINES * LINE_H) + 2 * GAP
    return width, height


def cell_box(row: int, col: int, img_size: Tuple[int, int], scale: int) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of the upscaled image in ``row`` (0..2), ``col`` of the grid."""
    cell_h, cell_w = img_size[0] * scale, img_size[1] * scale
    left = MARGIN + TITLE_W + col * (cell_w + GAP)
    top = MARGIN + row * (cell_h + LABEL_LINES * LINE_H + GAP)
    return left, top, left + cell_w, top + cell_h


def tail_classes(class_counts: Sequence[int]) -> List[int]:
    """The rarer half of the classes present: the ``max(1, C // 2)`` with the fewest images (ties by index)."""
    counts = np.asarray(class_counts)
    present = np.nonzero(counts > 0)[0]
    order = present[np.argsort(counts[present], kind='stable')]
    return sorted(order[:max(1, len(present) // 2)].tolist())


def _draw_foregrounds(targets: np.ndarray, num: int, r: float, seed: int, tail: Sequence[int]) -> List[int]:
    """``num`` distinct indices drawn from Q (n_k^-r), keeping draws of ``tail`` classes first."""
    sampler = ClassWeightedSampler(targets, r=r, seed=seed, num_replicas=1, rank=0)
    in_tail = np.isin(targets, np.asarray(tail))
    picked: List[int] = []
    spare: List[int] = []
    seen = set()
    for _ in range(_MAX_PASSES):
        for idx in sampler:
            if idx in seen:
                continue
            seen.add(idx)
            (picked if in_tail[idx] else spare).append(idx)
            if len(picked) == num:
                return picked
    # Q hardly reaches the tail: fill up with the other draws from Q
    return (picked + spare)[:num]


def _draw_backgrounds(n: int, num: int, seed: int, avoid: Sequence[int]) -> List[int]:
    """``num`` indices drawn uniformly (P), distinct where the dataset allows, index i != avoid[i]."""
    rng = np.random.default_rng([seed, 1])
    chosen = rng.choice(n, size=num, replace=num > n).tolist()
    for i, a in enumerate(avoid):
        while n > 1 and chosen[i] == a:
            chosen[i] = int(rng.integers(n))
    return chosen


def _to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, torch.Tensor):
        arr = img.detach().cpu()
        if arr.is_floating_point():
            arr = (arr.clamp(0, 1) * 255).round()
        arr = arr.to(torch.uint8).numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        return Image.fromarray(arr.squeeze())
    if isinstance(img, np.ndarray):
        return Image.fromarray(img)
    raise TypeError(f'Cannot show a {type(img).__name__} as an image')


def _read_raw(dataset: Any, indices: Sequence[int]) -> List[Image.Image]:
    """The untransformed images at ``indices`` as RGB PIL images."""
    try:
        saved = dataset.transform
    except AttributeError:
        saved, has_transform = None, False
    else:
        has_transform = True
        dataset.transform = None
    try:
        return [_to_pil(dataset[int(i)][0]).convert('RGB') for i in indices]
    finally:
        if has_transform:
            dataset.transform = saved


def _load_font():
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + '...', font=font) > width:
        text = text[:-1]
    return text + '...'


def make_preview(
        dataset: Any,
        num: int = 8,
        r: float = 1.0,
        seed: int = 0,
        scale: int = 4,
        out: Optional[str] = None,
        size: Optional[int] = None,
        mode: str = 'elem',
        beta: float = 1.0,
) -> Image.Image:
    """Draw the three-row CMO grid (foregrounds from Q, backgrounds from P, CMO results).

    Args:
        dataset: A map-style dataset returning ``(image, target)`` with per-sample labels
            (``targets`` or a timm reader), e.g. from :func:`~timm_cmo.data.create_lt_dataset`.
        num: Columns (image pairs).
        r: Foreground weight exponent (n_k^-r), as ``cmo_r``.
        seed: Seed of all draws (foregrounds, backgrounds, boxes); same seed, same picture.
        scale: Nearest-neighbour upscaling of each image.
        out: Write the PNG here (atomically) when given.
        size: Resize every image to ``size`` x ``size``; default the first foreground's size.
        mode: ``'elem'`` (a box per column) or ``'batch'`` (one box for the row).
        beta: lambda ~ Beta(beta, beta).

    Returns:
        The RGB grid; ``image.info['cmo-preview']`` holds the layout as JSON.
    """
    if num < 1:
        raise ValueError(f'num must be >= 1, got {num}')
    if scale < 1:
        raise ValueError(f'scale must be >= 1, got {scale}')
    targets = dataset_targets(dataset)
    counts = np.bincount(targets)
    num_classes = max(int(getattr(dataset, 'num_classes', 0) or 0), len(counts))
    counts = np.bincount(targets, minlength=num_classes)
    names = dataset_class_names(dataset) or [str(c) for c in range(num_classes)]
    tail = tail_classes(counts)

    fg_idx = _draw_foregrounds(targets, num, r, seed, tail)
    num = len(fg_idx)
    bg_idx = _draw_backgrounds(len(targets), num, seed, fg_idx)
    fg_imgs, bg_imgs = _read_raw(dataset, fg_idx), _read_raw(dataset, bg_idx)
    img_w, img_h = (size, size) if size else fg_imgs[0].size
    resample = getattr(Image, 'Resampling', Image).BICUBIC

    def to_tensor(imgs):
        arrs = [np.asarray(im if im.size == (img_w, img_h) else im.resize((img_w, img_h), resample)) for im in imgs]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()

    x_f, x_b = to_tensor(fg_imgs), to_tensor(bg_imgs)
    y_f = torch.as_tensor(targets[fg_idx])
    y_b = torch.as_tensor(targets[bg_idx])
    mixer = CMOMixup(num_classes, prob=1.0, beta=beta, mode=mode, seed=seed)
    x_m, _ = mixer(x_b.clone(), y_b, x_f, y_f)
    lam = torch.as_tensor(mixer.last.lam, dtype=torch.float64).expand(num).tolist()

    rows = [x_f, x_b, x_m]
    labels = [
        [(names[c], f'n={counts[c]}') for c in y_f.tolist()],
        [(names[c], f'n={counts[c]}') for c in y_b.tolist()],
        [(f'lam={lam[i]:.2f}', f'{names[b]}/{names[f]}') for i, (b, f) in enumerate(zip(y_b.tolist(), y_f.tolist()))],
    ]
    canvas = Image.new('RGB', grid_size(num, (img_h, img_w), scale), BG_COLOUR)
    draw = ImageDraw.Draw(canvas)
    font = _load_font()
    nearest = getattr(Image, 'Resampling', Image).NEAREST
    boxes = []
    for row, (x, row_labels) in enumerate(zip(rows, labels)):
        row_boxes = []
        for col in range(num):
            left, top, right, bottom = cell_box(row, col, (img_h, img_w), scale)
            arr = x[col].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr).resize((right - left, bottom - top), nearest), (left, top))
            for k, line in enumerate(row_labels[col][:LABEL_LINES]):
                draw.text((left, bottom + 1 + k * LINE_H), _fit(draw, line, font, right - left), fill=TEXT_COLOUR, font=font)
            row_boxes.append([left, top, right, bottom])
        boxes.append(row_boxes)
        _, top, _, bottom = row_boxes[0]
        title_top = top + (bottom - top) // 2 - LINE_H
        for k, line in enumerate(ROW_TITLES[row]):
            draw.text((MARGIN, title_top + k * LINE_H), _fit(draw, line, font, TITLE_W - GAP), fill=TEXT_COLOUR, font=font)

    layout: Dict[str, Any] = dict(
        num=num, scale=scale, img_size=[img_h, img_w], r=r, seed=seed, mode=mode,
        tail_classes=tail, foreground=fg_idx, background=bg_idx, lam=lam,
        foreground_classes=y_f.tolist(), background_classes=y_b.tolist(), boxes=boxes,
        rows=[' '.join(t) for t in ROW_TITLES],
    )
    canvas.info[INFO_KEY] = json.dumps(layout)
    if out is not None:
        save_png(canvas, out)
    return canvas


def save_png(image: Image.Image, path: str) -> str:
    """Write ``image`` as PNG to ``path`` atomically (:func:`~timm_cmo.files.atomic_write`), with its layout text."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    info = PngInfo()
    if INFO_KEY in image.info:
        info.add_text(INFO_KEY, image.info[INFO_KEY])
    with atomic_write(path, 'wb') as f:
        image.save(f, format='PNG', pnginfo=info)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m timm_cmo.preview',
        description='Write a PNG grid of CMO samples: minority foregrounds (Q), majority backgrounds (P) '
                    'and the CMO results, like Figure 2 of the paper.')
    p.add_argument('--data-dir', required=True,
                   help='Data root: a folder with train/test sub-folders or train.tar/test.tar, a .tar of '
                        'class folders, or the torchvision CIFAR root with --dataset torch/cifar10')
    p.add_argument('--dataset', default='', help="Dataset name for create_lt_dataset ('' = folder/tar, torch/cifar10, ...)")
    p.add_argument('--split', default='train', help='Split to show (only train is made long-tailed)')
    p.add_argument('--list-file', default=None, help='List file (ImageNet-LT / iNaturalist format)')
    p.add_argument('--imb-ratio', type=float, default=100., help='Imbalance ratio rho; 0 keeps the source as it is')
    p.add_argument('--imb-max', type=int, default=None, help='Cap on the largest class')
    p.add_argument('--imb-seed', type=int, default=0, help='Seed of the long-tailed subset')
    p.add_argument('--cmo-r', type=float, default=1., help='Foreground weight exponent r (n_k^-r)')
    p.add_argument('--cmo-beta', type=float, default=1., help='lambda ~ Beta(beta, beta)')
    p.add_argument('--mode', choices=('elem', 'batch'), default='elem',
                   help='elem: a box per column; batch: one box for the row, as in one training batch')
    p.add_argument('--num', type=int, default=8, help='Images per row')
    p.add_argument('--seed', type=int, default=0, help='Seed of all draws')
    p.add_argument('--scale', type=int, default=4, help='Nearest-neighbour upscaling of each image')
    p.add_argument('--size', type=int, default=None, help='Resize images to SIZE x SIZE (default: their own size)')
    p.add_argument('--download', action='store_true', help='Let torchvision download CIFAR')
    p.add_argument('--out', default='cmo.png', help='Output PNG')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``timm-cmo-preview``): writes the PNG, prints its path, returns 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        dataset = create_lt_dataset(
            args.dataset, args.data_dir, split=args.split,
            imb_ratio=args.imb_ratio if args.imb_ratio and args.imb_ratio > 0 else None,
            imb_max=args.imb_max, imb_seed=args.imb_seed, list_file=args.list_file, download=args.download)
    except (OSError, ValueError) as e:  # a missing folder or list file, a bad list line, an empty class
        parser.error(f'--data-dir {args.data_dir}: {e}')
    make_preview(dataset, num=args.num, r=args.cmo_r, seed=args.seed, scale=args.scale, out=args.out,
                 size=args.size, mode=args.mode, beta=args.cmo_beta)
    print(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
