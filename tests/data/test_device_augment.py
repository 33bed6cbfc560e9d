"""The augmentation in the train step (data/device_augment) against the host's.

On CPU, compiled with the package's options, the jitted path gives the host
pipeline's numbers exactly: the TF fixture's cases, random images through
every op, and whole `TrainBatch`es with MixUp/CutMix and RandAugment.
"""
import functools
import json
import pathlib

import jax
import numpy as np
import pytest

from nfnets_jax.cpu import compiler
from nfnets_jax.data import device_augment
from nfnets_jax.data import pipeline
from nfnets_jax.data import randaugment

_FIXTURE = pathlib.Path(__file__).parents[1] / 'fixtures' / 'randaugment_tf'


def _jit(fn):
  """`fn` compiled with the package's options, without LLVM's slow passes
  (as the train step of a short run is; the barriers hold either way)."""
  return compiler.Compiled(jax.jit(fn), fast=True)


def _device_ra(images, draws, magnitude, mode='official'):
  fn = _jit(functools.partial(device_augment.randaugment,
                              magnitude=magnitude, mode=mode))
  return np.asarray(fn(images, *(np.stack(x) for x in zip(*draws))))


def _fixture():
  with np.load(_FIXTURE / 'ops.npz') as f:
    arrays = dict(f.items())
  return arrays, json.loads(str(arrays.pop('meta')))['cases']


def test_fixture_cases_match_tensorflow_on_the_device_path():
  arrays, cases = _fixture()
  by_input = {}
  for case in cases:
    by_input.setdefault((case['image'], case['magnitude']), []).append(case)
  checked = 0
  for (image_name, magnitude), group in sorted(by_input.items()):
    image = arrays[f'input.{image_name}']
    draws = []
    for case in group:
      negative = case['op'] in randaugment.SIGNED_OPS and (
          case['variant'] == 'neg')
      center = case['draws'] if case['op'] == 'Cutout' else (0, 0)
      draws.append(randaugment.Draws(
          np.asarray([randaugment.OP_NAMES.index(case['op'])], np.int32),
          np.asarray([negative]), np.asarray([center], np.int32)))
    images = np.stack([image] * len(group))
    out = _device_ra(images, draws, float(magnitude))
    for case, got in zip(group, out):
      host = randaugment.apply_draws(image, draws[group.index(case)],
                                     float(magnitude))
      np.testing.assert_array_equal(got, host, err_msg=case['key'])
      expected = arrays[case['key']]
      if case['op'] in randaugment.SIGNED_OPS:  # As the host path's test.
        assert np.abs(got.astype(int) - expected).max() <= 1, case['key']
      else:
        np.testing.assert_array_equal(got, expected, err_msg=case['key'])
      checked += 1
  assert checked == len(cases) == 135


@pytest.mark.parametrize('mode, magnitude', [('official', 15.0),
                                             ('relative', 5.0)])
def test_every_op_matches_the_host_on_random_images(mode, magnitude):
  rng = np.random.default_rng(int(magnitude))
  images = rng.integers(0, 256, (2 * 16, 40, 48, 3)).astype(np.uint8)
  images[1::2] //= 3  # Darker halves: other extremes and histograms.
  draws = []
  for i in range(len(images)):
    d = randaugment.draw(2, 40, 48, rng)
    d.ops[0] = i % 16  # Every op, then a random one.
    draws.append(d)
  got = _device_ra(images, draws, magnitude, mode)
  for i, (image, d) in enumerate(zip(images, draws)):
    want = randaugment.apply_draws(image, d, magnitude, mode)
    if mode == 'relative' and 'Contrast' in [randaugment.OP_NAMES[o]
                                             for o in d.ops]:
      # Its mean grey level is summed in another order (module docstring).
      assert np.abs(got[i].astype(int) - want).max() <= 2
    else:
      np.testing.assert_array_equal(got[i], want, err_msg=str(d))


@pytest.mark.parametrize('mixup, cutmix, layers', [
    (0.2, 1.0, 4), (0.0, 1.0, 2), (0.2, 0.0, 0), (0.0, 0.0, 3)])
def test_train_batch_on_device_equals_the_host_batch(mixup, cutmix, layers):
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, (50 + 3 * i, 60, 3)).astype(
      np.uint8), 'label': i % 5} for i in range(8)]
  kwargs = dict(random_crop=True, flip=True, randaugment_layers=layers,
                randaugment_magnitude=5.0, mixup_alpha=mixup,
                cutmix_alpha=cutmix)
  host = pipeline.TrainBatch(24, pipeline.Augment(**kwargs), 5, 4)(
      examples, np.random.default_rng(7))
  drawn = pipeline.TrainBatch(
      24, pipeline.Augment(**kwargs, on_device=True), 5, 4)(
          examples, np.random.default_rng(7))
  assert drawn['images'].dtype == np.float32
  fn = _jit(functools.partial(device_augment.augment, num_layers=layers,
                              magnitude=5.0))
  device = {k: np.asarray(v) for k, v in fn(drawn).items()}
  assert sorted(device) == sorted(host)
  for key in host:
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)
