""" Image decoding for the dataset read path: libjpeg-turbo through simplejpeg where it gives Pillow's pixels.

timm's ``ImageDataset`` decodes with ``Image.open(f).convert(mode)``. For the common case of an
ImageNet-style photo, an 8-bit sequential (baseline or extended) Huffman JPEG with three
components, :func:`read_image` decodes with ``simplejpeg.decode_jpeg`` instead: the same
libjpeg-turbo decoder with the same settings as Pillow's (accurate integer IDCT, fancy
upsampling: ``fastdct=False, fastupsample=False``), so the pixels are Pillow's bit for bit (tested
on generated and real JPEGs of every chroma subsampling), about 1.1x faster on a 500 x 375 photo
(libjpeg-turbo's part alone is 1.35x faster than Pillow's decode; the PIL image that timm's
transform needs costs the rest). Everything else goes to Pillow exactly as before: progressive and
arithmetic-coded JPEGs, grey and CMYK JPEGs, Adobe RGB-coded JPEGs, 12-bit JPEGs, PNG and other
formats, files above Pillow's decompression-bomb limit, and any file simplejpeg refuses or only
decodes with a warning (a truncated or corrupt file), so Pillow's tolerance and error messages are
unchanged.

simplejpeg is optional (``pip install timm-cmo[fast]``); without it everything decodes with Pillow.
"""
import io
from typing import Any, Optional

from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes everything
    simplejpeg = None

__all__ = ['fast_decode_available', 'is_plain_jpeg', 'read_image', 'resolve_fast_decode']

_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline, extended sequential (Huffman); progressive (C2) and arithmetic go to Pillow
# the other frame types; C4 (DHT), C8 (JPG) and CC (DAC) are not frames
_SOF_OTHER = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}


def fast_decode_available() -> bool:
    """Whether simplejpeg is installed."""
    return simplejpeg is not None


def resolve_fast_decode(fast_decode: Optional[bool]) -> bool:
    """``fast_decode`` as a bool: None means "when simplejpeg is installed"; True without it is an error."""
    if fast_decode is None:
        return fast_decode_available()
    if fast_decode and not fast_decode_available():
        raise ImportError('fast_decode=True needs simplejpeg: pip install simplejpeg (or timm-cmo[fast])')
    return bool(fast_decode)


def is_plain_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG that :func:`read_image` decodes with simplejpeg.

    That is: an 8-bit baseline or extended sequential Huffman frame with 3 components, in a JFIF
    file, or with no Adobe marker, or with an Adobe marker of transform 1 (YCbCr); an Adobe
    RGB-coded file (transform 0 and no JFIF marker) goes to Pillow. The markers are scanned up to
    the first scan (SOS); the entropy-coded data is not read.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    pos, frame_ok, jfif, adobe_transform = 2, None, False, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker == 0xD9:  # EOI before a scan
            return False
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return False
        seg = pos + 4
        if marker in _SOF_SEQUENTIAL:
            if frame_ok is not None or length < 8:  # a second frame header: leave it to Pillow
                return False
            frame_ok = data[seg] == 8 and data[seg + 5] == 3
        elif marker in _SOF_OTHER:
            return False
        elif marker == 0xE0 and data[seg:seg + 5] == b'JFIF\x00':
            jfif = True
        elif marker == 0xEE and length >= 14 and data[seg:seg + 5] == b'Adobe':
            adobe_transform = data[seg + 11]
        elif marker == 0xDA:  # start of scan: everything libjpeg decides the colour space from has been seen
            return bool(frame_ok) and (jfif or adobe_transform is None or adobe_transform == 1)
        pos += 2 + length
    return False


def _within_bomb_limit(data: bytes) -> bool:
    """Whether the image size is within Pillow's decompression-bomb warning limit (else Pillow decides)."""
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return True
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    return width * height <= limit


def read_image(fp: Any, mode: Optional[str] = 'RGB', fast: bool = True) -> Image.Image:
    """Decode an image file object (or bytes) to a PIL image in ``mode``, as ``Image.open(fp).convert(mode)``.

    Args:
        fp: A binary file object (closed once the image is decoded) or bytes.
        mode: PIL mode to convert to (``'RGB'``, ``'L'``, ...); None keeps the file's own mode (the
            image is then decoded lazily when it comes from Pillow).
        fast: Decode plain JPEGs (:func:`is_plain_jpeg`) with simplejpeg when it is installed.

    Returns:
        The image; the same pixels whichever decoder ran.
    """
    if fast and simplejpeg is not None:
        if isinstance(fp, (bytes, bytearray, memoryview)):
            data = bytes(fp)
        else:
            data = fp.read()
            close = getattr(fp, 'close', None)
            if close is not None:
                close()
        if is_plain_jpeg(data):
            try:
                if _within_bomb_limit(data):
                    arr = simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=False, fastupsample=False, strict=True)
                    img = Image.fromarray(arr)
                    return img if mode in (None, 'RGB') else img.convert(mode)
            except ValueError:  # corrupt, truncated or unsupported: Pillow decides what to do with it
                pass
        fp = io.BytesIO(data)
    elif isinstance(fp, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(fp))
    img = Image.open(fp)
    if mode:
        img = img.convert(mode)  # decodes: the file is no longer needed
        close = getattr(fp, 'close', None)
        if close is not None:
            close()
    return img
