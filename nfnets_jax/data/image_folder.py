"""Image folders: one sub-folder per class, images read on demand.

Two layouts of `ROOT` (`config.dataset.data_dir`):

* `ROOT/<class>/.../<image>`: class folders only. A deterministic,
  stratified 10% holdout is the evaluation set (`holdout_indices`).
* `ROOT/train/<class>/...` with `ROOT/val/`, `ROOT/validation/` or
  `ROOT/test/` beside it, each holding the same class folders: the
  evaluation set is that folder (`val/` or `validation/` for VALID, `test/`
  for TEST; one folder serves both when there is only one). A lone
  `ROOT/train/` gets the holdout.

Class names are the class folder names, sorted (label = index), as
torchvision's `ImageFolder`. Images are the files, at any depth inside a
class folder, whose extension is one of `IMAGE_EXTENSIONS` (any case);
hidden files and folders (name starting with '.') and other files are
ignored. Images are read by `images.read_rgb` (16-bit scaled to 8 bits,
transparency over white, EXIF orientation applied; images over PIL's
decompression-bomb limit refused by name).

Each base set ('train', 'valid', 'test') is a list of `(path, label)` in a
fixed order: sorted by class and path, then permuted with a fixed seed, so
that each host's contiguous shard mixes the classes. The order does not
depend on the run's seed.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from nfnets_jax.data import images

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.webp')
HOLDOUT_FRACTION = 10  # One image in ten per class.
DATA_DIR_FIELD = 'config.dataset.data_dir'
TRAIN_FOLDER = 'train'
VALID_FOLDERS = ('val', 'validation')
TEST_FOLDER = 'test'
# Seed of the fixed order of each base set (independent of the run's seed).
_ORDER_SEED = 0


@dataclasses.dataclass(frozen=True)
class FolderDataset:
  """A scanned image folder.

  Attributes:
    root: the folder as given.
    class_names: sorted class folder names; label = index.
    layout: 'classes' (holdout) or 'splits' (train/ and eval folders).
    bases: 'train', 'valid', 'test' -> `(paths, labels)` in the fixed order;
      'valid' and 'test' may be the same set.
  """
  root: str
  class_names: tuple[str, ...]
  layout: str
  bases: dict[str, tuple[tuple[str, ...], np.ndarray]]


def holdout_indices(num_images: int) -> np.ndarray:
  """Which of a class's images (sorted by path) are held out for evaluation.

  `k = max(1, n // 10)` evenly spaced images (none when `n < 2`): sorted
  positions `floor((j + 0.5) * n / k)` for `j = 0 .. k - 1`.

  Args:
    num_images: `n`, the class's number of images.

  Returns:
    int64 `[k]` increasing positions in `[0, n)`.
  """
  if num_images < 2:
    return np.zeros(0, np.int64)
  k = max(1, num_images // HOLDOUT_FRACTION)
  return ((np.arange(k) + 0.5) * num_images / k).astype(np.int64)


def _visible(name: str) -> bool:
  return not name.startswith('.')


def _subfolders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and _visible(e.name))


def _class_images(folder: str) -> list[str]:
  """Image paths at any depth under `folder`, sorted."""
  found = []
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if _visible(d)]
    found += [os.path.join(parent, f) for f in files
              if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found)


def _scan_classes(folder: str) -> dict[str, list[str]]:
  """Class name -> sorted image paths; raises for none or an empty class."""
  classes = _subfolders(folder)
  if not classes:
    raise ValueError(
        f'{DATA_DIR_FIELD}: {folder!r} has no class folders; allowed: one '
        'sub-folder per class holding its images, or train/ and val/ '
        '(or validation/ or test/) folders each holding class folders.')
  images = {c: _class_images(os.path.join(folder, c)) for c in classes}
  empty = [c for c, paths in images.items() if not paths]
  if empty:
    raise ValueError(
        f'{DATA_DIR_FIELD}: class folder(s) {empty} of {folder!r} hold no '
        f'images; allowed: files ending in {", ".join(IMAGE_EXTENSIONS)} '
        '(any case) in every class folder.')
  return images


def _ordered(images: dict[str, list[str]], class_names: tuple[str, ...]
             ) -> tuple[tuple[str, ...], np.ndarray]:
  """`(paths, labels)` sorted by class and path, then permuted (fixed)."""
  paths = [p for c in class_names for p in images.get(c, [])]
  labels = np.asarray([i for i, c in enumerate(class_names)
                       for _ in images.get(c, [])], np.int32)
  order = np.random.default_rng(_ORDER_SEED).permutation(len(paths))
  return tuple(paths[i] for i in order), labels[order]


def _holdout(images: dict[str, list[str]]
             ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Splits each class's images into (kept, held out)."""
  kept, held = {}, {}
  for name, paths in images.items():
    chosen = set(holdout_indices(len(paths)).tolist())
    held[name] = [p for i, p in enumerate(paths) if i in chosen]
    kept[name] = [p for i, p in enumerate(paths) if i not in chosen]
  return kept, held


def _split_folders(root: str) -> dict[str, str] | None:
  """Split name -> folder when `root` uses the train/ + eval layout."""
  names = _subfolders(root)
  allowed = {TRAIN_FOLDER, TEST_FOLDER, *VALID_FOLDERS}
  if TRAIN_FOLDER not in names or not set(names) <= allowed:
    return None
  valid = [n for n in VALID_FOLDERS if n in names]
  if len(valid) > 1:
    raise ValueError(
        f'{DATA_DIR_FIELD}: {root!r} has both val/ and validation/; '
        'allowed: at most one of them (and test/).')
  return {n: os.path.join(root, n) for n in names}


def _check_same_classes(root: str, train: dict[str, list[str]],
                        name: str, other: dict[str, list[str]]) -> None:
  if set(other) != set(train):
    raise ValueError(
        f'{DATA_DIR_FIELD}: the class folders of {name}/ differ from those '
        f'of train/ in {root!r}: missing in {name}/: '
        f'{sorted(set(train) - set(other))}, not in train/: '
        f'{sorted(set(other) - set(train))}; allowed: the same class '
        'folders in every split folder.')


@functools.lru_cache(maxsize=8)
def scan(root: str | None) -> FolderDataset:
  """Scans an image folder (no decoding); cached per path.

  Args:
    root: the folder (`config.dataset.data_dir`).

  Returns:
    The `FolderDataset`.

  Raises:
    ValueError: naming `config.dataset.data_dir`, the folder and what is
      allowed, when it is missing, has no class folders, an empty class,
      or split folders whose classes differ.
  """
  if not root or not os.path.isdir(root):
    raise ValueError(
        f'{DATA_DIR_FIELD}={root!r} is not a folder; allowed: with '
        f"config.dataset.name='{IMAGE_FOLDER}', the folder holding one "
        'sub-folder per class (or train/ and val/ folders of them).')
  splits = _split_folders(root)
  if splits is None:
    images = _scan_classes(root)
    names = tuple(images)
    kept, held = _holdout(images)
    eval_set = _ordered(held, names)
    return FolderDataset(root, names, 'classes', {
        'train': _ordered(kept, names), 'valid': eval_set, 'test': eval_set})
  train = _scan_classes(splits[TRAIN_FOLDER])
  names = tuple(train)
  evals = {}
  for split in (*VALID_FOLDERS, TEST_FOLDER):
    if split in splits:
      images = _scan_classes(splits[split])
      _check_same_classes(root, train, split, images)
      evals[split] = _ordered(images, names)
  if not evals:
    kept, held = _holdout(train)
    train = kept
    evals[TEST_FOLDER] = _ordered(held, names)
  valid = next((evals[n] for n in VALID_FOLDERS if n in evals),
               evals.get(TEST_FOLDER))
  return FolderDataset(root, names, 'splits', {
      'train': _ordered(train, names), 'valid': valid,
      'test': evals.get(TEST_FOLDER, valid)})


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
  """Random access to `(path, label)` pairs, decoding on read.

  Yields `{'image': uint8 [H, W, 3], 'label': int32}`.
  """
  paths: tuple[str, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': images.read_rgb(self.paths[index]),
            'label': np.int32(self.labels[index])}
