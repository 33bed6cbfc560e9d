"""Inference with weights standardized once (`Model.kernels`).

`Model.__call__` and `nj.export` run the forward with each WS convolution's
kernel standardized once per set of weights (`layers.standardized_kernels`);
the standard forward standardizes on every call. The logits must agree to
float rounding for every family, and the kernels must follow the weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.models import families
from nfnets_jax.models import layers

TINY_NFNET = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
              "test_imsize": 16, "randaugment_layers": 0,
              "randaugment_magnitude": 0, "drop_rate": 0.0}
TINY_REGNET = {"width": (16, 32), "depth": (1, 1), "train_imsize": 16,
               "test_imsize": 16, "drop_rate": 0.0}
# A registry name per family, shrunk (NFNet in timm's forward; the official
# one is exported below), and the number of WS convolutions each has.
TINY_MODELS = {
    "dm_nfnet_f0": (dict(variant=TINY_NFNET, group_size=8), 15),
    "nf_resnet26": (dict(depth=(1, 1), width=0.25, se_ratio=0.25), 9),
    "nf_regnet_b0": (dict(variant=TINY_REGNET), 10),
    "resnet26": (dict(depth=(1, 1), width=0.25), 0),
}


def ws_convs(params):
  """The modules with a 4-D `w` and a `gain`: the WS convolutions."""
  return {m for m, p in params.items() if "gain" in p and p["w"].ndim == 4}


def perturbed(model, seed=1):
  """The model's params plus noise: non-zero skip gains, uneven WS gains."""
  leaves, treedef = jax.tree.flatten(model.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_standardized_once_equals_the_standard_forward(name):
  kwargs, num_ws_convs = TINY_MODELS[name]
  model = nj.create_model(name, pretrained=False, num_classes=5, **kwargs)
  model.params = perturbed(model)
  images = jax.random.normal(jax.random.key(2), (3, 24, 24, 3))
  standard = jax.jit(model.logits)(model.params, model.state, images)
  once = model(images)
  assert set(model.kernels()) == ws_convs(model.params)
  assert len(model.kernels()) == num_ws_convs
  np.testing.assert_allclose(once, standard, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(standard))))


def test_kernels_are_the_standardized_weights_and_follow_new_params():
  kwargs, _ = TINY_MODELS["dm_nfnet_f0"]
  model = nj.create_model("dm_nfnet_f0", pretrained=False, num_classes=5,
                          **kwargs)
  model.params = perturbed(model, seed=3)
  module = "NFNet/~/nf_block/~/conv0"
  p = model.params[module]
  w = np.asarray(p["w"], np.float64).reshape(-1, p["w"].shape[-1])
  # timm's form (dm_nfnet_*): (W - mean) / sqrt((var + 1e-5) * fan_in) * gain.
  expected = ((w - w.mean(0)) / np.sqrt((w.var(0) + 1e-5) * w.shape[0])
              * np.asarray(p["gain"]))
  got = np.asarray(model.kernels()[module]).reshape(w.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  first = model.kernels()
  assert model.kernels() is first  # Same params: not recomputed.
  model.params = perturbed(model, seed=4)
  images = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
  np.testing.assert_allclose(
      model(images), jax.jit(model.logits)(model.params, model.state, images),
      rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.kernels()[module], first[module])


def test_export_runs_the_standardized_forward(tmp_path):
  model = nj.create_model("nfnet_f0", pretrained=False, num_classes=5,
                          variant=TINY_NFNET, group_size=8)
  model.params = perturbed(model, seed=6)
  loaded = nj.load_exported(nj.export(model, tmp_path / "m.nfx"))
  size = model.data_config.test_size
  images = jax.random.normal(jax.random.key(7), (2, size, size, 3))
  np.testing.assert_allclose(
      loaded(images), jax.jit(model.logits)(model.params, model.state, images),
      rtol=1e-5, atol=1e-6)


def test_settings_kernels_and_the_context():
  net = families.make_network("NFResNet", dict(depth=(1, 1), width=0.25), 3)
  x = jax.random.normal(jax.random.key(8), (1, 16, 16, 3))
  params, state = jax.jit(net.init, static_argnames="is_training")(
      jax.random.key(9), x, is_training=True)
  settings = layers.ws_conv_settings(
      lambda p, s, x: net.apply(p, s, None, x, is_training=False),
      params, state, jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert set(settings) == ws_convs(params)
  assert set(settings.values()) == {(1e-4, "clamp")}  # The official floor.
  kernels = layers.standardize_kernels(params, settings)
  name = sorted(kernels)[0]
  np.testing.assert_array_equal(kernels[name], layers.standardize_weight(
      params[name]["w"], params[name]["gain"], 1e-4, "clamp"))

  # Given kernels are used as they are: with zero kernels (and the zero
  # initial biases) every activation is 0, so the logits are the
  # classifier's bias.
  (head,) = [m for m in params if m.endswith("linear")]
  params[head]["b"] = jnp.arange(3.0)

  @jax.jit
  def forward(params, kernels):
    with layers.standardized_kernels(kernels):
      return net.apply(params, state, None, x, is_training=False)[0]

  zeros = {k: jnp.zeros_like(v) for k, v in kernels.items()}
  np.testing.assert_array_equal(forward(params, zeros)["logits"],
                                [[0.0, 1.0, 2.0]])
