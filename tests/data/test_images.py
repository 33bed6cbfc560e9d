"""The image reader `nfnets_jax.data.images.read_rgb`: modes and refusals.

Each file is written here and read back; the expected RGB is computed with
NumPy from the pixels written (16-bit: `round(v * 255 / 65535)`;
transparency: over white). PIL cannot write 16-bit RGB, so those PNG and
TIFF files (and a 16-bit PGM) are written byte by byte. Images over PIL's
decompression-bomb limit are valid all-black 1-bit PNGs of 10000x10000 and
20000x20000 (tens of KB, written in well under a second) that are refused
before any pixel is decoded.
"""
import pickle
import struct
import time
import warnings
import zlib

import numpy as np
from PIL import Image
import pytest

from nfnets_jax import data
from nfnets_jax.data import images

EXIF_ORIENTATION = 0x0112


def _chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack('>I', len(payload)) + kind + payload
          + struct.pack('>I', zlib.crc32(kind + payload)))


def _png(rows: list[bytes] | np.ndarray, width: int, height: int,
         bit_depth: int, colour_type: int) -> bytes:
  """A PNG of unfiltered `rows` (each without its filter byte)."""
  packer = zlib.compressobj()
  idat = b''.join(packer.compress(b'\x00' + bytes(r)) for r in rows)
  header = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type,
                       0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', header)
          + _chunk(b'IDAT', idat + packer.flush()) + _chunk(b'IEND', b''))


def png16(array: np.ndarray) -> bytes:
  """A 16-bit PNG of uint16 `[H, W]` (grey) or `[H, W, 3]` (RGB)."""
  h, w = array.shape[:2]
  rows = array.astype('>u2').reshape(h, -1).view(np.uint8)
  return _png(rows, w, h, 16, 0 if array.ndim == 2 else 2)


def blank_png(path, width: int, height: int) -> None:
  """A valid all-black 1-bit PNG (small file, any size)."""
  row = bytes((width + 7) // 8)
  with open(path, 'wb') as f:
    f.write(_png((row for _ in range(height)), width, height, 1, 0))


def tiff16(array: np.ndarray) -> bytes:
  """An uncompressed little-endian 16-bit RGB TIFF of uint16 `[H, W, 3]`."""
  h, w, channels = array.shape
  pixels = array.astype('<u2').tobytes()
  bits_at = 8
  pixels_at = bits_at + 2 * channels
  ifd_at = pixels_at + len(pixels)
  # Tag, type (3: SHORT, 4: LONG), count, value or offset.
  tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, channels, bits_at),
          (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, pixels_at),
          (277, 3, 1, channels), (278, 3, 1, h), (279, 4, 1, len(pixels)),
          (284, 3, 1, 1)]
  out = b'II*\x00' + struct.pack('<I', ifd_at)
  out += struct.pack(f'<{channels}H', *[16] * channels) + pixels
  out += struct.pack('<H', len(tags))
  for tag, kind, count, value in tags:
    value = (struct.pack('<HH', value, 0) if kind == 3
             else struct.pack('<I', value))
    out += struct.pack('<HHI', tag, kind, count) + value
  return out + struct.pack('<I', 0)


def to_8bit(values: np.ndarray) -> np.ndarray:
  return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """NumPy's `round(c * a / 255 + 255 * (1 - a / 255))`."""
  a = alpha.astype(np.float64)[..., None] / 255
  return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def grey3(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def write(tmp_path, name: str, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


def assert_within_one(actual: np.ndarray, expected: np.ndarray) -> None:
  assert actual.dtype == np.uint8 and actual.shape == expected.shape
  diff = np.abs(actual.astype(int) - expected.astype(int))
  assert diff.max() <= 1, diff.max()


def digit16(rng: np.random.Generator) -> np.ndarray:
  """A 16-bit grey 'digit': black ground, white stroke, grey anti-aliasing,
  plus noise over the whole range."""
  image = rng.integers(0, 65536, (24, 20)).astype(np.uint16)
  image[4:20, 8:12] = 65535
  image[4:20, 7] = 30000
  image[4:20, 12] = 20000
  image[:, :4] = 0
  return image


# --- 16 bits -----------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['PNG', 'TIFF'])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, fmt):
  grey = digit16(np.random.default_rng(0))
  image = Image.fromarray(grey)
  assert image.mode == 'I;16'
  path = str(tmp_path / f'digit.{fmt.lower()}')
  image.save(path, fmt)
  got = images.read_rgb(path)
  np.testing.assert_array_equal(got, grey3(to_8bit(grey)))
  assert len(np.unique(got)) > 100  # Not binarized to {0, 255}.
  # The same picture at 8 bits reads the same.
  eight = str(tmp_path / f'digit8.{fmt.lower()}')
  Image.fromarray(to_8bit(grey)).save(eight, fmt)
  np.testing.assert_array_equal(images.read_rgb(eight), got)


def test_16bit_grey_png_written_by_hand(tmp_path):
  grey = digit16(np.random.default_rng(1))
  got = images.read_rgb(write(tmp_path, 'g.png', png16(grey)))
  np.testing.assert_array_equal(got, grey3(to_8bit(grey)))
  # Every 8-bit level g, stored as 257 * g, comes back as g.
  levels = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
  got = images.read_rgb(write(tmp_path, 'l.png', png16(levels)))
  np.testing.assert_array_equal(got[..., 0], levels // 257)


def test_16bit_big_endian_tiff(tmp_path):
  grey = digit16(np.random.default_rng(2))
  image = Image.frombytes('I;16B', grey.shape[::-1],
                          grey.astype('>u2').tobytes())
  path = str(tmp_path / 'b.tiff')
  image.save(path, 'TIFF')
  with Image.open(path) as check:
    assert check.mode == 'I;16B'
  np.testing.assert_array_equal(images.read_rgb(path),
                                grey3(to_8bit(grey)))


def test_16bit_pgm_opens_as_mode_i(tmp_path):
  grey = digit16(np.random.default_rng(3))
  h, w = grey.shape
  content = f'P5\n{w} {h}\n65535\n'.encode() + grey.astype('>u2').tobytes()
  path = write(tmp_path, 'g.pgm', content)
  with Image.open(path) as check:
    assert check.mode == 'I'
  np.testing.assert_array_equal(images.read_rgb(path),
                                grey3(to_8bit(grey)))


@pytest.mark.parametrize('fmt', ['PNG', 'TIFF'])
def test_16bit_rgb_within_one_level(tmp_path, fmt):
  rgb = np.random.default_rng(4).integers(0, 65536, (13, 17, 3))
  rgb = rgb.astype(np.uint16)
  rgb[0, :3] = [[0, 0, 0], [65535, 65535, 65535], [257, 32896, 65278]]
  content = png16(rgb) if fmt == 'PNG' else tiff16(rgb)
  got = images.read_rgb(write(tmp_path, f'c.{fmt.lower()}', content))
  assert_within_one(got, to_8bit(rgb))
  np.testing.assert_array_equal(got[0, :3], [[0, 0, 0], [255, 255, 255],
                                             [1, 128, 254]])


@pytest.mark.parametrize('top', [1.0, 255.0])
def test_float_tiff_range(tmp_path, top):
  values = np.linspace(0, top, 60, dtype=np.float32).reshape(6, 10)
  path = str(tmp_path / 'f.tiff')
  Image.fromarray(values).save(path, 'TIFF')
  with Image.open(path) as check:
    assert check.mode == 'F'
  expected = np.round(values.astype(np.float64) * 255 / top).astype(np.uint8)
  np.testing.assert_array_equal(images.read_rgb(path), grey3(expected))


# --- colour spaces, orientation, transparency --------------------------------


def blocks(colours: np.ndarray, block: int = 16) -> np.ndarray:
  """`[rows, cols, C]` colours as uniform `block`-pixel squares (JPEG keeps
  them to within a level)."""
  return np.repeat(np.repeat(colours, block, axis=0), block, axis=1)


def test_cmyk_jpeg_adobe_inverted(tmp_path):
  cmyk = blocks(np.array([[[10, 200, 30, 40], [250, 0, 100, 0]],
                          [[0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8))
  path = str(tmp_path / 'cmyk.jpg')
  Image.fromarray(cmyk, 'CMYK').save(path, 'JPEG', quality=100)
  with open(path, 'rb') as f:
    assert b'Adobe' in f.read()  # PIL writes Adobe's inverted CMYK.
  c = cmyk.astype(np.float64)
  expected = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)
  assert_within_one(images.read_rgb(path), expected.astype(np.uint8))


@pytest.mark.parametrize('orientation, turns', [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
  rgb = blocks(np.array([[[200, 10, 10], [10, 200, 10]],
                         [[10, 10, 200], [240, 240, 20]],
                         [[0, 0, 0], [255, 255, 255]]], np.uint8))
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = orientation
  path = str(tmp_path / 'photo.jpg')
  Image.fromarray(rgb).save(path, 'JPEG', quality=100, subsampling=0,
                            exif=exif.tobytes())
  with Image.open(path) as check:
    assert check.getexif()[EXIF_ORIENTATION] == orientation
  assert_within_one(images.read_rgb(path), np.rot90(rgb, turns))


def test_palette_with_transparency_over_white(tmp_path):
  palette = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10], [30, 30, 200]],
                     np.uint8)
  alpha = np.array([0, 255, 128, 40], np.uint8)  # PNG tRNS: per entry.
  index = np.random.default_rng(5).integers(0, 4, (9, 11)).astype(np.uint8)
  image = Image.fromarray(index, 'P')
  image.putpalette(palette.ravel().tolist())
  path = str(tmp_path / 'p.png')
  image.save(path, 'PNG', transparency=alpha.tobytes())
  with Image.open(path) as check:
    assert check.mode == 'P' and 'transparency' in check.info
  expected = over_white(palette[index].astype(np.float64), alpha[index])
  assert_within_one(images.read_rgb(path), expected)


@pytest.mark.parametrize('mode', ['LA', 'RGBA'])
def test_alpha_over_white(tmp_path, mode):
  rng = np.random.default_rng(6)
  channels = 2 if mode == 'LA' else 4
  pixels = rng.integers(0, 256, (10, 12, channels)).astype(np.uint8)
  pixels[0, 0, -1] = 0  # Fully transparent: white.
  path = str(tmp_path / f'{mode}.png')
  Image.fromarray(pixels, mode).save(path, 'PNG')
  colour = pixels[..., :-1].astype(np.float64)
  if mode == 'LA':
    colour = np.repeat(colour, 3, axis=-1)
  expected = over_white(colour, pixels[..., -1])
  got = images.read_rgb(path)
  assert_within_one(got, expected)
  np.testing.assert_array_equal(got[0, 0], [255, 255, 255])


def test_plain_images_are_pils_rgb(tmp_path):
  rgb = np.random.default_rng(7).integers(0, 256, (8, 9, 3)).astype(np.uint8)
  for mode in ('RGB', 'L', '1'):
    image = Image.fromarray(rgb).convert(mode)
    path = str(tmp_path / f'{mode}.png')
    image.save(path)
    np.testing.assert_array_equal(images.read_rgb(path),
                                  np.asarray(image.convert('RGB')))


# --- refusals ------------------------------------------------------------------


@pytest.fixture(scope='module')
def huge(tmp_path_factory):
  """20000x20000 (over twice the limit: PIL raises) and 10000x10000 (over
  the limit: PIL only warns) blank PNGs."""
  d = tmp_path_factory.mktemp('huge')
  start = time.perf_counter()
  paths = {}
  for side in (20000, 10000):
    paths[side] = str(d / f'{side}.png')
    blank_png(paths[side], side, side)
  assert time.perf_counter() - start < 2
  return paths


@pytest.mark.parametrize('side', [20000, 10000])
def test_over_the_pixel_limit_is_refused_by_name(huge, side):
  limit = Image.MAX_IMAGE_PIXELS
  assert side * side > limit
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # No DecompressionBombWarning escapes.
    with pytest.raises(images.ImageTooLargeError) as err:
      images.read_rgb(huge[side])
  assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global left alone.
  e = err.value
  assert isinstance(e, data.ImageDecodeError)
  assert e.path == huge[side] and e.pixels == side * side
  assert e.limit == limit
  message = str(e)
  assert repr(huge[side]) in message
  assert f'{side * side} pixels' in message and str(limit) in message
  if side == 10000:
    assert e.size == (side, side) and '10000x10000' in message
  again = pickle.loads(pickle.dumps(e))  # grain workers pickle errors.
  assert type(again) is type(e) and str(again) == message


def test_the_limit_is_read_at_each_call(tmp_path, monkeypatch):
  path = str(tmp_path / 'small.png')
  Image.fromarray(np.zeros((20, 30), np.uint8)).save(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 500)
  with pytest.raises(images.ImageTooLargeError, match='20 = 600 pixels'):
    images.read_rgb(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # PIL's "no limit".
  assert images.read_rgb(path).shape == (20, 30, 3)


def test_undecodable_names_the_path(tmp_path):
  path = write(tmp_path, 'broken.jpg', b'\xff\xd8 not really a jpeg')
  with pytest.raises(images.ImageDecodeError) as err:
    images.read_rgb(path)
  assert not isinstance(err.value, images.ImageTooLargeError)
  assert err.value.path == path
  assert err.value.reason == f'cannot identify image file {path!r}'
  with pytest.raises(images.ImageDecodeError, match='missing.png'):
    images.read_rgb(tmp_path / 'missing.png')


def test_the_dataset_and_predict_share_the_error_classes(tmp_path, huge):
  assert data.ImageDecodeError is images.ImageDecodeError
  grey = digit16(np.random.default_rng(8))
  path = write(tmp_path, 'g.png', png16(grey))
  np.testing.assert_array_equal(images.read_rgb(path),
                                grey3(to_8bit(grey)))
  with pytest.raises(images.ImageTooLargeError):
    images.read_rgb(huge[20000])


def test_pipeline_stops_on_a_refused_image_by_name(tmp_path, huge):
  """The error the training loop turns into 'checkpoint, then stop'."""
  root = tmp_path / 'root'
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      (root / split / name).mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(
            root / split / name / f'{i}.png')
  bad = root / 'val' / 'b' / 'big.png'
  bad.write_bytes(open(huge[20000], 'rb').read())
  it = data.load(data.Split.VALID, dataset=data.IMAGE_FOLDER,
                 data_dir=str(root), batch_size=6, image_size=8,
                 is_training=False, seed=0, eval_crop_padding=0)
  with pytest.raises(data.ImageDecodeError) as err:
    next(it)
  assert isinstance(err.value, images.ImageTooLargeError)
  assert err.value.path == str(bad)


def test_model_preprocess_reads_a_path_as_predict_does(tmp_path):
  """`DataConfig.preprocess` (behind `Model.preprocess`) of a 16-bit PNG's
  path equals that of its 8-bit RGB picture, to one grey level."""
  from nfnets_jax.pretrained import registry  # pylint: disable=g-import-not-at-top
  grey = digit16(np.random.default_rng(3))
  path = tmp_path / 'digit16.png'
  Image.fromarray(grey).save(path)
  config = registry.DataConfig(train_size=16, test_size=16, crop_padding=4)
  from_path = config.preprocess(path)
  from_pixels = config.preprocess(grey3(to_8bit(grey)))
  one_level = 1 / min(config.std)  # std in 0-255 units.
  np.testing.assert_allclose(from_path, from_pixels, atol=one_level)
  assert from_path.shape == (16, 16, 3)


@pytest.mark.parametrize("options", [
    {"quality": 90}, {"quality": 75, "subsampling": 0},
    {"quality": 95, "progressive": True}, {"quality": 50, "subsampling": 1}])
@pytest.mark.parametrize("size", [(375, 500), (17, 9)])
def test_colour_jpegs_decode_through_simplejpeg_as_pil(tmp_path, monkeypatch,
                                                       options, size):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  path = tmp_path / "photo.jpg"
  Image.fromarray(pixels).save(path, **options)
  calls = []
  decode = images.simplejpeg.decode_jpeg
  monkeypatch.setattr(images.simplejpeg, "decode_jpeg",
                      lambda *a, **k: calls.append(1) or decode(*a, **k))
  got = images.read_rgb(path)
  assert calls  # The quick path ran, and gave PIL's pixels.
  np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))


def test_rotated_and_grey_jpegs_take_pils_path(tmp_path, monkeypatch):
  monkeypatch.setattr(images.simplejpeg, "decode_jpeg", None)  # Unused.
  grey = tmp_path / "grey.jpg"
  Image.fromarray(np.full((8, 6), 90, np.uint8)).save(grey)
  assert images.read_rgb(grey).shape == (8, 6, 3)
  rotated = tmp_path / "rotated.jpg"
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = 6
  Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(rotated,
                                                      exif=exif.tobytes())
  assert images.read_rgb(rotated).shape == (6, 8, 3)


def test_a_truncated_jpeg_is_still_refused_by_name(tmp_path):
  path = tmp_path / "cut.jpg"
  Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (64, 80, 3), dtype=np.uint8)).save(path, quality=90)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(images.ImageDecodeError, match="cut.jpg.*truncated"):
    images.read_rgb(path)
