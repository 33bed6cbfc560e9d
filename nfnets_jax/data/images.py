"""Image files read as the RGB picture a person sees: the package's reader.

`read_rgb(path)` is used by `nfnets-predict` and the image-folder dataset.
It opens the file with PIL and returns uint8 `[H, W, 3]`:

* EXIF orientation is applied (`ImageOps.exif_transpose`), as a viewer
  shows the photo.
* 16-bit greyscale (PIL modes 'I;16', 'I;16B', ... and 'I', which PIL uses
  for 16-bit PNGs in older versions and for PGM files, scaled by PIL to
  0-65535) is scaled to 8 bits: `round(v * 255 / 65535)`, values outside
  [0, 65535] clipped. 16-bit RGB and RGBA files (PNG, TIFF) are opened by
  PIL as 8-bit 'RGB' / 'RGBA' keeping each value's high byte (`v >> 8`),
  within one level of that rounding.
* 'F' (32-bit float) is read as [0, 1] when its largest finite value is at
  most 1, as [0, 255] otherwise; values are clipped, NaN is 0.
* Transparency ('LA', 'PA', 'RGBA', premultiplied 'La' / 'RGBa', and a
  'transparency' entry of 'P', 'L' or 'RGB' images, e.g. a PNG's tRNS
  chunk) is composited over white, as most viewers show it:
  `round((c * a + 255 * (255 - a)) / 255)`.
* Everything else ('1', 'L', 'P', 'CMYK' incl. Adobe's inverted CMYK JPEGs,
  'YCbCr', ...) is PIL's `convert('RGB')`.

Colour JPEGs without an EXIF rotation (most photos) are decoded by
libjpeg-turbo through simplejpeg, with its default (accurate) IDCT and
smooth chroma upsampling, as PIL decodes them: the same pixels, in 1.2
instead of 1.7 ms for a 375 x 500 photo (`benchmarks/input_pipeline.py`).

Files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
read at each call; `None` turns it off) are refused unread with
`ImageTooLargeError`, named and sized; PIL's global limit is never changed.
Any other file PIL cannot read raises `ImageDecodeError` naming the path.
"""
from __future__ import annotations

import os
import re
import struct
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps
import simplejpeg

PathLike = str | os.PathLike
# Transparent pixels are shown over this colour.
BACKGROUND = 255
_UINT16_MAX = 65535
_SIXTEEN_BIT_GREY = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_ALPHA_MODES = ('LA', 'La', 'PA', 'RGBA', 'RGBa')
# PIL's DecompressionBombError message: "Image size (N pixels) exceeds ...".
_BOMB_PIXELS = re.compile(r'\((\d+) pixels\)')
# What PIL raises for files it cannot identify or decode.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
  """An image file could not be read or decoded."""

  def __init__(self, path: str, reason: str):
    self.path = path
    self.reason = reason
    super().__init__(f'cannot decode image {path!r}: {reason}')

  def __reduce__(self):  # Survives pickling by grain worker processes.
    return type(self), (self.path, self.reason)


class ImageTooLargeError(ImageDecodeError):
  """An image file over PIL's decompression-bomb limit, refused unread.

  Attributes:
    pixels: width * height (None when PIL did not say).
    limit: `PIL.Image.MAX_IMAGE_PIXELS` when it was refused.
    size: `(width, height)` when known.
  """

  def __init__(self, path: str, pixels: int | None, limit: int,
               size: tuple[int, int] | None = None):
    self.pixels = pixels
    self.limit = limit
    self.size = size
    if pixels is None:
      what = f'over twice the limit of {limit} pixels'
    else:
      dims = f'{size[0]}x{size[1]} = ' if size else ''
      what = f'{dims}{pixels} pixels, over the limit of {limit} pixels'
    super().__init__(path, f'image too large: {what} (PIL.Image.'
                     'MAX_IMAGE_PIXELS, a guard against decompression bombs)')

  def __reduce__(self):
    return type(self), (self.path, self.pixels, self.limit, self.size)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
  """uint8 `round(v * 255 / 65535)` of 16-bit values (clipped to 0-65535)."""
  v = np.clip(values, 0, _UINT16_MAX).astype(np.uint32)
  # No ties: v * 255 / 65535 = v / 257 is never k + 1/2.
  return ((v * 255 + _UINT16_MAX // 2) // _UINT16_MAX).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
  """uint8 of float values: [0, 1] if the finite max is <= 1, else [0, 255]."""
  v = np.asarray(values, np.float64)
  finite = v[np.isfinite(v)]
  top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
  v = np.nan_to_num(v, nan=0.0, posinf=top, neginf=0.0)
  return np.rint(np.clip(v * (255.0 / top), 0, 255)).astype(np.uint8)


def _over_background(rgba: np.ndarray) -> np.ndarray:
  """uint8 `[H, W, 3]`: straight-alpha uint8 `[H, W, 4]` over white."""
  rgb = rgba[..., :3].astype(np.uint32)
  alpha = rgba[..., 3:].astype(np.uint32)
  mixed = rgb * alpha + BACKGROUND * (255 - alpha)
  return ((mixed + 127) // 255).astype(np.uint8)


def _has_alpha(image: Image.Image) -> bool:
  """Whether `image` has an alpha channel or a transparent colour."""
  return (image.mode in _ALPHA_MODES
          or image.info.get('transparency') is not None)


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 `[H, W, 3]` of a PIL image, per the module docstring's rules."""
  if image.mode in _SIXTEEN_BIT_GREY:
    grey = _scale_16bit(np.asarray(image))
  elif image.mode == 'F':
    grey = _scale_float(np.asarray(image))
  elif _has_alpha(image):
    return _over_background(np.asarray(image.convert('RGBA'), np.uint8))
  else:
    return np.asarray(image.convert('RGB'), np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def _plain_jpeg(image: Image.Image) -> bool:
  """A JPEG whose pixels libjpeg-turbo's RGB output gives as they are: 8-bit
  YCbCr, no EXIF orientation (`read_rgb` decodes it with simplejpeg)."""
  if image.format != 'JPEG' or image.mode != 'RGB':
    return False
  return image.getexif().get(_EXIF_ORIENTATION, 1) == 1


def _refuse_if_too_large(path: str, size: tuple[int, int]) -> None:
  limit = Image.MAX_IMAGE_PIXELS
  pixels = max(1, size[0]) * max(1, size[1])
  if limit is not None and pixels > limit:
    raise ImageTooLargeError(path, pixels, int(limit), tuple(size))


def _open(path: str) -> Image.Image:
  """`Image.open`, refusing images over `Image.MAX_IMAGE_PIXELS`.

  PIL raises `DecompressionBombError` above twice the limit and warns
  (`DecompressionBombWarning`) above it; the warning is silenced here and
  the size checked by `_refuse_if_too_large`, so both are refusals.
  (`catch_warnings` swaps the process's filters and is not thread-safe;
  the refusal does not depend on it: with reading threads, at worst PIL's
  warning is printed, or the 'ignore' filter for it outlives the call.)
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image = Image.open(path)
  except Image.DecompressionBombError as e:
    found = _BOMB_PIXELS.search(str(e))
    limit = Image.MAX_IMAGE_PIXELS or 0
    raise ImageTooLargeError(path, int(found[1]) if found else None,
                             int(limit)) from e
  try:
    _refuse_if_too_large(path, image.size)
  except ImageTooLargeError:
    image.close()
    raise
  return image


def read_rgb(path: PathLike) -> np.ndarray:
  """Reads an image file as the uint8 `[H, W, 3]` RGB picture a person sees.

  Args:
    path: any file PIL reads (see the module docstring for the modes).

  Returns:
    uint8 `[H, W, 3]`, EXIF orientation applied.

  Raises:
    ImageTooLargeError: over `PIL.Image.MAX_IMAGE_PIXELS`, naming the path,
      its size and the limit.
    ImageDecodeError: naming the path, when the file is missing, truncated
      or not an image.
  """
  path = os.fspath(path)
  try:
    with _open(path) as image:
      if _plain_jpeg(image):
        image.fp.seek(0)
        try:
          return simplejpeg.decode_jpeg(image.fp.read(), colorspace='RGB')
        except ValueError:  # What libjpeg-turbo refuses, PIL may read.
          image.fp.seek(0)
      return to_rgb(ImageOps.exif_transpose(image))
  except ImageDecodeError:
    raise
  except _PIL_ERRORS as e:
    raise ImageDecodeError(path, str(e) or type(e).__name__) from e
