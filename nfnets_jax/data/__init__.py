"""Input pipeline: TFDS (`tfds.data_source`), embedded digits or an image
folder, fed by grain.

    from nfnets_jax import data
    info = data.dataset_info('digits')
    it = data.load(data.Split.TRAIN, dataset='digits', batch_size=64,
                   image_size=32, is_training=True, seed=0)
    batch = next(it)   # images, labels, soft_labels, mask
    state = it.get_state()   # into the checkpoint; it.set_state(state) resumes

The names below are imported on first use (PEP 562): importing
`nfnets_jax.data.images` or `.preprocessing` alone (as `create_model` and
`nfnets-predict` do) does not import TFDS and grain.
"""
import importlib
from typing import Any

_EXPORTS = {
    'IMAGE_FOLDER': 'image_folder',
    'ImageDecodeError': 'images',
    'ImageTooLargeError': 'images',
    'Augment': 'pipeline',
    'load': 'pipeline',
    'parse_augment': 'pipeline',
    'MEAN_RGB': 'preprocessing',
    'STDDEV_RGB': 'preprocessing',
    'DatasetInfo': 'sources',
    'DIGITS': 'sources',
    'dataset_info': 'sources',
    'num_classes': 'sources',
    'Split': 'sources',
    'SplitRange': 'sources',
}

__all__ = tuple(sorted(_EXPORTS))


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"),
                  name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_EXPORTS))
