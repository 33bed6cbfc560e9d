"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on host batches.

Mirrors the official NFNet pipeline (`my_mixup`, `my_cutmix`,
`my_mixup_cutmix` of `nfnets/dataset.py`): a batch of `2 * B` examples gives
`B` mixed examples, output `i` mixing example `i` with example `B + i`; each
pair draws its own ratio. With both methods on, the first `B // 2` outputs use
mixup and the rest cutmix. The official CutMix draws the kept area uniformly,
i.e. `Beta(1, 1)`: `cutmix_alpha=1.0` reproduces it.
"""

from typing import NamedTuple

import numpy as np


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 `[B, num_classes]` one-hot rows for int `labels` `[B]`."""
  return np.eye(num_classes, dtype=np.float32)[labels]


def cutmix_box(height: int, width: int, kept_fraction: float,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
  """The CutMix box of the official `cutmix_padding`.

  A box with sides `sqrt(1 - kept_fraction)` times the image's, centered at a
  uniformly random pixel and clipped to the image.

  Args:
    height: image height in pixels.
    width: image width in pixels.
    kept_fraction: nominal fraction of the image outside the box, in [0, 1].
    rng: NumPy generator for the box center.

  Returns:
    `(top, bottom, left, right)`: rows `top:bottom`, columns `left:right`.
  """
  center_y = int(rng.integers(height))
  center_x = int(rng.integers(width))
  side_ratio = np.sqrt(1.0 - kept_fraction)
  half_h = int(side_ratio * height) // 2
  half_w = int(side_ratio * width) // 2
  return (max(0, center_y - half_h), min(height, center_y + half_h),
          max(0, center_x - half_w), min(width, center_x + half_w))


def box_mask(height: int, width: int, box: tuple[int, int, int, int]
             ) -> np.ndarray:
  """float32 `[height, width, 1]`: 1 inside `box` (`cutmix_box`), 0 outside.
  Its mean is the exact label weight of the image pasted inside the box."""
  top, bottom, left, right = box
  mask = np.zeros((height, width, 1), np.float32)
  mask[top:bottom, left:right] = 1.0
  return mask


class MixDraws(NamedTuple):
  """What `mix_batch` draws for `B` pairs (`draw`).

  Attributes:
    weights: float32 `[B]`: the first image's share (mixup's ratio, or the
      CutMix box's area fraction).
    cutmix: bool `[B]`: CutMix (else mixup) for each pair.
    boxes: int32 `[B, 4]`: CutMix's `(top, bottom, left, right)`, all 0 for
      mixup pairs.
  """
  weights: np.ndarray
  cutmix: np.ndarray
  boxes: np.ndarray


def _check(size: int, mixup_alpha: float, cutmix_alpha: float) -> None:
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0.')
  if size % 2:
    raise ValueError(f'mix_batch needs an even batch, got {size}.')


def draw(size: int, height: int, width: int, rng: np.random.Generator, *,
         mixup_alpha: float, cutmix_alpha: float) -> MixDraws:
  """The draws of `mix_batch` for `size` pairs of `[height, width]` images
  (consumes `rng` as it does; `data.device_augment` mixes with them).

  Raises:
    ValueError: if both alphas are 0.
  """
  _check(2 * size, mixup_alpha, cutmix_alpha)
  if mixup_alpha <= 0:
    num_mixup = 0
  elif cutmix_alpha <= 0:
    num_mixup = size
  else:
    num_mixup = size // 2
  weights = np.empty(size, np.float32)
  boxes = np.zeros((size, 4), np.int32)
  for i in range(size):
    if i < num_mixup:
      weights[i] = rng.beta(mixup_alpha, mixup_alpha)
    else:
      boxes[i] = cutmix_box(height, width,
                            rng.beta(cutmix_alpha, cutmix_alpha), rng)
      weights[i] = box_mask(height, width, boxes[i]).mean()
  return MixDraws(weights, np.arange(size) >= num_mixup, boxes)


def soft_labels(labels: np.ndarray, num_classes: int, weights: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Mixed soft labels and the dominant label of `B` pairs.

  Args:
    labels: int `[2B]`: pair `i` is examples `i` and `B + i`.
    num_classes: classes of the soft labels.
    weights: float32 `[B]`: the first example's share.

  Returns:
    `(soft_labels [B, num_classes] float32, labels [B] int32)`, the label of
    the larger share (the first example's on a tie).
  """
  size = len(weights)
  w = weights[:, None]
  soft = (w * one_hot(labels[:size], num_classes)
          + (1.0 - w) * one_hot(labels[size:], num_classes))
  dominant = np.where(weights >= 0.5, labels[:size], labels[size:])
  return soft.astype(np.float32), dominant.astype(np.int32)


def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int,
              rng: np.random.Generator, *, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mixes a batch of `2 * B` examples into `B` (official pairing).

  Output `i` is `w_i * first_i + (1 - w_i) * second_i` (per pixel for CutMix,
  where the box holds `first_i`), with `first = images[:B]`,
  `second = images[B:]`, and soft labels mixed with the same `w_i`: the mixup
  ratio `w_i ~ Beta(mixup_alpha, mixup_alpha)` or the CutMix box's area
  fraction.

  Args:
    images: float32 `[2B, H, W, C]`.
    labels: int `[2B]`.
    num_classes: number of classes of the soft labels.
    rng: NumPy generator.
    mixup_alpha: Beta parameter of mixup; 0 disables mixup.
    cutmix_alpha: Beta parameter of CutMix's kept area; 0 disables CutMix.

  Returns:
    `(images [B, H, W, C] float32, soft_labels [B, num_classes] float32,
    labels [B] int32)` where `labels` is the label of the larger share
    (the first example's on a tie).

  Raises:
    ValueError: if both alphas are 0 or the batch size is odd.
  """
  _check(len(images), mixup_alpha, cutmix_alpha)
  size = len(images) // 2
  first, second = images[:size], images[size:]
  draws = draw(size, images.shape[1], images.shape[2], rng,
               mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
  mixed = np.empty((size,) + images.shape[1:], np.float32)
  for i in range(size):
    w = draws.weights[i]
    if draws.cutmix[i]:  # The box holds the first image: no arithmetic.
      mask = box_mask(images.shape[1], images.shape[2], draws.boxes[i])
      np.copyto(mixed[i], np.where(mask > 0, first[i], second[i]))
    else:  # w * first + (1 - w) * second, in float32.
      np.multiply(first[i], w, out=mixed[i])
      mixed[i] += second[i] * (np.float32(1.0) - w)
  return (mixed, *soft_labels(labels, num_classes, draws.weights))
