""" Long-tailed datasets.

``create_lt_dataset`` builds any source the paper uses (torchvision CIFAR, an image folder or tar
of class folders, a list file) through timm's dataset factory and readers, optionally makes the
training split long-tailed with the paper's exponential profile, and returns a
:class:`LongTailDataset` exposing ``targets`` and ``class_counts``.
"""
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch.utils.data
from PIL import Image
from timm.data import ImageDataset, create_dataset

from .decode import read_image, resolve_fast_decode
from .reader_image_list import ReaderImageList

_logger = logging.getLogger(__name__)

_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLIT_FILES = ('test', 'val', 'validation', 'eval', 'evaluation', 'valid')


def long_tail_counts(n_max: int, num_classes: int, imb_ratio: float) -> List[int]:
    """Per-class image counts of the exponential long-tail profile used by the paper's code.

    Class ``i`` keeps ``int(n_max * (1 / imb_ratio) ** (i / (num_classes - 1)))`` images, so the
    first class keeps ``n_max`` and the last ``n_max / imb_ratio``.

    Args:
        n_max: Images of the largest (first) class.
        num_classes: Number of classes C.
        imb_ratio: Imbalance ratio rho = n_max / n_min, >= 1.
    """
    if not imb_ratio >= 1:
        raise ValueError(f'imb_ratio must be >= 1 (rho = n_max / n_min), got {imb_ratio}')
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if num_classes == 1:
        return [int(n_max)]
    imb_factor = 1. / imb_ratio
    return [int(n_max * (imb_factor ** (i / (num_classes - 1.)))) for i in range(num_classes)]


def long_tail_indices(
        targets: Sequence[int],
        counts: Sequence[int],
        seed: int = 0,
) -> np.ndarray:
    """Indices of a seeded long-tailed subset, chosen as the paper's code does.

    For each class in index order the class's sample indices are shuffled with a
    ``numpy.random.RandomState(seed)`` (the same stream as ``np.random.seed(seed)`` followed by
    ``np.random.shuffle``) and the first ``counts[c]`` are kept (fewer if the class has fewer).
    The result is grouped by class, in the paper's order.
    """
    targets = np.asarray(targets)
    rs = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        if len(idx) == 0:
            continue
        rs.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


class CorruptImageError(ValueError):
    """An image of the dataset cannot be decoded; the message names the file."""


class ShotGroups(NamedTuple):
    """Class indices of the many / medium / few shot groups."""
    many: List[int]
    medium: List[int]
    few: List[int]


def shot_groups(class_counts: Sequence[int], many: int = 100, few: int = 20) -> ShotGroups:
    """Split classes by training images: many (> ``many``), medium (``few``..``many``), few (< ``few``).

    The defaults are the groups of every long-tail results table (>100, 20-100, <20).
    """
    counts = [int(n) for n in class_counts]
    return ShotGroups(
        many=[c for c, n in enumerate(counts) if n > many],
        medium=[c for c, n in enumerate(counts) if few <= n <= many],
        few=[c for c, n in enumerate(counts) if n < few],
    )


def dataset_targets(dataset: Any) -> np.ndarray:
    """Per-sample integer labels of a torchvision, timm or :class:`LongTailDataset` dataset."""
    targets = getattr(dataset, 'targets', None)
    if targets is None:
        reader = getattr(dataset, 'reader', None)
        targets = getattr(reader, 'targets', None)
        if targets is None and hasattr(reader, 'samples'):
            targets = [t for _, t in reader.samples]
    if targets is None:
        raise TypeError(
            f'Cannot read per-sample labels from a {type(dataset).__name__}: it needs a `targets` attribute '
            f'or a timm reader with `targets`/`samples`.')
    return np.asarray(targets, dtype=np.int64)


def dataset_class_names(dataset: Any) -> Optional[List[str]]:
    """Class names in index order, where the source knows them."""
    names = getattr(dataset, 'classes', None)
    if names is not None:
        return list(names)
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None)
    if mapping:
        return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    return None


class ConvertMode:
    """PIL image -> the same image in ``mode`` (``'L'``, ``'RGB'``, ...), then ``transform`` if given.

    Put in front of a source's own transform (torchvision's CIFAR yields RGB only) to decode to ``mode``.
    """

    def __init__(self, mode: str, transform: Optional[Any] = None):
        self.mode = mode
        self.transform = transform

    def __call__(self, img: Image.Image) -> Any:
        if img.mode != self.mode:
            img = img.convert(self.mode)
        return img if self.transform is None else self.transform(img)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mode={self.mode!r}, transform={self.transform!r})'


def _with_mode(transform: Optional[Any], mode: Optional[str]) -> Optional[Any]:
    """``transform`` behind a :class:`ConvertMode` to ``mode``; as is when ``mode`` is None."""
    return transform if mode is None else ConvertMode(mode, transform)


class LongTailDataset(torch.utils.data.Dataset):
    """A view of a dataset restricted to ``indices``, exposing labels and class counts.

    ``transform`` and ``target_transform`` read and write the wrapped dataset's, so timm's
    ``create_loader`` (which sets ``dataset.transform``) works on it, unlike on a
    ``torch.utils.data.Subset``. An image that cannot be decoded raises :class:`CorruptImageError`
    naming the file (timm's ``ImageDataset`` would silently substitute the next file of the source,
    which may not belong to this split).

    Args:
        dataset: A map-style dataset returning ``(image, target)``.
        indices: The kept sample indices; all samples when None.
        num_classes: Number of classes; defaults to the source's class count or max label + 1.
        classes: Class names in index order.
        input_img_mode: PIL mode the images are decoded to (``'RGB'``, ``'L'`` for one channel);
            None keeps the source's. It applies to every view of the same source.
        fast_decode: Decode plain JPEGs of a timm reader source with simplejpeg (Pillow's pixels,
            faster; see :mod:`timm_cmo.data.decode`); None: when simplejpeg is installed.
    """

    def __init__(
            self,
            dataset: torch.utils.data.Dataset,
            indices: Optional[Sequence[int]] = None,
            num_classes: Optional[int] = None,
            classes: Optional[List[str]] = None,
            input_img_mode: Optional[str] = None,
            fast_decode: Optional[bool] = None,
    ):
        all_targets = dataset_targets(dataset)
        self.fast_decode = resolve_fast_decode(fast_decode)
        self.dataset = dataset
        self.indices = np.arange(len(all_targets)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError(f'The dataset is empty (source {type(dataset).__name__} with {len(all_targets)} samples)')
        self.targets = all_targets[self.indices]
        if self.targets.min() < 0:
            raise ValueError(f'Negative label {int(self.targets.min())} in the dataset')
        classes = classes if classes is not None else dataset_class_names(dataset)
        if num_classes is None:
            num_classes = len(classes) if classes else int(all_targets.max()) + 1
        if int(self.targets.max()) >= num_classes:
            raise ValueError(f'Label {int(self.targets.max())} is out of range for num_classes={num_classes}')
        self.num_classes = num_classes
        self.classes = classes if classes else [str(c) for c in range(num_classes)]
        self.class_counts = np.bincount(self.targets, minlength=num_classes)
        if input_img_mode is not None:
            self.input_img_mode = input_img_mode

    @property
    def input_img_mode(self) -> Optional[str]:
        """PIL mode the images are decoded to (None: the source's own)."""
        if isinstance(self.dataset, ImageDataset):
            return self.dataset.input_img_mode
        transform = self.dataset.transform
        return transform.mode if isinstance(transform, ConvertMode) else None

    @input_img_mode.setter
    def input_img_mode(self, mode: Optional[str]):
        if isinstance(self.dataset, ImageDataset):
            self.dataset.input_img_mode = mode  # timm's reader path decodes to it
        else:  # in front of the source's transform, which then sees images in ``mode``
            self.dataset.transform = _with_mode(self.transform, mode)

    @property
    def transform(self):
        transform = self.dataset.transform
        return transform.transform if isinstance(transform, ConvertMode) else transform

    @transform.setter
    def transform(self, transform):
        mode = None if isinstance(self.dataset, ImageDataset) else self.input_img_mode
        self.dataset.transform = _with_mode(transform, mode)

    @property
    def target_transform(self):
        return getattr(self.dataset, 'target_transform', None)

    @target_transform.setter
    def target_transform(self, target_transform):
        self.dataset.target_transform = target_transform

    def __getitem__(self, index: int):
        i = int(self.indices[index])
        if not isinstance(self.dataset, ImageDataset) or self.dataset.load_bytes:
            return self.dataset[i]
        # timm's ImageDataset would replace an unreadable image by the next file of the source, which may be
        # outside this split (or of another class): read it here and stop, naming the file, instead
        base = self.dataset
        img, target, *_ = base.reader[i]
        try:
            img = read_image(img, base.input_img_mode, fast=self.fast_decode)  # a mode decodes the pixels
        except (OSError, SyntaxError, ValueError) as e:
            raise CorruptImageError(
                f'cannot read image {base.filename(i)} (sample {index} of this split): {type(e).__name__}: {e}. '
                f'Remove or replace the file (or drop it from the list file) and start again.') from None
        if base.transform is not None:
            img = base.transform(img)
        if target is None:
            target = -1
        elif base.target_transform is not None:
            target = base.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.indices)

    def filename(self, index: int, basename: bool = False, absolute: bool = False):
        return self.dataset.filename(int(self.indices[index]), basename=basename, absolute=absolute)

    def __repr__(self):
        return (f'{type(self).__name__}({type(self.dataset).__name__}, samples={len(self)}, '
                f'classes={self.num_classes}, max={int(self.class_counts.max())}, '
                f'min={int(self.class_counts.min())})')


def _split_paths(root: str, names: Sequence[str]) -> List[str]:
    """``root/<name>.tar`` files and ``root/<name>`` folders of class folders that exist, in the order of
    ``names``. A folder of images is a class, not a split: CIFAR-100 has a class named ``train``."""
    def is_split(path: str) -> bool:
        if path.endswith('.tar'):
            return os.path.isfile(path)
        if not os.path.isdir(path):
            return False
        with os.scandir(path) as entries:
            return any(e.is_dir() for e in entries)
    return [p for n in names for p in (os.path.join(root, n), os.path.join(root, n + '.tar')) if is_split(p)]


def _resolve_root(root: str, split: str, is_train: bool) -> str:
    """Pick ``root/<split>`` or ``root/<split>.tar`` when root is a folder holding per-split data; root itself
    when it holds none (a plain folder of class folders). A folder holding other splits but not this one is an
    error: reading root would silently mix the splits (e.g. evaluate on the training images)."""
    if not os.path.isdir(root):
        return root
    found = _split_paths(root, (split,) + (_TRAIN_SPLITS if is_train else _EVAL_SPLIT_FILES))
    if found:
        if os.path.basename(found[0]) not in (split, split + '.tar'):
            _logger.info(f'No {split!r} split under {root!r}: reading {found[0]!r} for it.')
        return found[0]
    others = _split_paths(root, _TRAIN_SPLITS + _EVAL_SPLIT_FILES)
    if others:
        raise FileNotFoundError(
            f'{root!r} holds per-split data ({", ".join(os.path.basename(p) for p in others)}) but no {split!r} '
            f'split; name the folder with the split argument (--train-split / --val-split) or give a list file')
    return root


def create_lt_dataset(
        name: str,
        root: str,
        split: str = 'train',
        imb_ratio: Optional[float] = None,
        imb_seed: int = 0,
        list_file: Optional[str] = None,
        download: bool = False,
        imb_max: Optional[int] = None,
        input_img_mode: Optional[str] = None,
        is_train: Optional[bool] = None,
        fast_decode: Optional[bool] = None,
        **kwargs: Any,
) -> LongTailDataset:
    """Create a (long-tailed) dataset, in the spirit of timm's ``create_dataset``.

    Sources:
        * ``'torch/cifar10'``, ``'torch/cifar100'``: torchvision CIFAR under ``root``
          (downloaded when ``download=True``).
        * ``''`` (or a timm reader name): an image folder or a ``.tar`` of class folders through
          timm's readers. A folder holding ``train``/``test`` sub-folders or ``train.tar``/``test.tar``
          resolves to the one for ``split``.
        * ``list_file`` given: ``relative/path.jpg <label>`` lines (ImageNet-LT / iNaturalist 2018
          format), paths relative to ``root``. A relative ``list_file`` that does not exist as
          given is looked up under ``root``.

    Args:
        name: Dataset name as above.
        root: Data root folder (or tar file).
        split: ``'train'`` or an evaluation split; only the training split is made long-tailed.
        imb_ratio: Imbalance ratio rho = n_max / n_min; None keeps the source as it is.
        imb_seed: Seed of the per-class random choice of kept images.
        list_file: List file, see above.
        download: Let torchvision download CIFAR when it is missing.
        imb_max: Cap on the largest class (n_max = min(largest source class, imb_max)).
        input_img_mode: PIL mode images are decoded to (``'L'``: one channel); None: the source's (RGB).
        is_train: Whether ``split`` is the training split (made long-tailed; a missing folder of that name
            is looked for as ``train``/``training``, never as an evaluation split). None: ``split`` is
            ``'train'`` or ``'training'``.
        fast_decode: Decode plain JPEGs with simplejpeg (identical pixels); None: when it is installed.
        **kwargs: Passed to timm's ``create_dataset`` (e.g. ``class_map``); ``num_classes`` and
            ``check_files`` apply to list files.

    Returns:
        A :class:`LongTailDataset` with ``targets``, ``class_counts``, ``classes``, ``num_classes``.
    """
    if imb_ratio is not None and not imb_ratio >= 1:
        raise ValueError(f'imb_ratio must be >= 1 (rho = n_max / n_min), got {imb_ratio}')
    if imb_max is not None and imb_max < 1:
        raise ValueError(f'imb_max must be >= 1, got {imb_max}')
    num_classes = kwargs.pop('num_classes', None)
    check_files = kwargs.pop('check_files', True)
    is_train = split in _TRAIN_SPLITS if is_train is None else is_train

    if list_file is not None:
        if not os.path.exists(list_file) and not os.path.isabs(list_file):
            list_file = os.path.join(root, list_file)
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f'List file {list_file!r} does not exist')
        reader = ReaderImageList(root, list_file, check_files=check_files, num_classes=num_classes)
        base = ImageDataset(root, reader=reader, **kwargs)
        num_classes = reader.num_classes
    elif name.lower().startswith('torch/'):
        try:
            base = create_dataset(name, root=root, split='train' if is_train else split, download=download, **kwargs)
        except (OSError, RuntimeError) as e:  # torchvision: not found (RuntimeError) or the download failed
            how = 'the download failed' if download else 'downloading is off (--dataset-download)'
            raise FileNotFoundError(f'{name}: no copy under {root!r} and {how}: {e}') from None
    else:
        if not os.path.exists(root):
            raise FileNotFoundError(f'Dataset root {root!r} does not exist')
        split_root = _resolve_root(root, split, is_train)
        if not is_train and os.path.isdir(root) and split_root == root:
            _logger.warning(f'{root!r} has no per-split folders: the {split!r} split reads the same images as '
                            f'training would.')
        base = create_dataset(name, root=split_root, split=split, search_split=False, **kwargs)

    full = LongTailDataset(base, num_classes=num_classes, input_img_mode=input_img_mode, fast_decode=fast_decode)
    if imb_ratio is None and imb_max is None:
        return full
    if not is_train:
        _logger.info(f'Split {split!r} is an evaluation split: it is not made long-tailed.')
        return full

    n_max = int(full.class_counts.max())
    if imb_max is not None:
        n_max = min(n_max, int(imb_max))
    rho = imb_ratio if imb_ratio is not None else 1.
    counts = long_tail_counts(n_max, full.num_classes, rho)
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        need = next(n for n in range(int(rho), int(rho) + 3) if long_tail_counts(n, full.num_classes, rho)[-1] > 0)
        raise ValueError(
            f'the long-tail profile leaves classes {empty} without images: the largest class keeps {n_max} '
            f'(imb_max {imb_max}, largest source class {int(full.class_counts.max())}) and imb_ratio {rho:g} '
            f'needs at least {need}')
    indices = long_tail_indices(full.targets, counts, seed=imb_seed)
    dataset = LongTailDataset(base, indices=full.indices[indices], num_classes=full.num_classes, classes=full.classes,
                              input_img_mode=input_img_mode, fast_decode=fast_decode)
    short = [c for c, (want, have) in enumerate(zip(counts, dataset.class_counts)) if have < want]
    if short:
        _logger.warning(f'Classes {short} have fewer source images than the long-tail profile asks for.')
    _logger.info(f'Long-tailed {split} set: {len(dataset)} images, class counts {dataset.class_counts.tolist()}')
    return dataset


def describe_counts(class_counts: Sequence[int]) -> Dict[str, Any]:
    """Summary of a class-count vector: total, classes, max, min and imbalance ratio."""
    counts = np.asarray(class_counts)
    nonzero = counts[counts > 0]
    return dict(
        images=int(counts.sum()), classes=len(counts), max=int(counts.max()), min=int(counts.min()),
        imb_ratio=float(nonzero.max() / nonzero.min()) if len(nonzero) else float('nan'),
    )
