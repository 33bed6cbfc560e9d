"""A bad config fails before any compute, naming field, value and allowed.

In-process: validation only traces the model, so these tests compile
nothing (checked with JAX's compile-event listener).
"""
import os

import jax
import pytest

from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import loop
import train_harness as testing

ConfigError = config_validation.ConfigError


@pytest.fixture
def config(tmp_path):
  cfg = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
  cfg.workdir = str(tmp_path / "run")
  return cfg


@pytest.fixture
def compiles():
  """Records every XLA compilation while a test runs."""
  with testing.compile_events() as events:
    yield events


def _error(config, *needles):
  with pytest.raises(ConfigError) as info:
    loop.run(config)
  message = str(info.value)
  for needle in needles:
    assert needle in message, message
  assert not os.path.exists(os.path.join(config.workdir, "checkpoints"))
  return message


def test_unknown_variant(config, compiles):
  config.model.kwargs = {**config.model.kwargs.to_dict(), "variant": "F9"}
  _error(config, "config.model.kwargs=", "variant='F9' is unknown",
         "allowed:", "'F0'", "'F7+'")
  assert not compiles


def test_unknown_model(config, compiles):
  config.model.name = "NFNot"
  _error(config, "config.model.name='NFNot' is invalid", "allowed:",
         "'NFNet'")
  assert not compiles


def test_negative_learning_rate(config, compiles):
  config.optimizer.lr.base_lr = -0.1
  _error(config, "config.optimizer.lr.base_lr", "-0.1", "> 0")
  assert not compiles


def test_batch_not_divisible_by_devices(config, compiles, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  config.train.global_batch_size = 10
  config.eval.batch_size = 6
  _error(config, "config.train.global_batch_size=10 is invalid",
         "a positive multiple of 4", "config.eval.batch_size=6 is invalid")
  assert not compiles


def test_image_too_small_for_the_model(config, compiles):
  config.train.image_size = 4  # The smoke net downsamples 8x.
  _error(config, "config.train.image_size=4 is invalid",
         ">= 8 for this model", "at least 1x1")
  assert not compiles


def test_missing_and_unknown_dataset(config, compiles, tmp_path):
  config.dataset.name = "imagenet2012"
  config.dataset.data_dir = str(tmp_path / "no_tfds_here")
  _error(config, "config.dataset.name='imagenet2012'", "no prepared TFDS")
  config.dataset.name = "no_such_dataset"
  _error(config, "config.dataset.name='no_such_dataset'", "known:")
  assert not compiles


def test_every_problem_reported_at_once(config, compiles):
  config.train.loss = "hinge"
  config.train.compute_dtype = "float16"
  config.train.label_smoothing = 1.5
  config.checkpoint.max_to_keep = 0
  config.train.num_steps = -3
  message = _error(config, "config.train.loss='hinge'", "'softmax' or "
                   "'sigmoid'", "config.train.compute_dtype='float16'",
                   "config.train.label_smoothing=1.5",
                   "config.checkpoint.max_to_keep=0",
                   "config.train.num_steps=-3")
  assert message.count("\n") >= 5
  assert not compiles


def test_valid_config_passes(config):
  plan = config_validation.validate(config)
  spec = plan.spec
  assert spec.num_classes == 10
  assert spec.total_steps == 1
  assert spec.num_train_examples == 1437 and spec.num_eval_examples == 360


@pytest.mark.parametrize("value", ["4", "4,2", "a,b", "-1,3", "1,2,3"])
def test_bad_profile_steps(config, compiles, value):
  config.logging.profile_steps = value
  _error(config, f"config.logging.profile_steps={value!r} is invalid",
         "0 <= START < STOP")
  assert not compiles
