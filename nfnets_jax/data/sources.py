"""Where examples come from: split table, dataset metadata, random access.

Three kinds of dataset:

* `'digits'`: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  10 classes), split once with a fixed seed, stratified, into 1,437 train and
  360 test images; VALID is the test split and TRAIN_AND_VALID the train split
  (there is no separate validation set). Nothing is downloaded, and
  scikit-learn is not imported (`read_digits`, `stratified_split`).
* any TFDS image-classification dataset prepared in `data_dir` in the
  `array_record` format, read with `tfds.data_source` (no TensorFlow).
* `'image_folder'`: a folder `data_dir` of class folders, decoded with PIL
  on read (see `image_folder`). As for the digits, VALID is the evaluation
  set (a 10% per-class holdout, or the val/ folder), TEST likewise (the
  test/ folder if there is one), and TRAIN_AND_VALID = TRAIN.

How `Split` maps onto TFDS splits (the official NFNet convention for ImageNet,
a 10% holdout of 'train' otherwise):

| Split           | imagenet2012     | other TFDS datasets            |
|-----------------|------------------|--------------------------------|
| TRAIN           | train[10000:]    | train[n // 10:]                |
| VALID           | train[:10000]    | train[:n // 10]                |
| TRAIN_AND_VALID | train            | train                          |
| TEST            | validation       | test (validation if no test)   |
"""

import dataclasses
import enum
import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np
import tensorflow_datasets as tfds

from nfnets_jax.data import image_folder
from nfnets_jax.data import preprocessing

# The config field that names the dataset, quoted in error messages.
DATASET_FIELD = 'config.dataset.name'
DIGITS = 'digits'
DIGITS_NUM_EXAMPLES = 1797
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0
# Official ImageNet holdout: VALID = the first 10,000 'train' examples.
_HOLDOUT = {'imagenet2012': 10_000}
# ImageNet's labelled held-out set is TFDS 'validation'.
_TEST_BASE = {'imagenet2012': 'validation'}
_TFDS_BASE_SPLITS = ('train', 'validation', 'test')


class Split(enum.Enum):
  """A dataset split, in the official NFNet convention (see module doc)."""
  TRAIN = 1
  TRAIN_AND_VALID = 2
  VALID = 3
  TEST = 4

  @classmethod
  def from_string(cls, name: str) -> 'Split':
    """Parses 'train', 'train_and_valid', 'valid'/'validation' or 'test'."""
    table = {'TRAIN': cls.TRAIN, 'TRAIN_AND_VALID': cls.TRAIN_AND_VALID,
             'VALID': cls.VALID, 'VALIDATION': cls.VALID, 'TEST': cls.TEST}
    if name.upper() not in table:
      raise ValueError(f'Unknown split {name!r}; known: {sorted(table)}.')
    return table[name.upper()]

  def num_examples(self, dataset: str, data_dir: str | None = None) -> int:
    """Number of examples of this split of `dataset` (see `dataset_info`)."""
    return dataset_info(dataset, data_dir).splits[self].num_examples

  def tfds_split(self, dataset: str, data_dir: str | None = None) -> str:
    """This split in TFDS slicing notation, e.g. 'train[10000:1281167]'."""
    return dataset_info(dataset, data_dir).splits[self].spec


@dataclasses.dataclass(frozen=True)
class SplitRange:
  """Examples `[start, stop)` of the base split `base`."""
  base: str
  start: int
  stop: int

  @property
  def num_examples(self) -> int:
    return self.stop - self.start

  @property
  def spec(self) -> str:
    return f'{self.base}[{self.start}:{self.stop}]'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset.

  Attributes:
    name: the dataset name as given.
    num_classes: number of label classes.
    image_shape: stored image shape `(H, W, C)`; None for varying sides.
    splits: where each `Split` lives in the base splits.
    class_names: label names by index, where the dataset has them here
      (image folders); None otherwise.
  """
  name: str
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  splits: Mapping[Split, SplitRange]
  class_names: tuple[str, ...] | None = None

  @property
  def num_examples(self) -> dict[Split, int]:
    """Examples per split."""
    return {split: r.num_examples for split, r in self.splits.items()}


class RandomAccessSource(Protocol):
  """What grain reads: a length and examples by index."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...


def _split_table(base_sizes: Mapping[str, int], holdout: int,
                 test_base: str) -> dict[Split, SplitRange]:
  """The `Split` -> range table from the base split sizes."""
  num_train = base_sizes['train']
  holdout = min(holdout, num_train)
  return {
      Split.TRAIN: SplitRange('train', holdout, num_train),
      Split.VALID: SplitRange('train', 0, holdout),
      Split.TRAIN_AND_VALID: SplitRange('train', 0, num_train),
      Split.TEST: SplitRange(test_base, 0, base_sizes[test_base]),
  }


def _digits_info() -> DatasetInfo:
  num_train = DIGITS_NUM_EXAMPLES - DIGITS_NUM_TEST
  train = SplitRange('train', 0, num_train)
  test = SplitRange('test', 0, DIGITS_NUM_TEST)
  return DatasetInfo(
      name=DIGITS, num_classes=10, image_shape=(8, 8, 1),
      splits={Split.TRAIN: train, Split.TRAIN_AND_VALID: train,
              Split.VALID: test, Split.TEST: test})


def _image_folder_info(data_dir: str | None) -> DatasetInfo:
  folder = image_folder.scan(data_dir)
  size = {base: len(paths) for base, (paths, _) in folder.bases.items()}
  train = SplitRange('train', 0, size['train'])
  return DatasetInfo(
      name=image_folder.IMAGE_FOLDER, num_classes=len(folder.class_names),
      image_shape=(None, None, 3),
      splits={Split.TRAIN: train, Split.TRAIN_AND_VALID: train,
              Split.VALID: SplitRange('valid', 0, size['valid']),
              Split.TEST: SplitRange('test', 0, size['test'])},
      class_names=folder.class_names)


def _unknown_dataset_error(dataset: str, reason: str) -> ValueError:
  return ValueError(
      f'{DATASET_FIELD}={dataset!r} is not a known dataset; known: '
      f"{DIGITS!r} (embedded, no download), {image_folder.IMAGE_FOLDER!r} "
      "(class folders in config.dataset.data_dir) or the name of a TFDS "
      "image-classification dataset such as 'imagenet2012', 'cifar10' or "
      f"'mnist' (see tfds.list_builders()). TFDS said: {reason}")


def _not_prepared_error(dataset: str, data_dir: str | None,
                        location: str) -> ValueError:
  return ValueError(
      f'{DATASET_FIELD}={dataset!r}: no prepared TFDS data for {dataset!r} '
      f'in data_dir={data_dir!r} (looked in {location}). Nothing is '
      'downloaded at training time: prepare it beforehand in the array_record '
      f'format, e.g. `tfds build {dataset} --data_dir=<data_dir> '
      '--file_format=array_record` (imagenet2012 needs its manual download '
      'in <data_dir>/downloads/manual).')


def _tfds_builder(dataset: str, data_dir: str | None) -> Any:
  """The TFDS builder, or the unknown-dataset ValueError."""
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  # Unknown names raise DatasetNotFoundError (a ValueError), malformed names
  # ValueError, unknown versions AssertionError.
  except (ValueError, AssertionError) as e:
    raise _unknown_dataset_error(dataset,
                                 str(e).strip().split('\n')[0]) from e


def _tfds_keys(dataset: str, builder: Any) -> tuple[str, str]:
  """The (image, label) feature names of an image-classification builder."""
  keys = builder.info.supervised_keys
  features = builder.info.features
  if (not isinstance(keys, tuple) or len(keys) != 2
      or not isinstance(features[keys[0]], tfds.features.Image)
      or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
    raise ValueError(
        f'{DATASET_FIELD}={dataset!r} is not an image-classification dataset '
        f'(its supervised keys are {keys!r}); allowed: {DIGITS!r} or a TFDS '
        'dataset whose supervised keys are an Image and a ClassLabel.')
  return keys


def _open_tfds(dataset: str, base: str, data_dir: str | None) -> Any:
  return tfds.data_source(dataset, split=base, data_dir=data_dir,
                          download=False)


def num_classes(dataset: str, data_dir: str | None = None) -> int:
  """The label classes of `dataset` from its metadata: no data read.

  For a TFDS dataset this needs no prepared data (the builder's metadata
  knows its classes); an image folder is scanned.

  Raises:
    ValueError: as `dataset_info`, for an unknown or non-classification
      dataset or a bad image folder.
  """
  if dataset == DIGITS:
    return _digits_info().num_classes
  if dataset == image_folder.IMAGE_FOLDER:
    return len(image_folder.scan(data_dir).class_names)
  builder = _tfds_builder(dataset, data_dir)
  _, label_key = _tfds_keys(dataset, builder)
  return int(builder.info.features[label_key].num_classes)


def dataset_info(dataset: str, data_dir: str | None = None) -> DatasetInfo:
  """Metadata of `dataset`, checking that it can be read.

  For TFDS datasets this opens the prepared data (no download), so a run with
  a missing dataset fails here, before any compute.

  Args:
    dataset: `'digits'`, `'image_folder'` or a TFDS image-classification
      name (a version may be given as 'name:1.2.3').
    data_dir: TFDS data directory (None: TFDS's default); for
      `'image_folder'` the image folder (scanned, not decoded).

  Returns:
    The dataset's `DatasetInfo`.

  Raises:
    ValueError: naming `config.dataset.name`, its value and what is allowed,
      when the dataset is unknown, not image classification, or not prepared;
      naming `config.dataset.data_dir` for a bad image folder.
  """
  if dataset == DIGITS:
    return _digits_info()
  if dataset == image_folder.IMAGE_FOLDER:
    return _image_folder_info(data_dir)
  builder = _tfds_builder(dataset, data_dir)
  image_key, label_key = _tfds_keys(dataset, builder)
  sizes = {}
  for base in _TFDS_BASE_SPLITS:
    try:
      sizes[base] = len(_open_tfds(dataset, base, data_dir))
    # TFDS reports missing data as ValueError, RuntimeError (its
    # not-implemented error for a wrong file format), OSError, or KeyError
    # (metadata known, no split files) depending on what is there.
    except (ValueError, RuntimeError, OSError, AssertionError, KeyError) as e:
      if base == 'train':
        raise _not_prepared_error(dataset, data_dir,
                                  str(builder.data_dir)) from e
  short_name = dataset.split(':')[0].split('/')[0]
  test_base = _TEST_BASE.get(short_name,
                             'test' if 'test' in sizes else 'validation')
  if test_base not in sizes:
    raise ValueError(
        f'{DATASET_FIELD}={dataset!r} has no {test_base!r} split to evaluate '
        f'on; its prepared splits are {sorted(sizes)}.')
  holdout = _HOLDOUT.get(short_name, sizes['train'] // 10)
  return DatasetInfo(
      name=dataset,
      num_classes=int(builder.info.features[label_key].num_classes),
      image_shape=tuple(builder.info.features[image_key].shape),
      splits=_split_table(sizes, holdout, test_base))


def read_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's copy of the UCI handwritten digits, read without
  importing scikit-learn (1 s): `sklearn.datasets.load_digits()`'s
  `(images, target)`, float64 `[1797, 8, 8]` intensities 0-16 and int
  `[1797]` labels.

  Raises:
    FileNotFoundError: scikit-learn (which ships the file) is not installed.
  """
  spec = importlib.util.find_spec('sklearn')
  locations = (spec.submodule_search_locations or []) if spec else []
  path = os.path.join(*locations[:1], 'datasets', 'data', 'digits.csv.gz')
  if not locations or not os.path.isfile(path):
    raise FileNotFoundError(
        f'the digits dataset is read from scikit-learn\'s {path!r}: install '
        'scikit-learn')
  data = np.loadtxt(path, delimiter=',')
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _approximate_mode(counts: np.ndarray, draws: int,
                      rng: np.random.RandomState) -> np.ndarray:
  """How many of `draws` each class gets, in proportion to `counts`:
  floors, then one more for the largest remainders (ties broken by `rng`)."""
  continuous = counts / counts.sum() * draws
  floored = np.floor(continuous)
  need = int(draws - floored.sum())
  remainder = continuous - floored
  for value in np.sort(np.unique(remainder))[::-1]:
    if need == 0:
      break
    (tied,) = np.where(remainder == value)
    take = min(len(tied), need)
    floored[rng.choice(tied, size=take, replace=False)] += 1
    need -= take
  return floored.astype(int)


def stratified_split(labels: np.ndarray, num_test: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`(train indices, test indices)` with each class in proportion.

  The split `sklearn.model_selection.train_test_split(np.arange(n),
  test_size=num_test, stratify=labels, random_state=seed)` makes, draw for
  draw from the same `np.random.RandomState(seed)` (tested equal), without
  importing scikit-learn.

  Args:
    labels: `[n]` class labels.
    num_test: the test split's size.
    seed: the generator's seed.
  """
  _, inverse, counts = np.unique(labels, return_inverse=True,
                                 return_counts=True)
  members = np.split(np.argsort(inverse, kind='stable'),
                     np.cumsum(counts)[:-1])
  rng = np.random.RandomState(seed)
  train_counts = _approximate_mode(counts, len(labels) - num_test, rng)
  test_counts = _approximate_mode(counts - train_counts, num_test, rng)
  train, test = [], []
  for indices, n_train, n_test in zip(members, train_counts, test_counts):
    shuffled = indices[rng.permutation(len(indices))]
    train.extend(shuffled[:n_train])
    test.extend(shuffled[n_train:n_train + n_test])
  return rng.permutation(train), rng.permutation(test)


@functools.lru_cache(maxsize=4)
def digits_images(image_size: int) -> tuple[dict[str, np.ndarray],
                                            dict[str, np.ndarray]]:
  """The embedded digits, split and upsampled once to `image_size`.

  The 0-16 intensities are scaled to 0-255, resized with the pipeline's
  bicubic kernel, rounded to uint8 and repeated to 3 channels. Cached per
  size (the train and eval splits of a run read them once); the arrays are
  read-only.

  Args:
    image_size: output side in pixels.

  Returns:
    `(images, labels)` keyed by 'train' / 'test': uint8
    `[N, image_size, image_size, 3]` and int32 `[N]`.
  """
  digit_pixels, digit_labels = read_digits()
  pixels = digit_pixels[..., None] * (255.0 / 16.0)
  upsampled = preprocessing.resize_bicubic(pixels, image_size, image_size)
  images = np.repeat(np.clip(np.round(upsampled), 0, 255).astype(np.uint8),
                     3, axis=-1)
  train_idx, test_idx = stratified_split(digit_labels, DIGITS_NUM_TEST,
                                         DIGITS_SPLIT_SEED)
  labels = digit_labels.astype(np.int32)
  out = ({'train': images[train_idx], 'test': images[test_idx]},
         {'train': labels[train_idx], 'test': labels[test_idx]})
  for part in out:
    for array in part.values():
      array.flags.writeable = False
  return out


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """In-memory random access over stacked images and labels."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self.images[index], 'label': self.labels[index]}


@dataclasses.dataclass(frozen=True)
class ShardView:
  """Examples `[start, stop)` of a source, padded to `length` for eval.

  Yields `{'image': uint8 [H, W, 3], 'label': int32, 'mask': float32}`;
  grayscale images get 3 channels, indices past `stop - start` are padding
  (a 1x1 black image, label 0, mask 0).
  """
  source: RandomAccessSource
  start: int
  stop: int
  length: int
  image_key: str = 'image'
  label_key: str = 'label'

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index >= self.stop - self.start:
      return {'image': np.zeros((1, 1, 3), np.uint8),
              'label': np.int32(0), 'mask': np.float32(0.0)}
    example = self.source[self.start + index]
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return {'image': image.astype(np.uint8, copy=False),
            'label': np.int32(example[self.label_key]),
            'mask': np.float32(1.0)}


class OpenedSplit(NamedTuple):
  """A base split opened for random access, and where a `Split` lies in it."""
  source: RandomAccessSource
  range: SplitRange
  info: DatasetInfo
  image_key: str
  label_key: str


def open_split(dataset: str, split: Split, image_size: int,
               data_dir: str | None = None) -> OpenedSplit:
  """Opens the base split holding `split` for random access.

  Args:
    dataset: as `dataset_info`.
    split: which split.
    image_size: output side; the digits are upsampled to it once here.
    data_dir: TFDS data directory, or the image folder.

  Returns:
    The opened base split (see `OpenedSplit`).

  Raises:
    ValueError: as `dataset_info`.
  """
  info = dataset_info(dataset, data_dir)
  split_range = info.splits[split]
  if dataset == DIGITS:
    images, labels = digits_images(image_size)
    source = ArraySource(images[split_range.base], labels[split_range.base])
    return OpenedSplit(source, split_range, info, 'image', 'label')
  if dataset == image_folder.IMAGE_FOLDER:
    paths, labels = image_folder.scan(data_dir).bases[split_range.base]
    source = image_folder.ImageFolderSource(paths, labels)
    return OpenedSplit(source, split_range, info, 'image', 'label')
  builder = _tfds_builder(dataset, data_dir)
  image_key, label_key = _tfds_keys(dataset, builder)
  source = _open_tfds(dataset, split_range.base, data_dir)
  return OpenedSplit(source, split_range, info, image_key, label_key)
