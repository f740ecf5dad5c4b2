"""simplejpeg decoding: Pillow's pixels bit for bit on plain JPEGs, Pillow itself for everything else, through
the dataset and the CMO loader (timm's transform, the same seeds: the same tensors)."""
import io
import random
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from timm.data import ImageDataset, create_transform

from timm_cmo.data import LongTailDataset, create_cmo_loader, create_lt_dataset, decode
from timm_cmo.data.decode import is_plain_jpeg, read_image, resolve_fast_decode

needs_simplejpeg = pytest.mark.skipif(decode.simplejpeg is None, reason='simplejpeg is not installed (pip install simplejpeg)')
CPU = torch.device('cpu')


def photo(w, h, seed=0):
    """A photo-like RGB image: smooth colour gradients plus grain (pure noise would hide upsampling errors)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8))


def jpeg(img, **kw):
    buf = io.BytesIO()
    old, ImageFile.MAXBLOCK = ImageFile.MAXBLOCK, 1 << 24  # progressive / optimised saves of big images need the room
    try:
        img.save(buf, 'JPEG', **{'quality': 90, **kw})
    finally:
        ImageFile.MAXBLOCK = old
    return buf.getvalue()


def pillow(data, mode='RGB'):
    img = Image.open(io.BytesIO(data))
    return img.convert(mode) if mode else img


def same(a, b):
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def spy(monkeypatch):
    """Counts simplejpeg decodes."""
    calls = []
    if decode.simplejpeg is not None:
        real = decode.simplejpeg.decode_jpeg
        monkeypatch.setattr(decode.simplejpeg, 'decode_jpeg', lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@needs_simplejpeg
@pytest.mark.parametrize('subsampling', [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize('size', [(500, 375), (375, 500), (33, 17), (1, 1), (17, 250)])
def test_plain_jpegs_decode_to_pillows_pixels(subsampling, size, spy):
    for kw in ({}, {'quality': 100}, {'quality': 30}, {'optimize': True}, {'restart_marker_blocks': 1}):
        data = jpeg(photo(*size, seed=subsampling), subsampling=subsampling, **kw)
        assert is_plain_jpeg(data), kw
        for mode in ('RGB', 'L', None):
            assert same(read_image(data, mode), pillow(data, mode)), (kw, mode)
            assert same(read_image(io.BytesIO(data), mode), pillow(data, mode)), (kw, mode)
    assert len(spy) == 5 * 3 * 2


@needs_simplejpeg
def test_real_cifar10_jpegs_decode_to_pillows_pixels(cifar10_dir, spy):
    n = 0
    with tarfile.open(cifar10_dir / 'train.tar') as tf:
        for m in tf:
            if m.isfile() and m.name.endswith('.jpg'):
                data = tf.extractfile(m).read()
                assert same(read_image(data), pillow(data)), m.name
                n += 1
                if n == 3000:
                    break
    assert n == 3000 and len(spy) == n


def test_other_images_go_to_pillow(spy, monkeypatch):
    rgb = photo(64, 48)
    plain = jpeg(rgb)
    assert plain[2:4] == b'\xff\xe0' and plain[6:11] == b'JFIF\x00'
    adobe = b'\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00'  # APP14, transform 0: RGB-coded components
    app0_end = 4 + (plain[4] << 8 | plain[5])
    adobe_rgb = plain[:2] + adobe + plain[app0_end:]  # without the JFIF marker, which libjpeg lets decide first
    adobe_jfif = plain[:2] + adobe + plain[2:]  # JFIF wins: YCbCr, a plain JPEG
    assert is_plain_jpeg(adobe_jfif) and same(read_image(adobe_jfif), pillow(adobe_jfif))
    spy.clear()
    cases = {
        'progressive': jpeg(rgb, progressive=True),
        'grey': jpeg(rgb.convert('L')),
        'cmyk': jpeg(rgb.convert('CMYK')),
        'adobe_rgb': adobe_rgb,
        'png': (lambda b: (rgb.save(b, 'PNG'), b.getvalue())[1])(io.BytesIO()),
    }
    for name, data in cases.items():
        assert not is_plain_jpeg(data), name
        for mode in ('RGB', 'L'):
            assert same(read_image(data, mode), pillow(data, mode)), name
    assert spy == []
    assert not is_plain_jpeg(b'') and not is_plain_jpeg(b'\xff\xd8\xff\xd9')


@needs_simplejpeg
def test_corrupt_and_huge_files_behave_as_with_pillow(monkeypatch, spy):
    data = jpeg(photo(120, 90))
    truncated = data[:len(data) // 2]
    with pytest.raises(OSError) as ours:
        read_image(truncated)
    with pytest.raises(OSError) as theirs:
        pillow(truncated)
    assert str(ours.value) == str(theirs.value)
    assert len(spy) == 1  # simplejpeg refused it, Pillow decided
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 120 * 90 // 2 + 10)  # Pillow warns above this, errors above twice it
    with pytest.warns(Image.DecompressionBombWarning):
        img = read_image(data)
    with pytest.warns(Image.DecompressionBombWarning):
        assert same(img, pillow(data)) and len(spy) == 1  # Pillow decoded it, simplejpeg did not run


def test_without_simplejpeg_everything_is_pillow(monkeypatch):
    monkeypatch.setattr(decode, 'simplejpeg', None)
    data = jpeg(photo(40, 30))
    assert same(read_image(data), pillow(data))
    assert resolve_fast_decode(None) is False and resolve_fast_decode(False) is False
    with pytest.raises(ImportError, match='simplejpeg'):
        resolve_fast_decode(True)


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
    """3 classes of ImageNet-sized 4:2:0 JPEGs (one a progressive one, one grey) in class folders."""
    root = tmp_path_factory.mktemp('jpegs')
    for c, n in enumerate((6, 4, 2)):
        (root / f'c{c}').mkdir()
        for k in range(n):
            img = photo(*((500, 375) if k % 2 == 0 else (375, 500)), seed=10 * c + k)
            kw = dict(progressive=True) if (c, k) == (0, 1) else {}
            if (c, k) == (1, 1):
                img = img.convert('L')
            (root / f'c{c}' / f'{k}.jpg').write_bytes(jpeg(img, **kw))
    return root


@needs_simplejpeg
def test_dataset_with_timms_transform_gives_timms_tensors(jpeg_folder, spy):
    """The same seeds through timm's ImageDataset (Pillow) and the plugin's dataset (simplejpeg): the same crops
    (timm's RandomResizedCrop draws from the image size alone), flips and pixels, to the bit."""
    transform = create_transform(224, is_training=True, use_prefetcher=True, color_jitter=None)
    theirs = ImageDataset(str(jpeg_folder), transform=transform)
    ours = create_lt_dataset('', str(jpeg_folder))
    ours.transform = transform
    assert ours.fast_decode and len(ours) == len(theirs) == 12
    for rep in range(3):
        for i in range(len(ours)):
            random.seed(rep * 100 + i)
            torch.manual_seed(rep * 100 + i)
            x_ours, y_ours = ours[i]
            random.seed(rep * 100 + i)
            torch.manual_seed(rep * 100 + i)
            x_theirs, y_theirs = theirs[i]
            assert x_ours.dtype == torch.uint8 and x_ours.shape == (3, 224, 224)
            assert torch.equal(x_ours, x_theirs) and y_ours == y_theirs
    assert len(spy) == 3 * 10  # the progressive and the grey file went to Pillow


@needs_simplejpeg
@pytest.mark.parametrize('cmo', [False, True])
def test_cmo_loader_batches_identical_with_either_decoder(jpeg_folder, cmo):
    def batches(fast_decode, workers):
        ds = create_lt_dataset('', str(jpeg_folder), fast_decode=fast_decode)
        loader = create_cmo_loader(ds, input_size=(3, 224, 224), batch_size=4, is_training=True, device=CPU,
                                   num_workers=workers, color_jitter=None, cmo=cmo, cmo_start_epoch=-1, seed=3)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out += [(x.clone(), y.clone()) for x, y in loader]
        return out

    ref = batches(False, 0)
    for workers in (0, 2):
        got = batches(True, workers)
        assert len(got) == len(ref) == 2 * 3
        for (x, y), (x_ref, y_ref) in zip(got, ref):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_fast_decode_is_a_dataset_option(jpeg_folder, monkeypatch):
    ds = create_lt_dataset('', str(jpeg_folder), fast_decode=False)
    assert ds.fast_decode is False
    assert isinstance(ds, LongTailDataset)
    monkeypatch.setattr(decode, 'simplejpeg', None)
    with pytest.raises(ImportError, match='simplejpeg'):
        create_lt_dataset('', str(jpeg_folder), fast_decode=True)
    assert create_lt_dataset('', str(jpeg_folder)).fast_decode is False  # auto: off without simplejpeg
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert create_lt_dataset('', str(jpeg_folder))[0][0].size in ((500, 375), (375, 500))
