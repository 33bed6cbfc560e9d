"""Inference with weights standardized once (`Model.kernels`).

`Model.__call__` and `nj.export` run the forward with each WS convolution's
kernel standardized once per set of weights (`layers.standardized_kernels`);
the standard forward standardizes on every call. The logits must agree to
float rounding for every family with WS convolutions, and the kernels must
follow the weights. (`tests/pretrained/test_timm_normfree.py` checks the
timm NormFreeNet models' `model(images)` against timm itself.)
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj

TINY_NFNET = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
              "test_imsize": 16, "randaugment_layers": 0,
              "randaugment_magnitude": 0, "drop_rate": 0.0}
TINY_REGNET = {"width": (16, 32), "depth": (1, 1), "train_imsize": 16,
               "test_imsize": 16, "drop_rate": 0.0}
# A registry name per family, shrunk (NFNet in timm's forward: eps added to
# the variance), and the number of WS convolutions each has.
TINY_MODELS = {
    "dm_nfnet_f0": (dict(variant=TINY_NFNET, group_size=8), 15, 1e-5, "add"),
    "nf_resnet26": (dict(depth=(1, 1), width=0.25, se_ratio=0.25), 9, 1e-4,
                    "clamp"),
    "nf_regnet_b0": (dict(variant=TINY_REGNET), 10, 1e-4, "clamp"),
}
IMAGES = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))


def ws_convs(params):
  """The modules with a 4-D `w` and a `gain`: the WS convolutions."""
  return {m for m, p in params.items() if "gain" in p and p["w"].ndim == 4}


def perturbed(params, seed=1):
  """`params` plus noise: non-zero skip gains, uneven WS gains."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=[
    "dm_nfnet_f0", "nf_regnet_b0",
    # Opt-in (-m long), to keep the suite under CI's 10 minutes.
    pytest.param("nf_resnet26", marks=pytest.mark.long)])
def model(request):
  kwargs = TINY_MODELS[request.param][0]
  model = nj.create_model(request.param, pretrained=False, num_classes=5,
                          **kwargs)
  model.params = perturbed(model.params)
  return model


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_standardized_once_equals_the_standard_forward(model, tmp_path):
  standard = jax.jit(model.logits)(model.params, model.state, IMAGES)
  assert_close(model(IMAGES), standard)
  if model.name == "dm_nfnet_f0":  # The exported program runs it too.
    small = dataclasses.replace(model, data_config=nj.DataConfig(16, 16))
    loaded = nj.load_exported(nj.export(small, tmp_path / "m.nfx"))
    assert_close(loaded(IMAGES), standard)


def test_the_forward_given_kernels_standardizes_nothing(model):
  """Scaled WS is the package's only rsqrt: the standard forward has one
  per WS convolution, the forward given the kernels none."""
  kernels = model.kernels()
  assert set(kernels) == ws_convs(model.params)
  assert len(kernels) == TINY_MODELS[model.name][1]

  def rsqrts(*args):
    jaxpr = jax.make_jaxpr(model.logits)(model.params, model.state, IMAGES,
                                         *args)
    return str(jaxpr).count("rsqrt")

  assert rsqrts() == len(kernels)
  assert rsqrts(kernels) == 0


def test_kernels_are_the_standardized_weights_and_follow_new_params(model):
  _, _, eps, mode = TINY_MODELS[model.name]
  name = sorted(model.kernels())[0]
  p = model.params[name]
  w = np.asarray(p["w"], np.float64).reshape(-1, p["w"].shape[-1])
  fan_in, var = w.shape[0], w.var(0)
  denominator = (np.sqrt((var + eps) * fan_in) if mode == "add"
                 else np.sqrt(np.maximum(var * fan_in, eps)))
  expected = (w - w.mean(0)) / denominator * np.asarray(p["gain"])
  got = np.asarray(model.kernels()[name]).reshape(w.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  first = model.kernels()
  assert model.kernels() is first  # The same params: not recomputed.
  model.params = perturbed(model.params, seed=4)
  assert model.kernels() is not first
  assert_close(model(IMAGES),
               jax.jit(model.logits)(model.params, model.state, IMAGES))
