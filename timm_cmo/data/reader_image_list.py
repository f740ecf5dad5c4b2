""" Reader for list files in the ImageNet-LT / iNaturalist-2018 format.

Each non-empty line holds a relative image path and an integer label separated by whitespace::

    train/n01440764/n01440764_10026.JPEG 0

Paths are resolved against a data root. The reader plugs into timm's ``ImageDataset``.
"""
import os
from typing import List, Optional, Tuple

from timm.data.readers.reader import Reader


class ListFileError(ValueError):
    """A list file line that cannot be used; the message names the file and line."""


def parse_list_file(
        list_file: str,
        root: str,
        check_files: bool = True,
) -> List[Tuple[str, int]]:
    """Parse ``path label`` lines into ``(absolute path, label)`` pairs.

    Args:
        list_file: Path of the list file.
        root: Folder the image paths are relative to.
        check_files: Check that every image exists.

    Raises:
        ListFileError: A malformed line, a non-integer or negative label, a missing image or an
            empty list; the message gives ``file:line``.
    """
    samples = []
    with open(list_file, 'r', encoding='utf-8') as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            where = f'{list_file}:{line_no}'
            if len(parts) != 2:
                raise ListFileError(f'{where}: expected "<relative/path> <int label>", got {line!r}')
            path, label_str = parts
            try:
                label = int(label_str)
            except ValueError:
                raise ListFileError(f'{where}: label {label_str!r} is not an integer') from None
            if label < 0:
                raise ListFileError(f'{where}: label {label} is negative')
            full_path = os.path.join(root, path)
            if check_files and not os.path.isfile(full_path):
                raise ListFileError(f'{where}: image {full_path!r} does not exist')
            samples.append((full_path, label))
    if not samples:
        raise ListFileError(f'{list_file}: the list holds no samples')
    return samples


class ReaderImageList(Reader):
    """timm reader over a list file of ``relative/path.jpg label`` lines.

    Args:
        root: Folder the image paths are relative to.
        list_file: The list file.
        check_files: Check at construction that every listed image exists.
        num_classes: Number of classes; defaults to the largest label + 1.
    """

    def __init__(self, root: str, list_file: str, check_files: bool = True, num_classes: Optional[int] = None):
        super().__init__()
        self.root = root
        self.list_file = list_file
        self.samples = parse_list_file(list_file, root, check_files=check_files)
        self.targets = [t for _, t in self.samples]
        max_label = max(self.targets)
        if num_classes is not None and max_label >= num_classes:
            raise ListFileError(f'{list_file}: label {max_label} is out of range for num_classes={num_classes}')
        self.num_classes = num_classes if num_classes is not None else max_label + 1

    def __getitem__(self, index):
        path, target = self.samples[index]
        return open(path, 'rb'), target

    def __len__(self):
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        filename = self.samples[index][0]
        if basename:
            filename = os.path.basename(filename)
        elif not absolute:
            filename = os.path.relpath(filename, self.root)
        return filename
