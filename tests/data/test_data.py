"""Tests of the input pipeline: numeric truths of each step, then `load`."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from PIL import ImageOps

from nfnets_jax import data
from nfnets_jax.data import mixing
from nfnets_jax.data import pipeline
from nfnets_jax.data import preprocessing
from nfnets_jax.data import randaugment
from nfnets_jax.data import sources


def _augment(**overrides) -> ml_collections.ConfigDict:
  fields = dict(random_crop=False, flip=False, randaugment=None,
                mixup_alpha=0.0, cutmix_alpha=0.0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


_F0_AUGMENT = dict(random_crop=True, flip=True,
                   randaugment=dict(num_layers=4, magnitude=5.0),
                   mixup_alpha=0.2, cutmix_alpha=1.0)


def _random_image(seed: int, shape=(24, 20, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# --- preprocessing ------------------------------------------------------------


@pytest.mark.parametrize('size', [(7, 5), (30, 41), (13, 40)])
def test_resize_matches_jax_non_antialiased_bicubic(size):
  image = np.random.default_rng(0).random((13, 17, 3)).astype(np.float32)
  image *= 255
  ours = preprocessing.resize_bicubic(image, *size)
  reference = jax.image.resize(jnp.asarray(image), size + (3,), 'bicubic',
                               antialias=False)
  np.testing.assert_allclose(ours, np.asarray(reference), atol=1e-3)


@pytest.mark.parametrize('shape, size', [((37, 53, 3), 24), ((20, 11, 3), 31),
                                         ((16, 16, 3), 16), ((9, 40, 1), 9)])
def test_resize_of_the_flipped_image_is_the_mirrored_resize(shape, size):
  image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
  np.testing.assert_array_equal(
      preprocessing.resize_bicubic(image, size, size, flip=True),
      preprocessing.resize_bicubic(image[:, ::-1], size, size))


def test_resize_upscale_matches_pil_and_keeps_constants():
  channel = np.random.default_rng(1).random((9, 11)).astype(np.float32) * 255
  ours = preprocessing.resize_bicubic(channel[..., None], 40, 50)[..., 0]
  pil = Image.fromarray(channel, mode='F').resize(
      (50, 40), Image.Resampling.BICUBIC)
  np.testing.assert_allclose(ours, np.asarray(pil), atol=1e-3)
  flat = np.full((5, 7, 3), 77, np.uint8)
  for size in [(3, 2), (5, 7), (31, 9)]:
    np.testing.assert_allclose(preprocessing.resize_bicubic(flat, *size), 77,
                               atol=1e-4)


@pytest.mark.parametrize('padding', [0, 5, 32])
def test_eval_center_crop_gives_the_central_pixels(padding):
  size = 16
  side = size + padding
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
  image = np.stack([rows, cols, rows + cols], axis=-1).astype(np.uint8)
  out = preprocessing.eval_resize_crop(image, size, padding)
  offset = (padding + 1) // 2
  np.testing.assert_array_equal(
      out, image[offset:offset + size, offset:offset + size])


def test_eval_resize_crop_from_other_sizes_has_the_output_shape():
  out = preprocessing.eval_resize_crop(_random_image(0, (47, 17, 3)), 24, 32)
  assert out.shape == (24, 24, 3) and out.dtype == np.float32


def test_random_crop_windows_keep_area_and_aspect_in_range():
  for seed in range(300):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(8, 400, size=2))
    window = preprocessing.sample_crop_window(height, width, rng)
    if window is None:
      continue
    area = window.height * window.width / (height * width)
    aspect = window.width / window.height
    assert 0.1 - 1e-9 <= area <= 1.0
    # Rounding the width to whole pixels moves the aspect by < 1/height.
    assert 3 / 4 - 1 / window.height <= aspect <= 4 / 3 + 1 / window.height
    assert 0 <= window.top and window.top + window.height <= height
    assert 0 <= window.left and window.left + window.width <= width


def test_center_crop_fallback_window():
  window = preprocessing.center_crop_window(256, 512, 224, 32)
  assert window == preprocessing.CropWindow(16, 144, 224, 224)
  assert preprocessing.center_crop_window(32, 32, 32, 0) == (
      preprocessing.CropWindow(0, 0, 32, 32))


def test_normalization_gives_known_mean_and_std():
  mean = np.asarray(data.MEAN_RGB, np.float32)
  std = np.asarray(data.STDDEV_RGB, np.float32)
  np.testing.assert_allclose(preprocessing.normalize(np.broadcast_to(
      mean, (2, 3, 3))), 0.0, atol=1e-5)
  np.testing.assert_allclose(preprocessing.normalize(mean + std), 1.0,
                             atol=1e-5)
  np.testing.assert_allclose(preprocessing.normalize(mean - 2 * std), -2.0,
                             atol=1e-5)


def test_train_crop_flip_resize_flip_only_mirrors():
  image = _random_image(3, (16, 16, 3))
  outs = [preprocessing.train_crop_flip_resize(
      image, 16, np.random.default_rng(seed), random_crop=False, flip=True,
      crop_padding=0) for seed in range(20)]
  flipped = [np.array_equal(out, image[:, ::-1]) for out in outs]
  assert all(f or np.array_equal(out, image) for f, out in zip(flipped, outs))
  assert 0 < sum(flipped) < 20


# --- mixing -------------------------------------------------------------------


def test_mixup_labels_match_the_pixel_ratio():
  rng = np.random.default_rng(0)
  images = rng.random((16, 4, 4, 3)).astype(np.float32) * 255
  labels = rng.integers(0, 5, 16)
  mixed, soft, dominant = mixing.mix_batch(
      images, labels, 5, np.random.default_rng(1), mixup_alpha=0.2,
      cutmix_alpha=0.0)
  first, second = images[:8], images[8:]
  ratio = ((mixed - second) / (first - second)).reshape(8, -1)
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio),
                             atol=1e-3)
  ratio = ratio[:, 0]
  expected = (ratio[:, None] * mixing.one_hot(labels[:8], 5)
              + (1 - ratio[:, None]) * mixing.one_hot(labels[8:], 5))
  np.testing.assert_allclose(soft, expected, atol=1e-4)
  np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
  assert (soft >= 0).all()
  np.testing.assert_array_equal(
      dominant, np.where(ratio >= 0.5, labels[:8], labels[8:]))


def test_cutmix_label_weight_is_the_pasted_area():
  ones, zeros = np.ones((8, 10, 12, 3), np.float32), np.zeros(
      (8, 10, 12, 3), np.float32)
  labels = np.asarray([0] * 8 + [1] * 8)
  mixed, soft, dominant = mixing.mix_batch(
      np.concatenate([ones, zeros]), labels, 2, np.random.default_rng(2),
      mixup_alpha=0.0, cutmix_alpha=1.0)
  assert set(np.unique(mixed)) <= {0.0, 1.0}
  area = mixed[..., 0].mean(axis=(1, 2))
  np.testing.assert_allclose(soft[:, 0], area, atol=1e-6)
  np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(dominant, np.where(area >= 0.5, 0, 1))
  for image in mixed[..., 0]:  # The pasted region is one rectangle.
    rows, cols = np.nonzero(image)
    if rows.size:
      assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)


def test_cutmix_mask_is_a_clipped_box():
  for seed in range(50):
    mask = mixing.box_mask(9, 13, mixing.cutmix_box(
        9, 13, 0.3, np.random.default_rng(seed)))
    assert mask.shape == (9, 13, 1)
    rows, cols = np.nonzero(mask[..., 0])
    if rows.size:
      assert np.ptp(rows) + 1 <= int(np.sqrt(0.7) * 9) // 2 * 2
      assert np.ptp(cols) + 1 <= int(np.sqrt(0.7) * 13) // 2 * 2


def test_mixup_and_cutmix_split_the_batch():
  ones, zeros = np.ones((8, 6, 6, 3), np.float32), np.zeros(
      (8, 6, 6, 3), np.float32)
  mixed, _, _ = mixing.mix_batch(
      np.concatenate([ones, zeros]), np.zeros(16, int), 3,
      np.random.default_rng(0), mixup_alpha=0.2, cutmix_alpha=1.0)
  # Mixup outputs are flat images; CutMix outputs are binary boxes.
  assert all(np.ptp(image) < 1e-6 for image in mixed[:4])
  assert all(set(np.unique(image)) <= {0.0, 1.0} for image in mixed[4:])


# --- RandAugment --------------------------------------------------------------


def test_randaugment_is_deterministic_given_the_seed():
  image = _random_image(4)
  outs = [randaugment.randaugment(image, 4, 10.0, np.random.default_rng(s))
          for s in (7, 7, 8)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'ShearY', 'TranslateX',
                                  'TranslateY', 'Cutout', 'SolarizeAdd'])
def test_randaugment_ops_are_identity_at_magnitude_zero(name):
  image = _random_image(5)
  out = randaugment.apply_op(name, image, 0.0, np.random.default_rng(0))
  np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('name', randaugment.OP_NAMES)
@pytest.mark.parametrize('magnitude', [0.0, 5.0, 10.0, 15.0])
def test_randaugment_ops_keep_shape_and_dtype(name, magnitude):
  image = _random_image(6)
  out = randaugment.apply_op(name, image, magnitude, np.random.default_rng(0))
  assert out.shape == image.shape and out.dtype == np.uint8


def test_randaugment_ops_match_pil_and_definitions():
  image = _random_image(7, (20, 20, 3)) // 2 + 40  # Not full range.
  np.testing.assert_array_equal(
      randaugment.equalize(image), np.asarray(ImageOps.equalize(
          Image.fromarray(image))))
  np.testing.assert_array_equal(
      randaugment.autocontrast(image), np.asarray(ImageOps.autocontrast(
          Image.fromarray(image))))
  np.testing.assert_array_equal(randaugment.invert(image), 255 - image)
  np.testing.assert_array_equal(randaugment.posterize(image, 2),
                                image & 0b11000000)
  np.testing.assert_array_equal(randaugment.posterize(image, 0), 0)
  np.testing.assert_array_equal(randaugment.solarize(image, 100),
                                np.where(image < 100, image, 255 - image))
  np.testing.assert_array_equal(randaugment.brightness(image, 0.0), 0)
  for op in (randaugment.color, randaugment.contrast, randaugment.brightness,
             randaugment.sharpness):
    np.testing.assert_array_equal(op(image, 1.0), image)
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    randaugment.apply_op('Blur', image, 1.0, np.random.default_rng(0))


def test_translate_moves_content_by_whole_pixels():
  image = _random_image(8, (10, 10, 3))
  out = randaugment.project(image, (1.0, 0.0, 3.0, 0.0, 1.0, 0.0))
  np.testing.assert_array_equal(out[:, :7], image[:, 3:])
  np.testing.assert_array_equal(out[:, 7:], randaugment.FILL_VALUE)


# --- sources ------------------------------------------------------------------


def test_digits_split_sizes_and_class_balance():
  info = data.dataset_info('digits')
  assert info.num_classes == 10
  assert info.num_examples == {data.Split.TRAIN: 1437, data.Split.TEST: 360,
                               data.Split.VALID: 360,
                               data.Split.TRAIN_AND_VALID: 1437}
  assert data.Split.TEST.num_examples('digits') == 360
  images, labels = sources.digits_images(16)
  assert images['train'].shape == (1437, 16, 16, 3)
  assert images['train'].dtype == np.uint8
  counts = np.bincount(labels['test'], minlength=10)
  total = np.bincount(np.concatenate([labels['train'], labels['test']]))
  np.testing.assert_allclose(counts, total * 360 / 1797, atol=1.0)


def test_digits_are_scikit_learns_without_importing_it():
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  pixels, labels = sources.read_digits()
  np.testing.assert_array_equal(pixels, digits.images)
  np.testing.assert_array_equal(labels, digits.target)
  # The split, on the digits and on label sets with ties and odd counts.
  rng = np.random.default_rng(0)
  cases = [(digits.target, 360, 0), (digits.target, 100, 3),
           (rng.integers(0, 3, 50), 11, 1), (np.repeat([4, 7, 9], 5), 6, 2)]
  for y, num_test, seed in cases:
    expected = model_selection.train_test_split(
        np.arange(len(y)), test_size=num_test, stratify=y, random_state=seed)
    for ours, theirs in zip(sources.stratified_split(y, num_test, seed),
                            expected):
      np.testing.assert_array_equal(ours, theirs)


def test_split_names_and_strings():
  assert data.Split.from_string('validation') is data.Split.VALID
  assert data.Split.from_string('train_and_valid') is (
      data.Split.TRAIN_AND_VALID)
  with pytest.raises(ValueError, match='Unknown split'):
    data.Split.from_string('dev')
  assert data.Split.TEST.tfds_split('digits') == 'test[0:360]'


def test_unknown_dataset_raises_a_clear_error():
  with pytest.raises(ValueError, match=r"config\.dataset\.name='foo' is not "
                     r"a known dataset; known: 'digits'"):
    data.dataset_info('foo')
  with pytest.raises(ValueError, match="'imdb_reviews' is not an image-"):
    data.dataset_info('imdb_reviews')
  with pytest.raises(ValueError, match="config.dataset.name='foo'"):
    data.load(data.Split.TRAIN, dataset='foo', batch_size=2, image_size=8,
              is_training=True, seed=0)


def test_unprepared_tfds_dataset_raises_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)config\.dataset\.name='mnist'.*"
                     r"data_dir=.*tfds build mnist"):
    data.dataset_info('mnist', data_dir=str(tmp_path))


def test_tfds_mock_mnist_and_cifar10_batches():
  with tfds.testing.mock_data(num_examples=12):
    for name, num_classes in [('mnist', 10), ('cifar10', 10)]:
      info = data.dataset_info(name)
      assert info.num_classes == num_classes
      assert info.num_examples[data.Split.TRAIN_AND_VALID] == 12
      it = data.load(data.Split.TRAIN, dataset=name, batch_size=4,
                     image_size=16, is_training=True, seed=0,
                     augment=_augment(random_crop=True, flip=True))
      batch = next(it)
      assert batch['images'].shape == (4, 16, 16, 3)
      assert batch['soft_labels'].shape == (4, num_classes)
      eval_batches = list(data.load(
          data.Split.TEST, dataset=name, batch_size=5, image_size=16,
          is_training=False, seed=0))
      assert [b['images'].shape[0] for b in eval_batches] == [5, 5, 5]
      assert sum(b['mask'].sum() for b in eval_batches) == 12


def test_tfds_mock_imagenet_uses_validation_as_test():
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    info = data.dataset_info('imagenet2012')
    assert info.num_classes == 1000
    assert info.splits[data.Split.TEST].base == 'validation'
    assert info.splits[data.Split.VALID] == sources.SplitRange('train', 0, 6)
    batch = next(data.load(data.Split.TEST, dataset='imagenet2012',
                           batch_size=4, image_size=24, is_training=False,
                           seed=0))
    assert batch['images'].shape == (4, 24, 24, 3)
    assert batch['labels'].dtype == np.int32


# --- load ---------------------------------------------------------------------


def _digits(split=data.Split.TRAIN, **kwargs):
  args = dict(dataset='digits', batch_size=8, image_size=16,
              is_training=True, seed=0)
  args.update(kwargs)
  return data.load(split, **args)


def test_batches_have_the_documented_structure():
  for is_training in (True, False):
    batch = next(_digits(is_training=is_training, eval_crop_padding=0,
                         augment=ml_collections.ConfigDict(_F0_AUGMENT)))
    assert batch['images'].shape == (8, 16, 16, 3)
    assert batch['images'].dtype == np.float32
    assert batch['labels'].shape == (8,) and batch['labels'].dtype == np.int32
    assert batch['soft_labels'].shape == (8, 10)
    assert batch['soft_labels'].dtype == np.float32
    np.testing.assert_allclose(batch['soft_labels'].sum(axis=1), 1.0,
                               atol=1e-6)
    assert batch['mask'].shape == (8,) and batch['mask'].dtype == np.float32


def test_same_seed_same_batches_and_other_seed_differs():
  aug = ml_collections.ConfigDict(_F0_AUGMENT)
  first = [next(_digits(seed=s, augment=aug))['images'] for s in (1, 1, 2)]
  np.testing.assert_array_equal(first[0], first[1])
  assert not np.array_equal(first[0], first[2])


def test_state_restore_resumes_at_the_same_example():
  aug = ml_collections.ConfigDict(_F0_AUGMENT)
  it = _digits(augment=aug)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  resumed = _digits(augment=aug)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(2)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_each_epoch_visits_every_example_once_in_a_new_order():
  examples = sources.ArraySource(np.arange(12)[:, None], np.arange(12))
  batches = pipeline.ExampleBatches(examples, 4, 6, shuffle_seed=3)
  seen = [int(e['label']) for b in range(6) for e in batches[b]]
  assert sorted(seen[:12]) == sorted(seen[12:]) == list(range(12))
  assert seen[:12] != seen[12:]
  spanning = pipeline.ExampleBatches(examples, 5, 4, shuffle_seed=3)
  spanned = [int(e['label']) for b in range(4) for e in spanning[b]]
  assert spanned[:20] == seen[:20]


def test_finite_training_epochs_end_the_iterator():
  batches = list(_digits(batch_size=500, num_epochs=2))
  assert len(batches) == 1437 * 2 // 500


@pytest.mark.parametrize('num_examples,shard_count', [(360, 3), (10, 4),
                                                      (7, 7)])
def test_shards_partition_the_examples(num_examples, shard_count):
  ranges = [pipeline.shard_range(num_examples, i, shard_count)
            for i in range(shard_count)]
  assert ranges[0][0] == 0 and ranges[-1][1] == num_examples
  assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_eval_shards_cover_every_example_exactly_once():
  kwargs = dict(split=data.Split.TEST, is_training=False, batch_size=32,
                eval_crop_padding=0)
  whole = list(_digits(**kwargs))
  whole_images = np.concatenate([b['images'][b['mask'] > 0] for b in whole])
  assert len(whole_images) == 360
  per_host = [list(_digits(shard_index=i, shard_count=3, **kwargs))
              for i in range(3)]
  assert len({len(batches) for batches in per_host}) == 1
  gathered = np.concatenate([b['images'][b['mask'] > 0]
                             for batches in per_host for b in batches])
  np.testing.assert_array_equal(gathered, whole_images)
  padded = per_host[0][-1]
  assert padded['mask'].tolist() == [1.0] * 24 + [0.0] * 8


def test_augment_config_nested_and_flat_forms_agree():
  flat = ml_collections.ConfigDict(dict(
      random_crop=True, flip=False, randaugment_layers=2,
      randaugment_magnitude=9.0, mixup_alpha=0.2, cutmix_alpha=0.0))
  nested = _augment(random_crop=True,
                    randaugment=dict(num_layers=2, magnitude=9.0),
                    mixup_alpha=0.2)
  assert pipeline.parse_augment(flat) == pipeline.parse_augment(nested)
  assert pipeline.parse_augment(None) == pipeline.Augment()
  with pytest.raises(ValueError, match='lacks'):
    pipeline.parse_augment(ml_collections.ConfigDict(dict(flip=True)))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='shard_index=3'):
    _digits(shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match='num_epochs=2'):
    _digits(is_training=False, num_epochs=2)


def test_worker_processes_give_the_in_process_batches_and_resume():
  in_process = _digits(seed=5)
  expected = [next(in_process) for _ in range(4)]
  workers = _digits(seed=5, num_workers=2)
  got = [next(workers) for _ in range(2)]
  state = workers.get_state()
  workers.close()
  resumed = _digits(seed=5, num_workers=2)
  resumed.set_state(json.loads(json.dumps(state)))
  got += [next(resumed) for _ in range(2)]
  resumed.close()
  for want, have in zip(expected, got):
    np.testing.assert_array_equal(want['images'], have['images'])
