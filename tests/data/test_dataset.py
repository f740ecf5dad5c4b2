"""Long-tailed datasets: the paper's profile and subset, every source, bad input."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torchvision
from timm.data import create_loader

from timm_cmo.data import (
    ListFileError, LongTailDataset, create_lt_dataset, long_tail_counts, shot_groups,
)

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_profile_rho100():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == CIFAR10_LT_100
    assert sum(counts) == 12406


@pytest.mark.parametrize('n_max,num_classes,rho,total', [
    # totals published for CIFAR-10-LT / CIFAR-100-LT
    (5000, 10, 50, 13996), (5000, 10, 10, 20431), (500, 100, 100, 10847), (500, 100, 50, 12608),
    (500, 100, 10, 19573),
])
def test_published_lt_totals(n_max, num_classes, rho, total):
    counts = long_tail_counts(n_max, num_classes, rho)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == int(n_max / rho)


def test_mini_profile_with_cap():
    assert long_tail_counts(1000, 10, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]


def test_tar_source_long_tailed(cifar10_dir):
    ds = create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=100, imb_seed=0)
    assert isinstance(ds, LongTailDataset)
    assert ds.class_counts.tolist() == CIFAR10_LT_100
    assert len(ds) == 12406 == len(ds.targets)
    assert ds.classes[:3] == ['airplane', 'automobile', 'bird']
    # the kept labels agree with the labels of the images actually read
    for i in (0, 5000, 12405):
        img, target = ds[i]
        assert target == ds.targets[i]
        assert img.size == (32, 32)


def test_subset_is_the_papers_choice(cifar10_train_full):
    """Reproduce the paper's selection: np.random.seed(0), then per class shuffle and keep the first n."""
    targets = np.asarray(cifar10_train_full.targets)
    np.random.seed(0)
    expected = []
    for c, n in enumerate(CIFAR10_LT_100):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:n].tolist())
    root = cifar10_train_full.dataset.reader.root
    ds = create_lt_dataset('', root, imb_ratio=100, imb_seed=0)
    assert ds.indices.tolist() == expected


def test_subset_seeded(cifar10_dir):
    root = str(cifar10_dir / 'train.tar')
    a = create_lt_dataset('', root, imb_ratio=50, imb_seed=3)
    b = create_lt_dataset('', root, imb_ratio=50, imb_seed=3)
    c = create_lt_dataset('', root, imb_ratio=50, imb_seed=4)
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(np.sort(a.indices), np.sort(c.indices))
    assert np.array_equal(a.class_counts, c.class_counts)


def test_split_folder_and_test_split_not_subsampled(cifar10_dir):
    test = create_lt_dataset('', str(cifar10_dir), split='test', imb_ratio=100)
    assert len(test) == 10000
    assert test.class_counts.tolist() == [1000] * 10
    train = create_lt_dataset('', str(cifar10_dir), split='train', imb_ratio=100, imb_max=1000)
    assert train.class_counts.tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]


def test_transform_is_settable_by_timm_loader(cifar10_dir):
    ds = create_lt_dataset('', str(cifar10_dir / 'test.tar'))
    loader = create_loader(ds, (3, 32, 32), batch_size=4, use_prefetcher=False, num_workers=0)
    assert ds.dataset.transform is ds.transform is not None
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == ds.targets[:4].tolist()


def test_shot_groups_boundaries():
    groups = shot_groups([101, 100, 50, 20, 19, 1])
    assert groups.many == [0]
    assert groups.medium == [1, 2, 3]
    assert groups.few == [4, 5]
    groups = shot_groups(CIFAR10_LT_100)
    assert groups.many == list(range(8)) and groups.medium == [8, 9] and groups.few == []


# --- list files -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def image_root(tmp_path_factory, cifar10_dir):
    """A few real CIFAR-10 JPEGs unpacked into a folder, with an ImageNet-LT style list."""
    root = tmp_path_factory.mktemp('lt_root')
    lines = []
    with tarfile.open(cifar10_dir / 'test.tar') as tf:
        for cls, label in (('airplane', 0), ('cat', 3), ('truck', 9)):
            for k in range(3 if label == 0 else 1):
                name = f'./{cls}/{k:04d}.jpg'
                data = tf.extractfile(name).read()
                rel = f'train/{cls}/{k:04d}.jpg'
                os.makedirs(root / 'train' / cls, exist_ok=True)
                (root / rel).write_bytes(data)
                lines.append(f'{rel} {label}')
    (root / 'LT_train.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_list_file_source(image_root):
    ds = create_lt_dataset('', str(image_root), list_file='LT_train.txt')
    assert len(ds) == 5
    assert ds.num_classes == 10
    assert ds.class_counts.tolist() == [3, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    img, target = ds[3]
    assert target == 3 and img.size == (32, 32)
    # imbalance applies to list sources too
    lt = create_lt_dataset('', str(image_root), list_file=str(image_root / 'LT_train.txt'), imb_ratio=3)
    assert lt.class_counts[0] == 3


@pytest.mark.parametrize('line,message', [
    ('train/airplane/0000.jpg', 'expected'),
    ('train/airplane/0000.jpg zero', "'zero' is not an integer"),
    ('train/airplane/0000.jpg -2', 'label -2 is negative'),
    ('train/airplane/9999.jpg 0', 'does not exist'),
])
def test_list_file_errors_name_file_and_line(image_root, tmp_path, line, message):
    bad = tmp_path / 'bad.txt'
    bad.write_text('train/airplane/0001.jpg 0\n\n' + line + '\n')
    with pytest.raises(ListFileError, match=message) as err:
        create_lt_dataset('', str(image_root), list_file=str(bad))
    assert f'{bad}:3' in str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_and_bad_ratio(image_root, tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n')
    with pytest.raises(ValueError, match='no samples'):
        create_lt_dataset('', str(image_root), list_file=str(empty))
    with pytest.raises(ValueError, match='imb_ratio must be >= 1.*0.5'):
        create_lt_dataset('', str(image_root), list_file='LT_train.txt', imb_ratio=0.5)
    with pytest.raises(ValueError, match='0.5'):
        long_tail_counts(100, 10, 0.5)
    with pytest.raises(ValueError, match='empty'):
        LongTailDataset(create_lt_dataset('', str(image_root), list_file='LT_train.txt').dataset, indices=[])


def _class_folders(root, classes, per_class, cifar10_dir):
    """Real CIFAR-10 JPEGs under root/<name>/ for each (name, CIFAR-10 class) pair."""
    with tarfile.open(cifar10_dir / 'test.tar') as tf:
        for name, cls in classes:
            os.makedirs(root / name, exist_ok=True)
            for k in range(per_class):
                (root / name / f'{k:04d}.jpg').write_bytes(tf.extractfile(f'./{cls}/{k:04d}.jpg').read())


def test_missing_split_is_an_error_not_the_root(tmp_path, cifar10_dir, caplog):
    """A folder with train/ but no evaluation split must not evaluate on root (the training images)."""
    _class_folders(tmp_path / 'train', [('airplane', 'airplane'), ('cat', 'cat')], 2, cifar10_dir)
    assert len(create_lt_dataset('', str(tmp_path), split='train')) == 4
    with pytest.raises(FileNotFoundError, match=r"holds per-split data \(train\) but no 'validation' split"):
        create_lt_dataset('', str(tmp_path), split='validation')
    # the training split is never read from an evaluation folder, whatever --train-split is called
    _class_folders(tmp_path / 'only_test' / 'test', [('airplane', 'airplane')], 2, cifar10_dir)
    for split in ('train', 'trn'):
        with pytest.raises(FileNotFoundError, match=rf"holds per-split data \(test\) but no '{split}' split"):
            create_lt_dataset('', str(tmp_path / 'only_test'), split=split, is_train=True)
    with caplog.at_level('INFO'):
        assert len(create_lt_dataset('', str(tmp_path), split='trn', is_train=True, imb_ratio=2)) == 3
    assert f"No 'trn' split under {str(tmp_path)!r}: reading {str(tmp_path / 'train')!r}" in caplog.text
    # a plain folder of class folders: both splits read it, and evaluating on it says so
    create_lt_dataset('', str(tmp_path / 'train'), split='validation')
    assert 'reads the same images as training' in caplog.text


def test_class_named_like_a_split_is_not_a_split(tmp_path, cifar10_dir):
    """CIFAR-100 has a class called 'train': in a plain class-folder tree it stays a class."""
    _class_folders(tmp_path, [('airplane', 'airplane'), ('train', 'truck'), ('test', 'ship')], 3, cifar10_dir)
    ds = create_lt_dataset('', str(tmp_path), split='train')
    assert ds.classes == ['airplane', 'test', 'train'] and ds.class_counts.tolist() == [3, 3, 3]


def test_profile_that_empties_classes_is_refused(cifar10_dir):
    """rho 100 over 10 classes keeps n_max / 100 in the last class: n_max 20 would leave classes 6-9 empty."""
    assert long_tail_counts(20, 10, 100) == [20, 11, 7, 4, 2, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r'classes \[6, 7, 8, 9\] without images.*imb_max 20.*needs at least 100'):
        create_lt_dataset('', str(cifar10_dir), split='train', imb_ratio=100, imb_max=20)
    assert min(long_tail_counts(100, 10, 100)) == 1 and min(long_tail_counts(99, 10, 100)) == 0


# --- torchvision CIFAR (download code path, offline) ----------------------------------------

def _write_fake_cifar10_archive(path, n_train=250, n_test=50, seed=0):
    """A cifar-10-python.tar.gz in torchvision's format, with random images."""
    rng = np.random.default_rng(seed)

    def batch(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        return {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': labels.tolist()}

    files = {f'data_batch_{i}': batch(n_train // 5) for i in range(1, 6)}
    files['test_batch'] = batch(n_test)
    files['batches.meta'] = {'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                             'horse', 'ship', 'truck']}
    with tarfile.open(path, 'w:gz') as tf:
        for name, obj in files.items():
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_torch_cifar10_download_path_offline(tmp_path, monkeypatch):
    archive = tmp_path / 'local-cifar-10-python.tar.gz'
    _write_fake_cifar10_archive(archive)
    calls = []

    def fake_download_and_extract(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename))
        with tarfile.open(archive) as tf:
            tf.extractall(download_root, filter='data')

    # torchvision's real CIFAR code runs; only the network fetch and the md5 check against the real files' sums
    # are replaced (the fake archive's files have other checksums)
    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', fake_download_and_extract)
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda fpath, md5=None: os.path.isfile(fpath))
    root = str(tmp_path / 'data')
    ds = create_lt_dataset('torch/cifar10', root, split='train', imb_ratio=5, download=True)
    assert calls and calls[0][0].startswith('https://www.cs.toronto.edu/') and calls[0][1] == 'cifar-10-python.tar.gz'
    assert ds.num_classes == 10 and ds.classes[0] == 'airplane'
    assert ds.class_counts.tolist() == long_tail_counts(25, 10, 5)
    img, target = ds[0]
    assert img.size == (32, 32) and target == ds.targets[0]
    test = create_lt_dataset('torch/cifar10', root, split='test', imb_ratio=5)
    assert len(test) == 50
    assert len(calls) == 1  # already there: no second download

    # one channel: torchvision's CIFAR yields RGB, so the view converts in front of whatever transform is set
    gray = create_lt_dataset('torch/cifar10', root, split='train', imb_ratio=5, input_img_mode='L')
    assert gray[0][0].mode == 'L' and gray[0][0].tobytes() == img.convert('L').tobytes()
    to_tensor = torchvision.transforms.PILToTensor()
    gray.transform = to_tensor
    assert gray.transform is to_tensor  # the view reports the transform it was given
    assert torch.equal(gray[0][0], to_tensor(img.convert('L')))


def test_torch_cifar10_missing_copy_is_named(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', offline)
    root = str(tmp_path / 'none')
    with pytest.raises(FileNotFoundError, match=r"torch/cifar10: no copy under .*none' and downloading is off"):
        create_lt_dataset('torch/cifar10', root, imb_ratio=5)
    with pytest.raises(FileNotFoundError, match=r"torch/cifar10: no copy under .*none' and the download failed.*no net"):
        create_lt_dataset('torch/cifar10', root, imb_ratio=5, download=True)


def test_folder_source_in_one_channel(cifar10_dir):
    rgb = create_lt_dataset('', str(cifar10_dir / 'test.tar'))
    gray = create_lt_dataset('', str(cifar10_dir / 'test.tar'), input_img_mode='L')
    for i in (0, len(gray) - 1):
        assert gray[i][0].mode == 'L' and gray[i][1] == rgb[i][1]
        assert gray[i][0].tobytes() == rgb[i][0].convert('L').tobytes()
