"""RandAugment against the official TF port, run under TensorFlow.

The fixture `fixtures/randaugment_tf/ops.npz` holds the outputs of the
official `nfnets/autoaugment.py` ops under TensorFlow 2.21 (how it was made:
`fixtures/randaugment_tf/README.md`); TensorFlow itself is not needed here.
"""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from nfnets_jax.data import pipeline
from nfnets_jax.data import preprocessing
from nfnets_jax.data import randaugment
from nfnets_jax.experiment import config_validation
import train_harness

_FIXTURE = pathlib.Path(__file__).parents[1] / 'fixtures' / 'randaugment_tf'
# Ops that resample the image (nearest neighbour in the port).
_GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


def _load():
  with np.load(_FIXTURE / 'ops.npz') as f:
    arrays = dict(f.items())
  return arrays, json.loads(str(arrays.pop('meta')))


_ARRAYS, _META = _load()
_CASES = {case['key']: case for case in _META['cases']}


class _FixedDraws:
  """Stands in for the generator: fixed sign draw and cutout center."""

  def __init__(self, sign: str = '', center: tuple[int, ...] = ()):
    self._sign = sign
    self._center = list(center)

  def random(self) -> float:
    # `_signed` keeps the sign below 0.5.
    return {'pos': 0.0, 'neg': 0.9}[self._sign]

  def integers(self, high: int) -> int:
    value = self._center.pop(0)
    assert 0 <= value < high
    return value


def _run_case(case, mode='official'):
  draws = _FixedDraws(case['variant'] if case['op'] in _GEOMETRIC else '',
                      case['draws'] if case['op'] == 'Cutout' else ())
  image = _ARRAYS[f"input.{case['image']}"]
  return image, randaugment.apply_op(case['op'], image, case['magnitude'],
                                     draws, mode)


def test_fixture_covers_every_op_at_the_nfnet_magnitudes():
  covered = {(c['op'], c['magnitude']) for c in _CASES.values()}
  assert covered == {(op, m) for op in randaugment.OP_NAMES
                     for m in (5, 10, 15)}
  assert _META['tensorflow'].startswith('2.')


@pytest.mark.parametrize('key', sorted(_CASES))
def test_op_matches_tensorflow(key):
  case = _CASES[key]
  _, ours = _run_case(case)
  expected = _ARRAYS[key]
  if case['op'] in _GEOMETRIC:
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1, (key, int(diff.max()), int((diff > 1).sum()))
  else:
    np.testing.assert_array_equal(ours, expected, err_msg=key)


# --- the 'relative' mode -----------------------------------------------------


def _image(seed: int, shape=(32, 32, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_relative_mode_scales_translate_and_cutout_with_the_side():
  image = _image(0)
  # 100 px of 224 at magnitude 10: 14.3 px of 32 (TF rounds to 14).
  out = randaugment.apply_op('TranslateX', image, 10.0, _FixedDraws('pos'),
                             'relative')
  np.testing.assert_array_equal(out[:, :18], image[:, 14:])
  np.testing.assert_array_equal(out[:, 18:], randaugment.FILL_VALUE)
  # The official 100 px leaves nothing of a 32 px image.
  out = randaugment.apply_op('TranslateY', image, 10.0, _FixedDraws('neg'))
  np.testing.assert_array_equal(out, randaugment.FILL_VALUE)
  # Cutout: int(40 / 224 * 32) = 5 px half-side, against 40 px officially.
  out = randaugment.apply_op('Cutout', image, 10.0,
                             _FixedDraws(center=(16, 16)), 'relative')
  expected = image.copy()
  expected[11:21, 11:21] = randaugment.FILL_VALUE
  np.testing.assert_array_equal(out, expected)


def test_relative_mode_contrast_and_solarize_follow_pil():
  image = _image(1)
  grey = np.asarray([0.299, 0.587, 0.114]) @ image.reshape(-1, 3).T
  mean = int(grey.mean() + 0.5)
  factor = 1.9  # Magnitude 10.
  expected = np.clip(mean + np.float32(factor) * (
      image.astype(np.float32) - mean), 0, 255).astype(np.uint8)
  out = randaugment.apply_op('Contrast', image, 10.0, _FixedDraws(),
                             'relative')
  np.testing.assert_array_equal(out, expected)
  # Threshold 256: PIL changes nothing, the port (uint8: 0) inverts all.
  np.testing.assert_array_equal(randaugment.apply_op(
      'Solarize', image, 10.0, _FixedDraws(), 'relative'), image)
  np.testing.assert_array_equal(randaugment.apply_op(
      'Solarize', image, 10.0, _FixedDraws()), 255 - image)


def test_modes_agree_on_the_other_twelve_ops():
  image = _image(2)
  for name in set(randaugment.OP_NAMES) - {
      'TranslateX', 'TranslateY', 'Cutout', 'Contrast', 'Solarize'}:
    sign = 'pos' if name in _GEOMETRIC else ''
    for magnitude in (5.0, 15.0):
      np.testing.assert_array_equal(
          randaugment.apply_op(name, image, magnitude, _FixedDraws(sign)),
          randaugment.apply_op(name, image, magnitude, _FixedDraws(sign),
                               'relative'), err_msg=name)


def test_unknown_mode_raises():
  with pytest.raises(ValueError, match="mode 'pil' is not one of"):
    randaugment.randaugment(_image(3), 2, 10.0, np.random.default_rng(0),
                            'pil')


# --- the option, from the config to the batch --------------------------------


def test_parse_augment_reads_the_mode_in_both_forms():
  fields = dict(random_crop=False, flip=False, mixup_alpha=0.0,
                cutmix_alpha=0.0)
  flat = ml_collections.ConfigDict(dict(
      fields, randaugment_layers=2, randaugment_magnitude=9.0,
      randaugment_mode='relative'))
  nested = ml_collections.ConfigDict(dict(fields, randaugment=dict(
      num_layers=2, magnitude=9.0, mode='relative')))
  assert (pipeline.parse_augment(flat) == pipeline.parse_augment(nested)
          == pipeline.Augment(randaugment_layers=2, randaugment_magnitude=9.0,
                              randaugment_mode='relative'))
  del nested.randaugment.mode
  assert pipeline.parse_augment(nested).randaugment_mode == 'official'
  flat.randaugment_mode = 'pil'
  with pytest.raises(ValueError, match="augment.randaugment_mode='pil' is "
                     "invalid; allowed: 'official' or 'relative'"):
    pipeline.parse_augment(flat)


@pytest.mark.parametrize('mode', randaugment.MODES)
def test_train_batch_applies_randaugment_in_its_mode(mode):
  examples = [{'image': _image(10 + i), 'label': i} for i in range(3)]
  augment = pipeline.Augment(randaugment_layers=3, randaugment_magnitude=10.0,
                             randaugment_mode=mode)
  batch = pipeline.TrainBatch(32, augment, 10, 0)(
      examples, np.random.default_rng(5))
  # The same draws by hand: resize (no crop / flip), then RandAugment.
  rng = np.random.default_rng(5)
  images = [preprocessing.train_crop_flip_resize(
      e['image'], 32, rng, random_crop=False, flip=False, crop_padding=0)
            for e in examples]
  outs = {}
  for m in randaugment.MODES:
    state = rng.bit_generator.state
    outs[m] = [randaugment.randaugment(
        np.clip(image, 0.0, 255.0).astype(np.uint8), 3, 10.0,
        rng, m) for image in images]
    rng.bit_generator.state = state
  assert any(not np.array_equal(a, b)
             for a, b in zip(outs['official'], outs['relative']))
  np.testing.assert_array_equal(
      batch['images'], preprocessing.normalize(np.stack(outs[mode])))


def test_recipes_pick_the_mode():
  official = train_harness.load_config(
      str(pathlib.Path(train_harness.REPO) / 'configs' / 'nfnet.py'), 'F3')
  digits = train_harness.load_config(train_harness.DEFAULT_CONFIG)
  assert official.train.augment.randaugment_mode == 'official'
  assert digits.train.augment.randaugment_mode == 'relative'


def test_config_validation_names_a_bad_mode(tmp_path):
  config = train_harness.load_config(train_harness.DEFAULT_CONFIG, 'smoke')
  config.workdir = str(tmp_path)
  config.train.augment.randaugment_mode = 'pil'
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate(config, check_model=False)
  assert ("config.train.augment.randaugment_mode='pil' is invalid"
          in str(info.value))
  assert "'official' or 'relative'" in str(info.value)
