"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) on uint8 images.

Reproduces the TF port that the official NFNets run (`nfnets/autoaugment.py`,
`distort_image_with_randaugment`): 16 ops, each layer picks one uniformly and
always applies it, magnitudes on a 0-10 scale. The NFNet configs use 4 layers
at magnitude 5 (F0), 10 (F1, F2) and 15 (F3-F7): the '405' / '410' / '415'
of `experiment_nfnets.py`. Every op matches TensorFlow 2.21 running that
file on the fixture `tests/fixtures/randaugment_tf/ops.npz`.

Two modes (`MODES`) differ in four ops:
* 'official' (the ImageNet recipes), exactly as TF executes the port:
  translate 100 px and cutout 40 px at magnitude 10 whatever the image size;
  `contrast` blends towards the constant min(H * W / 256, 255) (the port
  takes the histogram's sum, i.e. the pixel count, for its mean); `solarize`
  thresholds at int(256 * magnitude / 10) cast to uint8, which wraps modulo
  256: magnitude 10 inverts every pixel, 15 is magnitude 5's threshold 128.
* 'relative' (small images): translate and cutout sizes are the same
  fractions of the image side as 100 px and 40 px are of 224 px; `contrast`
  blends towards the mean grey level (PIL's rule); `solarize` thresholds are
  not wrapped (PIL's rule: 256 and above change nothing).
Geometric ops sample as TF's `ImageProjectiveTransformV3` does (output pixel
`(x, y)` reads the input at the transformed `(x, y)` rounded half away from
zero, float32 coordinates) with grey (128) fill.

Speed: `solarize`, `solarize_add`, `autocontrast` and `equalize` run as
lookup tables (`_lookup`), the op applied to the 256 values once, so their
numbers are the op's own (2-3x quicker at 192 px).
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

MAX_LEVEL = 10.0
FILL_VALUE = 128
MODES = ('official', 'relative')
# The port's `translate_const` / `cutout_const` (pixels at magnitude 10) and
# the image side they assume (for the 'relative' mode).
TRANSLATE_PIXELS = 100
CUTOUT_PIXELS = 40
REFERENCE_SIDE = 224
# tf.image.rgb_to_grayscale's weights.
_TF_LUMA = np.asarray([0.2989, 0.5870, 0.1140], np.float32)
# ITU-R 601-2 luma, as PIL's convert('L').
_PIL_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)
_VALUES = np.arange(256, dtype=np.uint8)


def _lookup(image: np.ndarray, table: np.ndarray) -> np.ndarray:
  """`table[image]`: one uint8 `[256]` table, or `[C, 256]` per channel."""
  if table.ndim == 1:
    table = np.broadcast_to(table, (image.shape[-1], 256))
  if image.shape[-1] == 3:  # PIL maps the three bands in one C loop.
    return np.asarray(Image.fromarray(image).point(table.ravel().tolist()))
  return np.stack([table[c][image[..., c]] for c in range(image.shape[-1])],
                  axis=-1)


def blend(image1: np.ndarray, image2: np.ndarray,
          factor: float) -> np.ndarray:
  """`image1 + factor * (image2 - image1)` in float32, clipped, truncated.

  Args:
    image1: uint8 image (the degenerate image, factor 0).
    image2: uint8 image of the same shape (factor 1).
    factor: blend factor; above 1 extrapolates.

  Returns:
    uint8 image.
  """
  x1 = image1.astype(np.float32)
  out = x1 + np.float32(factor) * (image2.astype(np.float32) - x1)
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """`tf.image.rgb_to_grayscale` of a uint8 image, `[H, W]` uint8.

  TF scales to [0, 1] (x / 255), weights the channels in float32, then
  converts back by multiplying with 255.5 and truncating.
  """
  x = image.astype(np.float32) * np.float32(1.0 / 255.0)
  grey = (x[..., 0] * _TF_LUMA[0] + x[..., 1] * _TF_LUMA[1]
          + x[..., 2] * _TF_LUMA[2])
  return (grey * np.float32(255.5)).astype(np.uint8)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Stretches each channel linearly so its min maps to 0 and max to 255."""
  if image.shape[-1] == 3:
    extrema = np.asarray(Image.fromarray(image).getextrema(), np.float32)
  else:  # Channel-major copy: NumPy reduces contiguous rows ~50x faster.
    channels = image.reshape(-1, image.shape[-1]).T.copy()
    extrema = np.stack([channels.min(axis=1), channels.max(axis=1)], 1)
  lo, hi = extrema[:, :1].astype(np.float32), extrema[:, 1:].astype(
      np.float32)
  scale = np.where(hi > lo, np.float32(255.0) / np.maximum(hi - lo, 1.0),
                   np.float32(1.0))
  offset = np.where(hi > lo, -lo * scale, np.float32(0.0))
  tables = _VALUES.astype(np.float32) * scale + offset  # [C, 256]
  return _lookup(image, np.clip(tables, 0.0, 255.0).astype(np.uint8))


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalization (PIL's `ImageOps.equalize` rule)."""
  if image.shape[-1] == 3:
    histograms = np.asarray(Image.fromarray(image).histogram()).reshape(3, 256)
  else:
    histograms = np.stack([np.bincount(image[..., c].ravel(), minlength=256)
                           for c in range(image.shape[-1])])
  tables = []
  for histogram in histograms:
    nonzero = histogram[histogram > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      tables.append(_VALUES)
      continue
    lut = (np.cumsum(histogram) + step // 2) // step
    tables.append(np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(
        np.uint8))
  return _lookup(image, np.stack(tables))


def invert(image: np.ndarray) -> np.ndarray:
  """`255 - image`."""
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the `bits` most significant bits of every value (0 bits -> 0)."""
  shift = 8 - bits
  return ((image.astype(np.int32) >> shift) << shift).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Inverts the values at or above `threshold` (>= 256: no change)."""
  return _lookup(image, np.where(_VALUES < threshold, _VALUES,
                                 255 - _VALUES).astype(np.uint8))


def solarize_add(image: np.ndarray, addition: int,
                 threshold: int = 128) -> np.ndarray:
  """Adds `addition` (clipped to 0-255) to the values below `threshold`."""
  added = np.clip(_VALUES.astype(np.int32) + addition, 0, 255).astype(
      np.uint8)
  return _lookup(image, np.where(_VALUES < threshold, added, _VALUES))


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """Saturation: blends from the TF grey image (0) to the image (1)."""
  return blend(np.repeat(grayscale(image)[..., None], 3, axis=-1), image,
               factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """The port's contrast: blends from a flat min(H * W / 256, 255) image.

  The port means to blend from the mean grey level but divides the sum of
  the grey histogram (the pixel count) by 256.
  """
  return blend(np.full_like(image, contrast_level(*image.shape[:2])), image,
               factor)


def contrast_level(height: int, width: int) -> int:
  """The grey level the port's `contrast` blends from: min(H * W / 256,
  255), truncated."""
  return int(min(height * width / 256.0, 255.0))


def contrast_mean_grey(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL's contrast: blends from a flat image at the mean grey level."""
  mean = int((image.astype(np.float32) @ _PIL_LUMA).mean() + 0.5)
  return blend(np.full_like(image, mean), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Brightness: blends from black (0) to the image (1)."""
  return blend(np.zeros_like(image), image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends from a 3x3-smoothed image (PIL's SMOOTH kernel; borders kept)."""
  x = image.astype(np.float32)
  kernel = np.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
  height, width = image.shape[:2]
  smooth = sum(kernel[i, j] * x[i:height - 2 + i, j:width - 2 + j]
               for i in range(3) for j in range(3))
  degenerate = image.copy()
  degenerate[1:-1, 1:-1] = np.clip(smooth, 0.0, 255.0).astype(np.uint8)
  return blend(degenerate, image, factor)


def project(image: np.ndarray, transform: tuple[float, ...]) -> np.ndarray:
  """Affine warp as TF's `ImageProjectiveTransformV3`, NEAREST, grey fill.

  Args:
    image: uint8 `[H, W, C]`.
    transform: `(a0, a1, a2, b0, b1, b2)`: output pixel (x, y) (column, row)
      reads the input at (a0 x + a1 y + a2, b0 x + b1 y + b2), computed in
      float32 and rounded half away from zero; outside reads are grey.

  Returns:
    uint8 `[H, W, C]`.
  """
  height, width = image.shape[:2]
  # The pixels, then one grey pixel that every outside read takes.
  pixels = np.concatenate([image.reshape(height * width, -1), np.full(
      (1, image.shape[-1]), FILL_VALUE, image.dtype)])
  return np.take(pixels, project_index(transform, height, width),
                 axis=0).reshape(image.shape)


def project_index(transform: tuple[float, ...], height: int, width: int
                  ) -> np.ndarray:
  """`project`'s reads: int64 `[H, W]` flat input pixel indices, `H * W`
  (the grey fill) where the transformed position is outside the image."""
  a0, a1, a2, b0, b1, b2 = np.asarray(transform, np.float32)
  x = np.arange(width, dtype=np.float32)
  y = np.arange(height, dtype=np.float32)[:, None]
  # float32 step by step, in the kernel's order (no fused multiply-add).
  col = _round_half_away((a0 * x + a1 * y) + a2)
  row = _round_half_away((b0 * x + b1 * y) + b2)
  inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
  return np.where(inside, row * width + col, height * width)


def _round_half_away(values: np.ndarray) -> np.ndarray:
  """`std::round` of float32 values, as int64 (exact in float64)."""
  values = values.astype(np.float64)
  return np.trunc(values + np.copysign(0.5, values)).astype(np.int64)


def _rotation(degrees: float, height: int, width: int) -> tuple[float, ...]:
  """The `project` transform rotating a `[height, width]` image about its
  center as tensorflow_addons' `rotate`: positive `degrees` turn the content
  counter-clockwise on screen, as PIL's `rotate` (the port's docstring says
  clockwise; its kernel does not)."""
  angle = np.float32(degrees * (np.pi / 180.0))
  cos = np.float32(np.cos(np.float64(angle)))
  sin = np.float32(np.sin(np.float64(angle)))
  h1 = np.float32(height - 1)
  w1 = np.float32(width - 1)
  x_offset = (w1 - (cos * w1 - sin * h1)) / np.float32(2.0)
  y_offset = (h1 - (sin * w1 + cos * h1)) / np.float32(2.0)
  return (cos, -sin, x_offset, sin, cos, y_offset)


def cutout(image: np.ndarray, center: tuple[int, int],
           pad_size: int) -> np.ndarray:
  """Greys out the square `center +- pad_size` (clipped to the image).

  Args:
    image: uint8 `[H, W, 3]`.
    center: (row, column) of the square's center.
    pad_size: half the side of the square in pixels (0 = no change).

  Returns:
    uint8 image.
  """
  out = image.copy()
  row, col = center
  out[max(0, row - pad_size):row + pad_size,
      max(0, col - pad_size):col + pad_size] = FILL_VALUE
  return out


def _enhance(level: float) -> float:
  """The enhance ops' factor: 0.1 at level 0, 1.9 at level 1 (magnitude 10)."""
  return level * 1.8 + 0.1


def _pixels(level: float, pixels: int, side: int, mode: str) -> float:
  """`level * pixels`, or in 'relative' mode that fraction of 224 x `side`."""
  if mode == 'relative':
    return level * pixels / REFERENCE_SIDE * side
  return level * pixels


def _solarize(image: np.ndarray, level: float, mode: str) -> np.ndarray:
  threshold = int(level * 256)
  if mode == 'official':
    threshold %= 256  # TF casts the Python threshold to uint8.
  return solarize(image, threshold)


def _contrast(image: np.ndarray, level: float, mode: str) -> np.ndarray:
  op = contrast if mode == 'official' else contrast_mean_grey
  return op(image, _enhance(level))


def _cutout(image: np.ndarray, level: float, center: tuple[int, int],
            mode: str) -> np.ndarray:
  return cutout(image, center, int(_pixels(level, CUTOUT_PIXELS,
                                           min(image.shape[:2]), mode)))


def _sign(value: float, negative: bool) -> float:
  return -value if negative else value


def _transform(name: str, level: float, negative: bool, height: int,
               width: int, mode: str) -> tuple[float, ...]:
  """A geometric op's `project` transform (the `SIGNED_OPS`)."""
  if name == 'Rotate':
    return _rotation(_sign(level * 30.0, negative), height, width)
  if name in ('ShearX', 'ShearY'):
    shear = _sign(level * 0.3, negative)
    return ((1.0, shear, 0.0, 0.0, 1.0, 0.0) if name == 'ShearX'
            else (1.0, 0.0, 0.0, shear, 1.0, 0.0))
  side = width if name == 'TranslateX' else height
  pixels = _sign(_pixels(level, TRANSLATE_PIXELS, side, mode), negative)
  return ((1.0, 0.0, pixels, 0.0, 1.0, 0.0) if name == 'TranslateX'
          else (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def geometric_index(name: str, magnitude: float, negative: bool,
                    height: int, width: int, mode: str = 'official'
                    ) -> np.ndarray:
  """The reads of a geometric op (one of `SIGNED_OPS`) at `magnitude` on a
  `[height, width]` image: `project_index` of its transform."""
  return project_index(_transform(name, magnitude / MAX_LEVEL, negative,
                                  height, width, mode), height, width)


# f(image, level = magnitude / 10, negative, center, mode): the port's
# mapping; `negative` and `center` are the op's random draws (`_draw`).
_Op = Callable[[np.ndarray, float, bool, tuple[int, int], str], np.ndarray]


def _warp(name: str) -> _Op:
  """The geometric op `name` (one of `SIGNED_OPS`): `project` with its
  transform."""
  return lambda image, level, neg, center, mode: project(
      image, _transform(name, level, neg, *image.shape[:2], mode))


_OPS: dict[str, _Op] = {
    'AutoContrast': lambda image, level, neg, center, mode: autocontrast(
        image),
    'Equalize': lambda image, level, neg, center, mode: equalize(image),
    'Invert': lambda image, level, neg, center, mode: invert(image),
    'Rotate': _warp('Rotate'),
    'Posterize': lambda image, level, neg, center, mode: posterize(
        image, int(level * 4)),
    'Solarize': lambda image, level, neg, center, mode: _solarize(
        image, level, mode),
    'Color': lambda image, level, neg, center, mode: color(
        image, _enhance(level)),
    'Contrast': lambda image, level, neg, center, mode: _contrast(
        image, level, mode),
    'Brightness': lambda image, level, neg, center, mode: brightness(
        image, _enhance(level)),
    'Sharpness': lambda image, level, neg, center, mode: sharpness(
        image, _enhance(level)),
    'ShearX': _warp('ShearX'),
    'ShearY': _warp('ShearY'),
    'TranslateX': _warp('TranslateX'),
    'TranslateY': _warp('TranslateY'),
    'Cutout': lambda image, level, neg, center, mode: _cutout(
        image, level, center, mode),
    'SolarizeAdd': lambda image, level, neg, center, mode: solarize_add(
        image, int(level * 110)),
}
# The 16 ops in the port's order.
OP_NAMES = tuple(_OPS)
# The geometric ops, which draw a sign (probability 1/2 each); Cutout draws
# a position.
SIGNED_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


class Draws(NamedTuple):
  """What RandAugment draws for one image (`draw`), as arrays.

  Attributes:
    ops: int32 `[L]`: each layer's op, an index into `OP_NAMES`.
    negative: bool `[L]`: a signed op's sign (False elsewhere).
    centers: int32 `[L, 2]`: Cutout's (row, column) (0 elsewhere).
  """
  ops: np.ndarray
  negative: np.ndarray
  centers: np.ndarray


def _draw(name: str, height: int, width: int, rng: np.random.Generator
          ) -> tuple[bool, tuple[int, int]]:
  """One op's draws, in the port's order: a sign, or a Cutout center."""
  if name in SIGNED_OPS:
    return bool(rng.random() >= 0.5), (0, 0)
  if name == 'Cutout':
    return False, (int(rng.integers(height)), int(rng.integers(width)))
  return False, (0, 0)


def draw(num_layers: int, height: int, width: int,
         rng: np.random.Generator) -> Draws:
  """The random draws of `randaugment` on one `[height, width]` image.

  Consumes `rng` as `randaugment` does; `apply_draws` of them gives its
  output (`data.device_augment` applies them in the jitted train step).
  """
  ops, negative, centers = [], [], []
  for _ in range(num_layers):
    op = int(rng.integers(len(OP_NAMES)))
    neg, center = _draw(OP_NAMES[op], height, width, rng)
    ops.append(op)
    negative.append(neg)
    centers.append(center)
  return Draws(np.asarray(ops, np.int32).reshape(num_layers),
               np.asarray(negative, bool).reshape(num_layers),
               np.asarray(centers, np.int32).reshape(num_layers, 2))


def check_mode(mode: str) -> None:
  """Raises ValueError unless `mode` is one of `MODES`."""
  if mode not in MODES:
    raise ValueError(f'RandAugment mode {mode!r} is not one of {MODES}.')


def apply_op(name: str, image: np.ndarray, magnitude: float,
             rng: np.random.Generator, mode: str = 'official') -> np.ndarray:
  """Applies one RandAugment op at `magnitude` (the port's level mapping).

  Args:
    name: one of `OP_NAMES`.
    image: uint8 `[H, W, 3]`.
    magnitude: level on the 0-10 scale (values above 10 extrapolate).
    rng: NumPy generator for the random sign / cutout position.
    mode: one of `MODES` (see the module docstring).

  Returns:
    uint8 `[H, W, 3]`.

  Raises:
    ValueError: for an unknown op name or mode.
  """
  if name not in _OPS:
    raise ValueError(f'Unknown RandAugment op {name!r}; known: {OP_NAMES}.')
  check_mode(mode)
  negative, center = _draw(name, image.shape[0], image.shape[1], rng)
  return _OPS[name](image, magnitude / MAX_LEVEL, negative, center, mode)


def apply_draws(image: np.ndarray, draws: Draws, magnitude: float,
                mode: str = 'official') -> np.ndarray:
  """Applies the layers of `draws` (`draw`), each at `magnitude`.

  Args:
    image: uint8 `[H, W, 3]`.
    draws: one image's `Draws`.
    magnitude: shared magnitude on the 0-10 scale.
    mode: one of `MODES`.

  Returns:
    uint8 `[H, W, 3]`.
  """
  check_mode(mode)
  for op, negative, center in zip(draws.ops, draws.negative, draws.centers):
    image = _OPS[OP_NAMES[op]](image, magnitude / MAX_LEVEL, bool(negative),
                               (int(center[0]), int(center[1])), mode)
  return image


def randaugment(image: np.ndarray, num_layers: int, magnitude: float,
                rng: np.random.Generator,
                mode: str = 'official') -> np.ndarray:
  """Applies `num_layers` uniformly chosen ops, each at `magnitude`.

  Args:
    image: uint8 `[H, W, 3]`.
    num_layers: number of ops applied in sequence (N in the paper).
    magnitude: shared magnitude on the 0-10 scale (M in the paper).
    rng: NumPy generator; the output is a deterministic function of its state.
    mode: one of `MODES` (see the module docstring).

  Returns:
    uint8 `[H, W, 3]`.
  """
  check_mode(mode)
  return apply_draws(image, draw(num_layers, *image.shape[:2], rng),
                     magnitude, mode)
