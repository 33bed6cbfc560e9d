"""The training augmentation's pixel work, in JAX: MixUp/CutMix, RandAugment
and normalization inside the jitted program, after the host's crop, flip and
resize.

The host draws every random choice exactly as the host pipeline does
(`mixing.draw`, `randaugment.draw`, the same generator in the same order)
and sends the resized float32 images with those draws; `augment` applies
them. The output equals the host pipeline's bit for bit on CPU when
compiled with the package's options (`cpu.compiler`): every float product
that the host adds to something is kept apart by an optimization barrier
(`_exact`), so XLA cannot fuse it into a multiply-add, whose single
rounding can move a value across an integer that the uint8 conversion
truncates. (The package's options keep the barriers; XLA:CPU's defaults
drop them. GPU compilers may round differently.)

RandAugment's ops take the port's arithmetic (`data.randaugment`): tables
and gather indices that depend only on the magnitude and image size are
computed once on the host (NumPy) and become constants; per image, the op
runs under `lax.switch` inside `lax.map`, so only the drawn op runs. One
exception to exactness: 'relative' mode's `Contrast` sums the grey image in
XLA's order rather than NumPy's, so its mean grey level, rounded to an
integer, can differ by one where the mean is within rounding of a half.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.data import preprocessing
from nfnets_jax.data import randaugment as ra

Image = jax.Array  # uint8 [H, W, 3]


def _exact(x: jax.Array) -> jax.Array:
  """`x`, computed apart from what uses it (no fused multiply-add)."""
  return jax.lax.optimization_barrier(x)


def _blend(image1: jax.Array, image2: Image, factor: float) -> Image:
  """`randaugment.blend`: `image1 + factor * (image2 - image1)`, clipped."""
  x1 = image1.astype(jnp.float32)
  out = x1 + _exact(jnp.float32(factor) * (image2.astype(jnp.float32) - x1))
  return jnp.clip(out, 0.0, 255.0).astype(jnp.uint8)


def _lookup(image: Image, tables: jax.Array) -> Image:
  """Per-channel `tables[c][image[..., c]]`; `tables` uint8 `[3, 256]` or
  `[256]`."""
  if tables.ndim == 1:
    return jnp.take(tables, image.astype(jnp.int32), axis=0)
  return jnp.stack([jnp.take(tables[c], image[..., c].astype(jnp.int32),
                             axis=0) for c in range(image.shape[-1])], -1)


def _autocontrast(image: Image) -> Image:
  x = image.reshape(-1, image.shape[-1]).astype(jnp.float32)
  lo, hi = x.min(axis=0)[:, None], x.max(axis=0)[:, None]
  scale = jnp.where(hi > lo, jnp.float32(255.0) / jnp.maximum(hi - lo, 1.0),
                    jnp.float32(1.0))
  offset = jnp.where(hi > lo, -lo * scale, jnp.float32(0.0))
  tables = _exact(jnp.arange(256, dtype=jnp.float32) * scale) + offset
  return _lookup(image, jnp.clip(tables, 0.0, 255.0).astype(jnp.uint8))


def _equalize(image: Image) -> Image:
  pixels = image.shape[0] * image.shape[1]
  tables = []
  for c in range(image.shape[-1]):
    histogram = jnp.zeros(256, jnp.int32).at[
        image[..., c].astype(jnp.int32).ravel()].add(1)
    last = 255 - jnp.argmax(histogram[::-1] > 0)  # The top nonzero bin.
    step = (pixels - histogram[last]) // 255
    lut = (jnp.cumsum(histogram) + step // 2) // jnp.maximum(step, 1)
    table = jnp.clip(jnp.concatenate([jnp.zeros(1, jnp.int32), lut[:-1]]),
                     0, 255)
    tables.append(jnp.where(step == 0, jnp.arange(256), table))
  return _lookup(image, jnp.stack(tables).astype(jnp.uint8))


def _grayscale(image: Image) -> Image:
  luma = ra._TF_LUMA  # pylint: disable=protected-access
  x = image.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  grey = (_exact(x[..., 0] * luma[0]) + _exact(x[..., 1] * luma[1])
          + _exact(x[..., 2] * luma[2]))
  return (grey * jnp.float32(255.5)).astype(jnp.uint8)


def _sharpness(image: Image, factor: float) -> Image:
  x = image.astype(jnp.float32)
  kernel = np.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
  height, width = image.shape[:2]
  smooth = None
  for i in range(3):
    for j in range(3):
      term = _exact(kernel[i, j] * x[i:height - 2 + i, j:width - 2 + j])
      smooth = term if smooth is None else smooth + term
  degenerate = image.at[1:-1, 1:-1].set(
      jnp.clip(smooth, 0.0, 255.0).astype(jnp.uint8))
  return _blend(degenerate, image, factor)


def _contrast_mean_grey(image: Image, factor: float) -> Image:
  grey = image.astype(jnp.float32) @ jnp.asarray(ra._PIL_LUMA)  # pylint: disable=protected-access
  mean = jnp.floor(grey.mean() + 0.5).astype(jnp.uint8)
  return _blend(jnp.full_like(image, mean), image, factor)


def _project(image: Image, index: jax.Array) -> Image:
  height, width, channels = image.shape
  pixels = jnp.concatenate([image.reshape(height * width, channels),
                            jnp.full((1, channels), ra.FILL_VALUE,
                                     image.dtype)])
  return jnp.take(pixels, index.ravel(), axis=0).reshape(image.shape)


def _cutout(image: Image, center: jax.Array, pad_size: int) -> Image:
  rows = jnp.arange(image.shape[0])[:, None]
  cols = jnp.arange(image.shape[1])[None, :]
  row, col = center[0], center[1]
  inside = ((rows >= jnp.maximum(0, row - pad_size)) & (rows < row + pad_size)
            & (cols >= jnp.maximum(0, col - pad_size))
            & (cols < col + pad_size))
  return jnp.where(inside[..., None], jnp.uint8(ra.FILL_VALUE), image)


_Branch = Callable[[Image, jax.Array, jax.Array], Image]


def _branches(height: int, width: int, magnitude: float, mode: str
              ) -> list[_Branch]:
  """`randaugment.OP_NAMES`' ops at `magnitude` on `[height, width]` images,
  as `f(image, negative, center)`, in that order."""
  level = magnitude / ra.MAX_LEVEL
  enhance = ra._enhance(level)  # pylint: disable=protected-access
  values = np.arange(256, dtype=np.uint8)
  # Ops that are a fixed table of the 256 values: the NumPy op's output on
  # them (the same op, element by element).
  fixed_tables = {
      'Invert': ra.invert(values),
      'Posterize': ra.posterize(values, int(level * 4)),
      'Solarize': ra._solarize(values[:, None], level, mode)[:, 0],  # pylint: disable=protected-access
      'SolarizeAdd': ra.solarize_add(values[:, None], int(level * 110))[:, 0],
  }
  geometric = {
      name: jnp.asarray(np.stack([
          ra.geometric_index(name, magnitude, negative, height, width, mode)
          for negative in (False, True)]), jnp.int32)
      for name in ra.SIGNED_OPS}
  pad = int(ra._pixels(level, ra.CUTOUT_PIXELS, min(height, width), mode))  # pylint: disable=protected-access
  contrast_level = ra.contrast_level(height, width)

  def branch(name: str) -> _Branch:
    if name in fixed_tables:
      table = jnp.asarray(fixed_tables[name])
      return lambda image, neg, center: _lookup(image, table)
    if name in geometric:
      index = geometric[name]
      return lambda image, neg, center: _project(image, index[neg.astype(int)])
    ops: dict[str, Callable[[Image, jax.Array], Image]] = {
        'AutoContrast': lambda image, center: _autocontrast(image),
        'Equalize': lambda image, center: _equalize(image),
        'Color': lambda image, center: _blend(
            jnp.repeat(_grayscale(image)[..., None], 3, -1), image, enhance),
        'Contrast': lambda image, center: (
            _blend(jnp.full_like(image, contrast_level), image, enhance)
            if mode == 'official' else _contrast_mean_grey(image, enhance)),
        'Brightness': lambda image, center: _blend(
            jnp.zeros_like(image), image, enhance),
        'Sharpness': lambda image, center: _sharpness(image, enhance),
        'Cutout': lambda image, center: _cutout(image, center, pad),
    }
    op = ops[name]
    return lambda image, neg, center: op(image, center)

  return [branch(name) for name in ra.OP_NAMES]


def randaugment(images: jax.Array, ops: jax.Array, negative: jax.Array,
                centers: jax.Array, *, magnitude: float,
                mode: str = 'official') -> jax.Array:
  """RandAugment of a batch with the host's draws (`randaugment.draw`).

  Args:
    images: uint8 `[N, H, W, 3]`.
    ops, negative, centers: `randaugment.Draws` fields stacked over the
      batch: int32 `[N, L]`, bool `[N, L]`, int32 `[N, L, 2]`.
    magnitude: shared magnitude on the 0-10 scale.
    mode: one of `randaugment.MODES`.

  Returns:
    uint8 `[N, H, W, 3]`: `randaugment.apply_draws` of each image.
  """
  ra.check_mode(mode)
  branches = _branches(images.shape[1], images.shape[2], magnitude, mode)

  def one(args: tuple[jax.Array, ...]) -> Image:
    image, image_ops, image_negative, image_centers = args
    for layer in range(image_ops.shape[0]):
      image = jax.lax.switch(image_ops[layer], branches, image,
                             image_negative[layer], image_centers[layer])
    return image

  return jax.lax.map(one, (images, ops, negative, centers))


def mix(first: jax.Array, second: jax.Array, weights: jax.Array,
        cutmix: jax.Array, boxes: jax.Array) -> jax.Array:
  """`mixing.mix_batch`'s pixels with the host's draws (`mixing.draw`).

  Args:
    first, second: float32 `[B, H, W, C]`: the pairs.
    weights, cutmix, boxes: `mixing.MixDraws` fields.

  Returns:
    float32 `[B, H, W, C]`.
  """
  rows = jnp.arange(first.shape[1])[None, :, None, None]
  cols = jnp.arange(first.shape[2])[None, None, :, None]
  top, bottom, left, right = (boxes[:, k, None, None, None] for k in range(4))
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  w = weights[:, None, None, None]
  blended = (_exact(first * w)
             + _exact(second * (jnp.float32(1.0) - w)))
  return jnp.where(cutmix[:, None, None, None],
                   jnp.where(in_box, first, second), blended)


def normalize(images: jax.Array) -> jax.Array:
  """`preprocessing.normalize`: minus the ImageNet mean, over its std."""
  mean = jnp.asarray(preprocessing.MEAN_RGB, jnp.float32)
  inv_std = jnp.asarray(preprocessing._INV_STD)  # pylint: disable=protected-access
  return (images.astype(jnp.float32) - mean) * inv_std


def augment(batch: dict[str, Any], *, num_layers: int, magnitude: float,
            mode: str = 'official') -> dict[str, jax.Array]:
  """A host batch of `pipeline.TrainBatch(on_device=True)` -> the batch the
  host pipeline would have made (`images` normalized, labels as given).

  Args:
    batch: `images` float32 `[B, H, W, 3]` (resized, 0-255, unclamped);
      with mixing also `images_second`, `mix_weights`, `mix_cutmix`,
      `mix_boxes`; with RandAugment `ra_ops`, `ra_negative`, `ra_centers`;
      and `labels`, `soft_labels`, `mask`, passed through.
    num_layers: RandAugment layers (0: none).
    magnitude, mode: RandAugment's.

  Jit it with the package's compiler options (`cpu.compiler.jit`; the
  train step does) for the host pipeline's exact numbers on CPU.
  """
  images = batch['images']
  if 'images_second' in batch:
    images = mix(images, batch['images_second'], batch['mix_weights'],
                 batch['mix_cutmix'], batch['mix_boxes'])
  if num_layers:
    # RandAugment works on uint8, as the official (clip, then truncate).
    images = randaugment(
        jnp.clip(images, 0.0, 255.0).astype(jnp.uint8), batch['ra_ops'],
        batch['ra_negative'], batch['ra_centers'], magnitude=magnitude,
        mode=mode)
  out = {k: v for k, v in batch.items() if k in ('labels', 'soft_labels',
                                                  'mask')}
  out['images'] = normalize(images)
  return out
