"""`create_model(features_only=True)`: timm's feature maps, out_indices, export.

The F0 test loads a randomly initialized, perturbed timm `dm_nfnet_f0`
(`perturbed_timm_f0` of tests/conftest.py) from a `.safetensors` file, as
timm's own `features_only=True` model does, and compares the maps of one
64 px batch of 2. The others use a tiny NF-RegNet (random weights).
"""
import dataclasses

import jax
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.models import families
from nfnets_jax.pretrained import create

TINY_REGNET = dict(variant=dict(width=(16, 24, 32), depth=(1, 2, 1),
                                train_imsize=32, test_imsize=32,
                                drop_rate=0.0), width=1.0)
TINY_MAPS = ["stem.conv", "stages.0", "stages.1", "final_conv"]


def test_f0_features_equal_timms(perturbed_timm_f0, tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  torch_model, *_ = perturbed_timm_f0
  path = str(tmp_path / "dm_nfnet_f0.safetensors")
  safetensors_torch.save_file(torch_model.state_dict(), path)
  theirs = timm.create_model("dm_nfnet_f0", features_only=True,
                             pretrained=True,
                             pretrained_cfg_overlay=dict(file=path)).eval()
  ours = nj.create_model("dm_nfnet_f0", pretrained=path, features_only=True)
  assert [(f.module, f.channels, f.reduction) for f in ours.feature_info] == [
      (d["module"], d["num_chs"], d["reduction"])
      for d in theirs.feature_info.get_dicts()]

  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(
      np.float32)
  with torch.no_grad():
    want = [f.numpy().transpose(0, 2, 3, 1)
            for f in theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)))]
  got = ours(x)

  assert len(got) == len(want) == 5
  for info, g, w in zip(ours.feature_info, got, want):
    assert g.shape == w.shape == (2, 64 // info.reduction,
                                  64 // info.reduction, info.channels)
    scale = np.abs(w).max()
    rel = np.abs(np.asarray(g) - w).max() / scale
    print(f"\n{info.module}: max|map|={scale:.3g} max|diff|/max|map|="
          f"{rel:.2g}")
    assert scale > 0.1 and rel <= 1e-4, info.module


@pytest.fixture(scope="module")
def tiny():
  """A features model of two of the tiny NF-RegNet's four maps."""
  model = nj.create_model("nf_regnet_b0", pretrained=False,
                          features_only=True, out_indices=(-1, 1),
                          **TINY_REGNET)
  # A small export (nj.export traces the data config's test size).
  model.data_config = dataclasses.replace(model.data_config, test_size=32)
  return model


def test_out_indices_select_maps_in_network_order(tiny):
  assert tiny.feature_indices == (1, 3)
  assert [(f.module, f.channels, f.reduction) for f in tiny.feature_info] == [
      ("stages.0", 16, 4), ("final_conv", 93, 16)]
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(
      np.float32)
  maps = tiny(x)
  assert [m.shape for m in maps] == [(2, 8, 8, 16), (2, 2, 2, 93)]
  # Weights standardized once (`model(x)`) or in the forward: same maps.
  standardizing = jax.jit(tiny.forward)(tiny.params, tiny.state, x)
  for got, want in zip(maps, standardizing):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_export_of_a_features_model(tiny, tmp_path):
  path = nj.export(tiny, tmp_path / "tiny.nfx", batch_size=2)
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(
      np.float32)
  for got, want in zip(nj.load_exported(path)(x), tiny(x)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_indices, want", [
    (None, (0, 1, 2, 3)), ((3, 1), (1, 3)), ((-1,), (3,)),
    ((3, -4, 1, 2, 2), (0, 1, 2, 3)), (np.array([2, 0]), (0, 2))])
def test_feature_indices_in_network_order_each_once(out_indices, want):
  info = families.feature_info("NFRegNet", TINY_REGNET)
  assert [f.module for f in info] == TINY_MAPS
  assert create.feature_indices(info, out_indices, "tiny") == want


@pytest.mark.parametrize("out_indices, why", [
    ((4,), "4 is not a map index"), ((-5,), "-5 is not a map index"),
    ((1.0,), "1.0 is not a map index"), ([True], "True is not a map index"),
    ((), r"selects no map"), (3, "is not a sequence of map indices"),
])
def test_bad_out_indices_name_the_value_and_the_range(out_indices, why):
  info = families.feature_info("NFRegNet", TINY_REGNET)
  with pytest.raises(ValueError, match=(
      rf"out_indices=.*{why}; allowed: ints in \[-4, 3\] for the 4 maps of "
      rf"tiny \['stem.conv', 'stages.0', 'stages.1', 'final_conv'\]")):
    create.feature_indices(info, out_indices, "tiny")


def test_create_model_errors():
  with pytest.raises(ValueError, match=r"out_indices=\(1,\) selects feature "
                     "maps; it needs features_only=True"):
    nj.create_model("nf_regnet_b0", pretrained=False, out_indices=(1,))
  with pytest.raises(ValueError, match=r"out_indices=\(7,\): 7 is not a map "
                     r"index; allowed: ints in \[-4, 3\] for the 4 maps of "
                     "nf_regnet_b0"):
    nj.create_model("nf_regnet_b0", pretrained=False, features_only=True,
                    out_indices=(7,), **TINY_REGNET)
