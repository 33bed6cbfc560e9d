"""The grain pipeline: shard, shuffle, preprocess, batch, mix, augment.

Training (per host, on its own contiguous shard of the split): a stream of
examples reshuffled every epoch is cut into batches (2B examples when
mixing); per example: random crop, flip, bicubic resize; then over the batch
mixup / CutMix, RandAugment per image, normalization. This is the official
NFNet order (`augment_before_mix=False` in `experiment_nfnets.py`).

Evaluation: every example exactly once over all hosts, in order: resize to
`image_size + eval_crop_padding`, center crop, normalize; the last batches are
padded (`mask` 0) so that every host yields the same number of batches.

grain sees one element per batch (`ExampleBatches`), so its per-element
overhead is paid once per batch. Every random draw comes from grain's
per-index generator of that batch, seeded from `seed` and `shard_index`, so
batches are a pure function of the seed and the position: the iterator's
`get_state()` is all a checkpoint needs.
"""

import dataclasses
import sys
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from nfnets_jax.data import mixing
from nfnets_jax.data import preprocessing
from nfnets_jax.data import randaugment
from nfnets_jax.data import sources

# In-process read-ahead: batches prepared by a small thread pool.
_READ_THREADS = 2
_READ_AHEAD_BATCHES = 4
# Independent random streams derived from (seed, shard_index).
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Augment:
  """Parsed training augmentation (see `parse_augment`)."""
  random_crop: bool = False
  flip: bool = False
  randaugment_layers: int = 0
  randaugment_magnitude: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  randaugment_mode: str = 'official'
  on_device: bool = False

  @property
  def mixing(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def parse_augment(config: ml_collections.ConfigDict | None) -> Augment:
  """Reads the `augment` ConfigDict; None means no augmentation.

  Args:
    config: fields `random_crop: bool`, `flip: bool`, `mixup_alpha: float`
      (0 = off), `cutmix_alpha: float` (0 = off), and RandAugment either as
      `randaugment: {num_layers: int, magnitude: float, mode: str} | None`
      or as the flat `randaugment_layers: int`, `randaugment_magnitude:
      float`, `randaugment_mode: str` (0 layers = off; the mode is one of
      `randaugment.MODES`, default 'official'); optional `on_device: bool`
      (default False): MixUp/CutMix, RandAugment and normalization run in
      the train step (`TrainBatch`).

  Returns:
    The parsed `Augment`.

  Raises:
    ValueError: for missing fields, negative values or an unknown mode.
  """
  if config is None:
    return Augment()
  fields = ['random_crop', 'flip', 'mixup_alpha', 'cutmix_alpha']
  fields += (['randaugment'] if 'randaugment' in config
             else ['randaugment_layers', 'randaugment_magnitude'])
  missing = [f for f in fields if f not in config]
  if missing:
    raise ValueError(f'augment config lacks {missing}; it needs {fields}.')
  mode_field, mode = 'randaugment_mode', 'official'
  if 'randaugment' not in config:
    layers, magnitude = (config.randaugment_layers,
                         config.randaugment_magnitude)
    mode = config.get('randaugment_mode', mode)
  elif config.randaugment is None:
    layers, magnitude = 0, 0.0
  else:
    layers, magnitude = (config.randaugment.num_layers,
                         config.randaugment.magnitude)
    mode_field, mode = 'randaugment.mode', config.randaugment.get('mode', mode)
  if mode not in randaugment.MODES:
    raise ValueError(f'augment.{mode_field}={mode!r} is invalid; allowed: '
                     + ' or '.join(map(repr, randaugment.MODES)) + '.')
  augment = Augment(bool(config.random_crop), bool(config.flip), int(layers),
                    float(magnitude), float(config.mixup_alpha),
                    float(config.cutmix_alpha), mode,
                    bool(config.get('on_device', False)))
  if min(augment.randaugment_layers, augment.randaugment_magnitude,
         augment.mixup_alpha, augment.cutmix_alpha) < 0:
    raise ValueError(f'augment values must be >= 0, got {augment}.')
  return augment


def shard_range(num_examples: int, shard_index: int,
                shard_count: int) -> tuple[int, int]:
  """Contiguous `[start, stop)` of shard `shard_index` (sizes differ <= 1)."""
  return (shard_index * num_examples // shard_count,
          (shard_index + 1) * num_examples // shard_count)


def _derive_seed(seed: int, shard_index: int, stream: int) -> int:
  """A 32-bit seed for one random stream of one host."""
  return int(np.random.SeedSequence([seed, shard_index, stream])
             .generate_state(1)[0])


class ExampleBatches:
  """Random access to batches: lists of examples of a shuffled, repeated stream.

  Batch `b` holds the stream positions `[b * n, (b + 1) * n)`; position `p`
  is example `permutation_e[p % N]` of epoch `e = p // N`, with a fresh
  permutation per epoch drawn from `(shuffle_seed, e)` (identity when not
  shuffling). Batches thus span epoch boundaries, as `shuffle -> repeat ->
  batch(drop_remainder=True)` would, but grain's per-example overhead is paid
  once per batch.
  """

  def __init__(self, examples: sources.RandomAccessSource, batch_size: int,
               num_batches: int, shuffle_seed: int | None):
    """Builds the batch view.

    Args:
      examples: the host's examples (N = `len(examples)`).
      batch_size: examples per batch (n).
      num_batches: number of batches (`sys.maxsize` for endless).
      shuffle_seed: seed of the per-epoch permutations; None keeps order.
    """
    self._examples = examples
    self._batch_size = batch_size
    self._num_batches = num_batches
    self._shuffle_seed = shuffle_seed
    # The last epochs' permutations; replaced, never mutated (threads).
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._num_batches

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      rng = np.random.default_rng([self._shuffle_seed, epoch])
      permutation = rng.permutation(len(self._examples))
      recent = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
      self._permutations = {**recent, epoch: permutation}
    return permutation

  def __getitem__(self, index: int) -> list[Mapping[str, np.ndarray]]:
    start = index * self._batch_size
    epochs, offsets = np.divmod(
        np.arange(start, start + self._batch_size), len(self._examples))
    if self._shuffle_seed is not None:
      for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        offsets[in_epoch] = self._permutation(int(epoch))[offsets[in_epoch]]
    return [self._examples[int(o)] for o in offsets]


@dataclasses.dataclass(frozen=True)
class TrainBatch:
  """grain random map: a list of examples -> one augmented training batch.

  Per example: random crop, flip, bicubic resize; then mixup / CutMix over
  the batch (2B examples -> B), RandAugment per image, normalization.

  With `augment.on_device`, the host stops after the resize and draws the
  rest's random choices (same generator, same order): the batch holds the
  resized float32 `images` (with mixing, the pairs' first halves, and
  `images_second`), the draws (`mix_weights`, `mix_cutmix`, `mix_boxes`;
  `ra_ops`, `ra_negative`, `ra_centers`), the final `labels` and
  `soft_labels`; `data.device_augment.augment` turns it into the batch the
  host would have made, inside the train step.
  """
  image_size: int
  augment: Augment
  num_classes: int
  crop_padding: int

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    images = np.stack([
        preprocessing.train_crop_flip_resize(
            example['image'], self.image_size, rng,
            random_crop=self.augment.random_crop, flip=self.augment.flip,
            crop_padding=self.crop_padding)
        for example in examples])
    labels = np.asarray([example['label'] for example in examples], np.int32)
    if self.augment.on_device:
      return self._draws(images, labels, rng)
    if self.augment.mixing:
      images, soft_labels, labels = mixing.mix_batch(
          images, labels, self.num_classes, rng,
          mixup_alpha=self.augment.mixup_alpha,
          cutmix_alpha=self.augment.cutmix_alpha)
    else:
      soft_labels = mixing.one_hot(labels, self.num_classes)
    if self.augment.randaugment_layers > 0:
      # RandAugment works on uint8, as the official (clip, then truncate).
      images = np.stack([
          randaugment.randaugment(
              np.clip(image, 0.0, 255.0).astype(np.uint8),
              self.augment.randaugment_layers,
              self.augment.randaugment_magnitude, rng,
              self.augment.randaugment_mode)
          for image in images])
    return {'images': preprocessing.normalize(images), 'labels': labels,
            'soft_labels': soft_labels,
            'mask': np.ones(len(labels), np.float32)}

  def _draws(self, images: np.ndarray, labels: np.ndarray,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The `on_device` batch: resized images and the random draws."""
    a, (height, width) = self.augment, images.shape[1:3]
    if a.mixing:
      size = len(images) // 2
      draws = mixing.draw(size, height, width, rng,
                          mixup_alpha=a.mixup_alpha,
                          cutmix_alpha=a.cutmix_alpha)
      soft_labels, labels = mixing.soft_labels(labels, self.num_classes,
                                               draws.weights)
      batch = {'images': images[:size], 'images_second': images[size:],
               'mix_weights': draws.weights, 'mix_cutmix': draws.cutmix,
               'mix_boxes': draws.boxes}
    else:
      soft_labels = mixing.one_hot(labels, self.num_classes)
      batch = {'images': images}
    if a.randaugment_layers > 0:
      draws = [randaugment.draw(a.randaugment_layers, height, width, rng)
               for _ in range(len(labels))]
      batch.update(ra_ops=np.stack([d.ops for d in draws]),
                   ra_negative=np.stack([d.negative for d in draws]),
                   ra_centers=np.stack([d.centers for d in draws]))
    return {**batch, 'labels': labels, 'soft_labels': soft_labels,
            'mask': np.ones(len(labels), np.float32)}


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """grain map: a list of examples -> one evaluation batch.

  Per example: resize to `image_size + crop_padding`, center crop; then
  normalization; padding examples keep their mask of 0.
  """
  image_size: int
  num_classes: int
  crop_padding: int

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
    images = np.stack([
        preprocessing.eval_resize_crop(example['image'], self.image_size,
                                       self.crop_padding)
        for example in examples])
    labels = np.asarray([example['label'] for example in examples], np.int32)
    return {'images': preprocessing.normalize(images), 'labels': labels,
            'soft_labels': mixing.one_hot(labels, self.num_classes),
            'mask': np.asarray([example['mask'] for example in examples],
                               np.float32)}


def _check_args(batch_size: int, image_size: int, seed: int, shard_index: int,
                shard_count: int, eval_crop_padding: int, num_workers: int,
                num_epochs: int | None, is_training: bool) -> None:
  """Raises ValueError for out-of-range arguments of `load`."""
  checks = {
      'batch_size': batch_size >= 1, 'image_size': image_size >= 1,
      'seed': seed >= 0, 'shard_count': shard_count >= 1,
      'shard_index': 0 <= shard_index < shard_count,
      'eval_crop_padding': eval_crop_padding >= 0,
      'num_workers': num_workers >= 0,
      'num_epochs': (num_epochs is None or num_epochs >= 1) and (
          is_training or num_epochs in (None, 1)),
  }
  bad = [name for name, ok in checks.items() if not ok]
  if bad:
    values = {'batch_size': batch_size, 'image_size': image_size,
              'seed': seed, 'shard_index': shard_index,
              'shard_count': shard_count,
              'eval_crop_padding': eval_crop_padding,
              'num_workers': num_workers, 'num_epochs': num_epochs}
    raise ValueError(
        f'load: invalid {", ".join(f"{b}={values[b]!r}" for b in bad)}; '
        'need batch_size, image_size, shard_count >= 1, seed, '
        'eval_crop_padding, num_workers >= 0, 0 <= shard_index < '
        'shard_count, num_epochs None or >= 1 (None or 1 for eval).')


def load(split: sources.Split, *, dataset: str, batch_size: int,
         image_size: int, is_training: bool, seed: int, shard_index: int = 0,
         shard_count: int = 1,
         augment: ml_collections.ConfigDict | None = None,
         eval_crop_padding: int = 32, num_workers: int = 0,
         num_epochs: int | None = None,
         data_dir: str | None = None) -> grain.DatasetIterator:
  """Returns an iterator over this host's batches of `split`.

  Each batch is a dict of NumPy arrays:
    `images` float32 `[B, image_size, image_size, 3]`, normalized with the
      ImageNet mean/std (0-255 units);
    `labels` int32 `[B]`: the label, or the larger share's label when mixed;
    `soft_labels` float32 `[B, num_classes]`: one-hot, mixed by mixup/CutMix
      (no label smoothing: the loss applies it);
    `mask` float32 `[B]`: 1 for real examples, 0 for eval padding (all ones
      in training).

  Args:
    split: which split to read.
    dataset: `'digits'`, `'image_folder'` or a TFDS image-classification
      name.
    batch_size: per-host batch size B.
    image_size: output side in pixels.
    is_training: training preprocessing, shuffling and augmentation (and
      endless repetition unless `num_epochs`) versus one ordered eval pass.
    seed: non-negative seed of all shuffling and augmentation.
    shard_index: this host's index (`jax.process_index()`).
    shard_count: number of hosts (`jax.process_count()`).
    augment: training augmentation fields (see `parse_augment`); None = none.
      Ignored in evaluation. With mixing on, each batch consumes 2B examples.
    eval_crop_padding: evaluation resizes to `image_size + eval_crop_padding`
      then center-crops (32 as the paper; use 0 for tiny images such as the
      digits, whose content reaches the border). Also the padding of the
      training crop's center-crop fallback.
    num_workers: grain worker processes (0: in-process). Outside
      `absl.app.run` the calling script needs an `if __name__ == '__main__'`
      guard; absl flags are marked parsed here if they are not yet.
    num_epochs: training epochs before the iterator ends (None: endless).
      Evaluation is always one pass (None or 1).
    data_dir: TFDS data directory (None: TFDS's default), or the folder of
      class folders for `'image_folder'`.

  Returns:
    A grain `DatasetIterator`; `get_state()` / `set_state(state)` save and
    restore the position (a small JSON-serializable dict).

  Raises:
    ValueError: for an unknown or unprepared dataset (before any compute),
      bad augment fields or out-of-range arguments.
    ImageDecodeError: (from `next`) an image file that cannot be decoded,
      naming its path.
  """
  _check_args(batch_size, image_size, seed, shard_index, shard_count,
              eval_crop_padding, num_workers, num_epochs, is_training)
  aug = parse_augment(augment) if is_training else Augment()
  opened = sources.open_split(dataset, split, image_size, data_dir)
  num_examples = opened.range.num_examples
  start, stop = shard_range(num_examples, shard_index, shard_count)
  if is_training:
    length = stop - start
  else:
    largest_shard = -(-num_examples // shard_count)
    length = -(-largest_shard // batch_size) * batch_size
  view = sources.ShardView(opened.source, opened.range.start + start,
                           opened.range.start + stop, length,
                           opened.image_key, opened.label_key)
  num_classes = opened.info.num_classes
  if is_training:
    if stop - start < 1:
      raise ValueError(f'load: shard {shard_index} of {shard_count} of '
                       f'{split} of {dataset!r} has no examples.')
    per_batch = 2 * batch_size if aug.mixing else batch_size
    num_batches = (sys.maxsize if num_epochs is None
                   else (stop - start) * num_epochs // per_batch)
    batches = ExampleBatches(
        view, per_batch, num_batches,
        shuffle_seed=_derive_seed(seed, shard_index, _SHUFFLE_STREAM))
    ds = grain.MapDataset.source(batches).random_map(
        TrainBatch(image_size, aug, num_classes, eval_crop_padding),
        seed=_derive_seed(seed, shard_index, _AUGMENT_STREAM))
  else:
    batches = ExampleBatches(view, batch_size, length // batch_size,
                             shuffle_seed=None)
    ds = grain.MapDataset.source(batches).map(
        EvalBatch(image_size, num_classes, eval_crop_padding))
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD_BATCHES))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; mark them parsed when a script runs
      # outside absl.app.run (e.g. under pytest).
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_ds)
