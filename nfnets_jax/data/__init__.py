"""Input pipeline: TFDS (`tfds.data_source`), embedded digits or an image
folder, fed by grain.

    from nfnets_jax import data
    info = data.dataset_info('digits')
    it = data.load(data.Split.TRAIN, dataset='digits', batch_size=64,
                   image_size=32, is_training=True, seed=0)
    batch = next(it)   # images, labels, soft_labels, mask
    state = it.get_state()   # into the checkpoint; it.set_state(state) resumes
"""

from nfnets_jax.data.image_folder import IMAGE_FOLDER
from nfnets_jax.data.images import ImageDecodeError
from nfnets_jax.data.images import ImageTooLargeError
from nfnets_jax.data.pipeline import Augment
from nfnets_jax.data.pipeline import load
from nfnets_jax.data.pipeline import parse_augment
from nfnets_jax.data.preprocessing import MEAN_RGB
from nfnets_jax.data.preprocessing import STDDEV_RGB
from nfnets_jax.data.sources import DatasetInfo
from nfnets_jax.data.sources import DIGITS
from nfnets_jax.data.sources import dataset_info
from nfnets_jax.data.sources import num_classes
from nfnets_jax.data.sources import Split
from nfnets_jax.data.sources import SplitRange

__all__ = (
    'Augment', 'DIGITS', 'DatasetInfo', 'IMAGE_FOLDER', 'ImageDecodeError',
    'ImageTooLargeError', 'MEAN_RGB', 'STDDEV_RGB', 'Split', 'SplitRange', 'dataset_info', 'load',
    'num_classes', 'parse_augment',
)
