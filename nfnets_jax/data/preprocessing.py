"""Per-image geometry and normalization: bicubic resize, crops, flip.

Mirrors the official NFNet input pipeline (`nfnets/dataset.py` of
google-deepmind/deepmind-research), rewritten in NumPy:

* training: an Inception-style random crop (TF's
  `sample_distorted_bounding_box` with area 8%-100%, aspect 3/4-4/3,
  `min_object_covered=0.1`, 10 attempts, center-crop fallback), a random
  left/right flip, then a bicubic resize to the training size;
* evaluation (`eval_preproc='resize_crop_32'` of the NFNet configs): a bicubic
  resize to `(size + 32, size + 32)` followed by a `size x size` center crop;
* normalization with the ImageNet mean and standard deviation in 0-255 units.

The bicubic resize is TF's `tf.image.resize(..., BICUBIC)`: the Keys kernel
with a = -0.5, half-pixel centers, no antialiasing and no clamping, so float
outputs may overshoot [0, 255] exactly as the official pipeline's do.
"""

import functools
from typing import NamedTuple

import numpy as np
from scipy import sparse

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_MEAN = np.asarray(MEAN_RGB, np.float32)
_INV_STD = 1.0 / np.asarray(STDDEV_RGB, np.float32)

# Keys (1981) cubic convolution parameter used by TF, JAX and PIL.
_KEYS_A = -0.5


class CropWindow(NamedTuple):
  """A crop rectangle in pixels: rows [top, top + height), cols likewise."""
  top: int
  left: int
  height: int
  width: int


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  """The Keys cubic kernel with a = -0.5, evaluated elementwise."""
  x = np.abs(x)
  a = _KEYS_A
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Input indices and weights of the 4 bicubic taps of each output sample.

  Taps that fall outside the input get zero weight and the remaining weights
  are renormalized to sum to one, as TF's half-pixel bicubic kernel does.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    `(taps, weights)`: int64 `[4, out_size]` indices into the input and
    float32 `[4, out_size]` weights.
  """
  centers = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  taps = np.floor(centers).astype(np.int64) + np.arange(-1, 3)[:, None]
  weights = _keys_cubic(centers - taps)
  weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
  weights /= weights.sum(axis=0, keepdims=True)
  return np.clip(taps, 0, in_size - 1), weights.astype(np.float32)


@functools.lru_cache(maxsize=256)
def _resize_matrix(in_size: int, out_size: int, channels: int = 1,
                   mirror: bool = False) -> sparse.csr_matrix:
  """The resampling as a sparse float32 `[out * C, in * C]` matrix.

  Row `o * C + c` holds output sample `o`'s 4 taps of channel `c` in the
  taps' order (a clipped tap repeats its neighbour's column with weight 0),
  so each output is summed exactly as `sum_k weight_k * input[tap_k]`.
  `mirror`: the taps read the input reversed (`in - 1 - tap`), which is
  resampling the flipped input, the same sums, without copying it.
  Built straight into CSR form (no sorting): crops of random sizes miss the
  cache.
  """
  taps, weights = _resize_taps(in_size, out_size)
  if mirror:
    taps = in_size - 1 - taps
  offsets = np.arange(channels)[None, :, None]
  indices = taps.T[:, None, :] * channels + offsets  # [out, C, 4]
  data = np.broadcast_to(weights.T[:, None, :], indices.shape)
  rows = out_size * channels
  return sparse.csr_matrix(
      (data.ravel(), indices.ravel(), np.arange(0, 4 * rows + 1, 4)),
      shape=(rows, in_size * channels))


def resize_bicubic(image: np.ndarray, height: int, width: int, *,
                   flip: bool = False) -> np.ndarray:
  """Resizes images with TF's non-antialiased half-pixel bicubic kernel.

  Each axis is one sparse matrix product (`_resize_matrix`, 4 taps per
  output sample): 7x quicker than gathering the taps, same float32 sums.

  Args:
    image: `[..., H, W, C]` array of any real dtype (e.g. uint8 0-255).
    height: output height in pixels.
    width: output width in pixels.
    flip: resize `image[..., ::-1, :]` (left-right flipped), the same
      numbers without converting a reversed view (10x slower than a
      contiguous one).

  Returns:
    float32 `[..., height, width, C]`, unclamped (overshoots beyond the input
    range are kept, as in the official pipeline).
  """
  x = np.asarray(image, np.float32)
  *lead, in_height, in_width, channels = x.shape
  x = x.reshape(-1, in_height, in_width * channels)
  if in_height != height:  # Rows: [H, N * W * C] -> [height, N * W * C].
    columns = x.transpose(1, 0, 2).reshape(in_height, -1)
    x = (_resize_matrix(in_height, height) @ columns).reshape(
        height, -1, in_width * channels).transpose(1, 0, 2)
  if in_width != width or flip:  # Columns, channels interleaved.
    x = (_resize_matrix(in_width, width, channels, flip) @ x.reshape(
        -1, in_width * channels).T).T
  return np.ascontiguousarray(x).reshape(*lead, height, width, channels)


def crop(image: np.ndarray, window: CropWindow) -> np.ndarray:
  """Returns `image[top:top + height, left:left + width]` of a `[H, W, C]`."""
  return image[window.top:window.top + window.height,
               window.left:window.left + window.width]


def center_crop_window(image_height: int, image_width: int, image_size: int,
                       padding: int) -> CropWindow:
  """The official training fallback crop: center, aspect kept, padded.

  Takes the largest centered crop with the output's (square) aspect such that
  resizing it to `image_size` matches resizing the whole short edge to
  `image_size + padding` (i.e. a crop of `image_size / (image_size + padding)`
  of the short edge).

  Args:
    image_height: source height in pixels.
    image_width: source width in pixels.
    image_size: the output side in pixels.
    padding: pixels of margin (32 in the paper).

  Returns:
    The crop window.
  """
  scale = min(image_height / (image_size + padding),
              image_width / (image_size + padding))
  height = max(1, int(scale * image_size))
  width = max(1, int(scale * image_size))
  return CropWindow(top=(image_height - height + 1) // 2,
                    left=(image_width - width + 1) // 2,
                    height=height, width=width)


def sample_crop_window(image_height: int, image_width: int,
                       rng: np.random.Generator, *,
                       area_range: tuple[float, float] = (0.08, 1.0),
                       aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                       min_object_covered: float = 0.1,
                       max_attempts: int = 10) -> CropWindow | None:
  """Samples an Inception-style crop like TF's `sample_distorted_bounding_box`.

  Per attempt: the aspect ratio (width / height) is uniform in its range; the
  height is a uniform integer between the heights giving the smallest and the
  largest allowed area at that aspect; the crop must fit inside the image and
  cover at least `max(area_range[0], min_object_covered)` of it (the object is
  the whole image); its position is uniform.

  Args:
    image_height: source height in pixels.
    image_width: source width in pixels.
    rng: NumPy random generator.
    area_range: allowed crop area as a fraction of the image area.
    aspect_ratio_range: allowed width / height of the crop.
    min_object_covered: minimal fraction of the image the crop must cover.
    max_attempts: attempts before giving up.

  Returns:
    The crop window, or None when every attempt failed (the caller falls back
    to `center_crop_window`, as the official code does).
  """
  area = image_height * image_width
  min_area = max(area_range[0], min_object_covered) * area
  max_area = area_range[1] * area
  for _ in range(max_attempts):
    aspect = rng.uniform(*aspect_ratio_range)
    low = int(np.ceil(np.sqrt(min_area / aspect)))
    high = int(np.floor(np.sqrt(max_area / aspect)))
    high = min(high, image_height, int(image_width / aspect))
    if low > high:
      continue
    height = int(rng.integers(low, high + 1))
    width = int(round(height * aspect))
    if not (min_area <= height * width <= max_area and width <= image_width):
      continue
    top = int(rng.integers(0, image_height - height + 1))
    left = int(rng.integers(0, image_width - width + 1))
    return CropWindow(top, left, height, width)
  return None


def train_crop_flip_resize(image: np.ndarray, image_size: int,
                           rng: np.random.Generator, *, random_crop: bool,
                           flip: bool, crop_padding: int) -> np.ndarray:
  """Official training geometry: random crop, random flip, bicubic resize.

  Args:
    image: uint8 `[H, W, 3]` source image.
    image_size: output side in pixels.
    rng: NumPy random generator (consumed in a fixed order: crop, flip).
    random_crop: whether to take an Inception-style random crop; otherwise the
      whole image is resized.
    flip: whether to flip left/right with probability 1/2.
    crop_padding: padding of the center-crop fallback (32 in the paper).

  Returns:
    float32 `[image_size, image_size, 3]` in 0-255 units (unclamped).
  """
  if random_crop:
    window = sample_crop_window(image.shape[0], image.shape[1], rng)
    if window is None:
      window = center_crop_window(image.shape[0], image.shape[1], image_size,
                                  crop_padding)
    image = crop(image, window)
  flipped = flip and rng.random() < 0.5
  return resize_bicubic(image, image_size, image_size, flip=flipped)


def eval_resize_crop(image: np.ndarray, image_size: int, padding: int,
                     keep_aspect: bool = False) -> np.ndarray:
  """Official evaluation geometry (`resize_crop_32`): resize, center crop.

  The image is resized (aspect not kept, as the official code does) to
  `(image_size + padding)` on both sides, then the central
  `image_size x image_size` window is kept. With `keep_aspect` the shorter
  side is resized to `image_size + padding` and the longer one in proportion
  (truncated, as torchvision's `Resize(int)`): timm's default eval crop
  (`crop_mode='center'`); the official one is timm's 'squash'.

  Args:
    image: `[H, W, 3]` source image.
    image_size: output side in pixels.
    padding: extra pixels before cropping (32 in the paper; 0 = plain resize).
    keep_aspect: keep the aspect ratio when resizing (see above).

  Returns:
    float32 `[image_size, image_size, 3]` in 0-255 units (unclamped).
  """
  side = height = width = image_size + padding
  if keep_aspect:
    h, w = image.shape[:2]
    if h < w:
      width = int(side * w / h)
    else:
      height = int(side * h / w)
  image = resize_bicubic(image, height, width)
  return crop(image, CropWindow((height - image_size + 1) // 2,
                                (width - image_size + 1) // 2,
                                image_size, image_size))


def normalize(images: np.ndarray) -> np.ndarray:
  """Subtracts the ImageNet mean and divides by its std (0-255 units).

  Args:
    images: `[..., 3]` array in 0-255 units.

  Returns:
    float32 array of the same shape.
  """
  out = np.array(images, np.float32)  # One copy, then in place.
  out -= _MEAN
  out *= _INV_STD
  return out
