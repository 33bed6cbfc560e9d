"""Tests of nfnets_jax.export / load_exported (jax.export artifacts)."""
import dataclasses

import jax
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import export as exporting
from nfnets_jax.pretrained import registry

TINY = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
        "test_imsize": 16, "randaugment_layers": 0,
        "randaugment_magnitude": 0, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def tiny_model():
  """A random tiny NFNet with 16 px inputs and named classes."""
  model = nj.create_model("nfnet_f0", num_classes=5, variant=TINY,
                          group_size=8, seed=1)
  return dataclasses.replace(
      model, data_config=registry.DataConfig(16, 16, crop_padding=4),
      label_names=("a", "b", "c", "d", "e"))


def images(n, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (n, 16, 16, 3)).astype(np.float32)


def test_round_trip_at_two_batch_sizes(tiny_model, tmp_path):
  path = nj.export(tiny_model, tmp_path / "tiny.nfx")
  loaded = nj.load_exported(path)
  for n in (1, 3):
    x = images(n, seed=n)
    np.testing.assert_allclose(loaded(x), tiny_model(x), rtol=1e-5,
                               atol=1e-5)
  assert loaded.batch_size is None and loaded.num_classes == 5
  assert loaded.label_names == ("a", "b", "c", "d", "e")
  assert loaded.data_config == tiny_model.data_config
  assert create.detect_format(path) == "exported"
  with pytest.raises(ValueError, match="exported model"):
    nj.create_model("nfnet_f0", pretrained=path)


def test_the_artifact_runs_with_plain_jax(tiny_model, tmp_path):
  path = nj.export(tiny_model, tmp_path / "tiny.nfx")
  data = open(path, "rb").read()
  start = len(exporting.MAGIC) + 8
  length = int.from_bytes(data[len(exporting.MAGIC):start], "little")
  exported = jax.export.deserialize(bytearray(data[start + length:]))
  x = images(2)
  np.testing.assert_allclose(exported.call(x), tiny_model(x), rtol=1e-5,
                             atol=1e-5)


def test_fixed_batch_size(tiny_model, tmp_path):
  loaded = nj.load_exported(nj.export(tiny_model, tmp_path / "b2.nfx",
                                      batch_size=2))
  assert loaded.batch_size == 2
  x = images(2, seed=7)
  np.testing.assert_allclose(loaded(x), tiny_model(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    loaded(images(3))
  with pytest.raises(ValueError, match="batch_size=0"):
    nj.export(tiny_model, tmp_path / "b0.nfx", batch_size=0)


def test_load_exported_refuses_other_files(tmp_path):
  path = tmp_path / "x.npz"
  path.write_bytes(b"PK\x03\x04 not an export")
  with pytest.raises(ValueError, match="not an nfnets_jax export"):
    nj.load_exported(path)
