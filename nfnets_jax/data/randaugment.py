"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) on uint8 images.

Follows the op set and the magnitude-to-argument mapping of the TF port used
by the official NFNets (`nfnets/autoaugment.py`): 16 ops, each layer picks one
uniformly and always applies it, magnitudes are on a 0-10 scale. The NFNet
configs use 4 layers at magnitude 5 (F0), 10 (F1, F2) and 15 (F3-F7) - the
'405' / '410' / '415' of `experiment_nfnets.py`.

Differences from that port, all deliberate:
* translation and cutout sizes are fractions of the image side (100/224 and
  40/224 at magnitude 10) so that they mean the same at 32 px as the official
  100 px and 40 px do at 224 px;
* `contrast` blends towards the mean grey level (PIL's definition); the TF
  port's histogram bug blends towards a constant of `num_pixels / 256`.
Geometric ops use nearest-neighbour sampling with grey (128) fill, as there.
"""

from collections.abc import Callable

import numpy as np
from PIL import Image

MAX_LEVEL = 10.0
FILL_VALUE = 128
# The TF port's pixel constants, relative to the 224 px images they assume.
TRANSLATE_FRACTION = 100 / 224
CUTOUT_FRACTION = 40 / 224
# ITU-R 601-2 luma, as PIL's convert('L').
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def blend(image1: np.ndarray, image2: np.ndarray,
          factor: float) -> np.ndarray:
  """`image1 + factor * (image2 - image1)`, clipped to uint8 (truncated).

  Args:
    image1: uint8 image (the degenerate image, factor 0).
    image2: uint8 image of the same shape (factor 1).
    factor: blend factor; above 1 extrapolates.

  Returns:
    uint8 image.
  """
  out = image1.astype(np.float32) + factor * (
      image2.astype(np.float32) - image1.astype(np.float32))
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
  """Luma of an RGB uint8 image, `[H, W]` float32."""
  return image.astype(np.float32) @ _LUMA


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Stretches each channel linearly so its min maps to 0 and max to 255."""
  lo = image.min(axis=(0, 1), keepdims=True).astype(np.float32)
  hi = image.max(axis=(0, 1), keepdims=True).astype(np.float32)
  scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1.0), 1.0)
  offset = np.where(hi > lo, -lo * scale, 0.0)
  out = image.astype(np.float32) * scale + offset
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalization (PIL's `ImageOps.equalize` rule)."""
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    channel = image[..., c]
    histogram = np.bincount(channel.ravel(), minlength=256)
    nonzero = histogram[histogram > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      out[..., c] = channel
      continue
    lut = (np.cumsum(histogram) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
    out[..., c] = lut[channel]
  return out


def invert(image: np.ndarray) -> np.ndarray:
  """`255 - image`."""
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the `bits` most significant bits of every value (0 bits -> 0)."""
  shift = 8 - bits
  return ((image.astype(np.int32) >> shift) << shift).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Inverts the values at or above `threshold`."""
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image: np.ndarray, addition: int,
                 threshold: int = 128) -> np.ndarray:
  """Adds `addition` (clipped to 0-255) to the values below `threshold`."""
  added = np.clip(image.astype(np.int32) + addition, 0, 255).astype(np.uint8)
  return np.where(image < threshold, added, image)


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """Saturation: blends from the grey image (0) to the image (1)."""
  grey = np.clip(np.round(_grey(image)), 0, 255).astype(np.uint8)
  return blend(np.repeat(grey[..., None], 3, axis=-1), image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """Contrast: blends from a flat image at the mean grey level (PIL's rule)."""
  mean = int(_grey(image).mean() + 0.5)
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


def _affine(image: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
  """PIL affine warp (output -> input map), nearest, grey fill."""
  pil = Image.fromarray(image)
  out = pil.transform(pil.size, Image.Transform.AFFINE, coefficients,
                      resample=Image.Resampling.NEAREST,
                      fillcolor=(FILL_VALUE,) * 3)
  return np.asarray(out)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates counter-clockwise about the center, grey fill."""
  pil = Image.fromarray(image)
  out = pil.rotate(degrees, resample=Image.Resampling.NEAREST,
                   fillcolor=(FILL_VALUE,) * 3)
  return np.asarray(out)


def shear_x(image: np.ndarray, level: float) -> np.ndarray:
  """Shears along x: output (x, y) samples input (x + level * y, y)."""
  return _affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: np.ndarray, level: float) -> np.ndarray:
  """Shears along y: output (x, y) samples input (x, y + level * x)."""
  return _affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
  """Moves the content left by `pixels` (right when negative), grey fill."""
  return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
  """Moves the content up by `pixels` (down when negative), grey fill."""
  return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


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


def _signed(value: float, rng: np.random.Generator) -> float:
  """`value` with a random sign (each with probability 1/2)."""
  return value if rng.random() < 0.5 else -value


def _enhance(level: float) -> float:
  """The enhance ops' factor: 0.1 at level 0, 1.9 at level 1 (magnitude 10)."""
  return level * 1.8 + 0.1


def _cutout_at_random(image: np.ndarray, level: float,
                      rng: np.random.Generator) -> np.ndarray:
  center = (int(rng.integers(image.shape[0])),
            int(rng.integers(image.shape[1])))
  return cutout(image, center,
                int(level * CUTOUT_FRACTION * min(image.shape[:2])))


# Op name -> f(image, level = magnitude / 10, rng): the official mapping.
_OPS: dict[str, Callable[[np.ndarray, float, np.random.Generator],
                         np.ndarray]] = {
    'AutoContrast': lambda image, level, rng: autocontrast(image),
    'Equalize': lambda image, level, rng: equalize(image),
    'Invert': lambda image, level, rng: invert(image),
    'Rotate': lambda image, level, rng: rotate(
        image, _signed(level * 30.0, rng)),
    'Posterize': lambda image, level, rng: posterize(image, int(level * 4)),
    'Solarize': lambda image, level, rng: solarize(image, int(level * 256)),
    'Color': lambda image, level, rng: color(image, _enhance(level)),
    'Contrast': lambda image, level, rng: contrast(image, _enhance(level)),
    'Brightness': lambda image, level, rng: brightness(image, _enhance(level)),
    'Sharpness': lambda image, level, rng: sharpness(image, _enhance(level)),
    'ShearX': lambda image, level, rng: shear_x(
        image, _signed(level * 0.3, rng)),
    'ShearY': lambda image, level, rng: shear_y(
        image, _signed(level * 0.3, rng)),
    'TranslateX': lambda image, level, rng: translate_x(
        image, _signed(level * TRANSLATE_FRACTION * image.shape[1], rng)),
    'TranslateY': lambda image, level, rng: translate_y(
        image, _signed(level * TRANSLATE_FRACTION * image.shape[0], rng)),
    'Cutout': _cutout_at_random,
    'SolarizeAdd': lambda image, level, rng: solarize_add(
        image, int(level * 110)),
}
# The 16 ops in the TF port's order.
OP_NAMES = tuple(_OPS)


def apply_op(name: str, image: np.ndarray, magnitude: float,
             rng: np.random.Generator) -> np.ndarray:
  """Applies one RandAugment op at `magnitude` (the official level mapping).

  Args:
    name: one of `OP_NAMES`.
    image: uint8 `[H, W, 3]`.
    magnitude: level on the 0-10 scale (values above 10 extrapolate).
    rng: NumPy generator for the random sign / cutout position.

  Returns:
    uint8 `[H, W, 3]`.

  Raises:
    ValueError: for an unknown op name.
  """
  if name not in _OPS:
    raise ValueError(f'Unknown RandAugment op {name!r}; known: {OP_NAMES}.')
  return _OPS[name](image, magnitude / MAX_LEVEL, rng)


def randaugment(image: np.ndarray, num_layers: int, magnitude: float,
                rng: np.random.Generator) -> np.ndarray:
  """Applies `num_layers` uniformly chosen ops, each at `magnitude`.

  Args:
    image: uint8 `[H, W, 3]`.
    num_layers: number of ops applied in sequence (N in the paper).
    magnitude: shared magnitude on the 0-10 scale (M in the paper).
    rng: NumPy generator; the output is a deterministic function of its state.

  Returns:
    uint8 `[H, W, 3]`.
  """
  for _ in range(num_layers):
    name = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
    image = apply_op(name, image, magnitude, rng)
  return image
