"""Tests of the normalizer-free building blocks against NumPy references."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import layers


@pytest.mark.parametrize("name", sorted(layers.NONLINEARITY_GAMMAS))
def test_shipped_gamma_matches_sampled_estimate(name):
  estimate = layers.estimate_gamma(layers.RAW_NONLINEARITIES[name])
  np.testing.assert_allclose(layers.NONLINEARITY_GAMMAS[name], estimate,
                             rtol=2e-3)


def test_relu_gamma_is_analytic_value():
  analytic = np.sqrt(2.0 / (1.0 - 1.0 / np.pi))
  np.testing.assert_allclose(layers.NONLINEARITY_GAMMAS["relu"], analytic,
                             rtol=1e-3)
  np.testing.assert_allclose(layers.estimate_gamma(jax.nn.relu), analytic,
                             rtol=1e-3)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "elu"])
def test_scaled_activation_has_unit_variance(name):
  x = jax.random.normal(jax.random.key(3), (1_000_000,))
  np.testing.assert_allclose(jnp.var(layers.get_activation(name)(x)), 1.0,
                             rtol=1e-2)


def test_unknown_activation_raises_with_allowed_names():
  with pytest.raises(ValueError, match="activation='rleu'.*relu"):
    layers.get_activation("rleu")


def _numpy_standardize(w, gain, eps):
  fan_in = np.prod(w.shape[:-1])
  flat = w.reshape(-1, w.shape[-1])
  mean, var = flat.mean(0), flat.var(0)
  return ((flat - mean) * gain / np.sqrt(np.maximum(var * fan_in, eps))
          ).reshape(w.shape)


@pytest.mark.parametrize("shape", [(3, 3, 8, 5), (1, 1, 16, 4), (5, 7, 2, 3)])
def test_standardize_weight_matches_numpy(shape):
  rng = np.random.default_rng(0)
  w = rng.normal(0.3, 2.0, shape).astype(np.float32)
  gain = rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32)
  got = layers.standardize_weight(jnp.asarray(w), jnp.asarray(gain))
  np.testing.assert_allclose(got, _numpy_standardize(w, gain, 1e-4),
                             rtol=1e-5, atol=1e-6)
  fan_in = np.prod(shape[:-1])
  flat = np.asarray(got).reshape(-1, shape[-1])
  np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(flat.std(0) * np.sqrt(fan_in), gain, rtol=1e-4)


def test_standardize_weight_eps_modes():
  w = jnp.zeros((3, 3, 4, 2))  # zero variance: the floor decides.
  gain = jnp.ones(2)
  for mode in ("clamp", "add"):
    assert np.all(np.isfinite(layers.standardize_weight(w, gain, 1e-4, mode)))
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 2))
  fan_in = 36
  var = np.var(np.asarray(w).reshape(-1, 2), axis=0)
  added = layers.standardize_weight(w, gain, 1e-2, "add")
  centered = np.asarray(w) - np.asarray(w).reshape(-1, 2).mean(0)
  np.testing.assert_allclose(added, centered / np.sqrt((var + 1e-2) * fan_in),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="eps_mode='bad'"):
    layers.standardize_weight(w, gain, 1e-4, "bad")


def test_standardize_weight_gradient_matches_numpy_finite_differences():
  rng = np.random.default_rng(1)
  w = rng.normal(0.2, 1.5, (3, 3, 2, 3))
  gain = rng.uniform(0.5, 2.0, 3)
  probe = rng.normal(size=w.shape)  # loss = sum(probe * W_hat)

  def loss(w_, gain_):
    return np.sum(probe * _numpy_standardize(w_, gain_, 1e-4))

  def central_difference(f, x, h=1e-5):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
      step = np.zeros_like(x)
      step[i] = h
      grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad

  got_w, got_gain = jax.grad(
      lambda w_, g_: jnp.sum(jnp.asarray(probe, jnp.float32)
                             * layers.standardize_weight(w_, g_)),
      argnums=(0, 1))(jnp.asarray(w, jnp.float32),
                      jnp.asarray(gain, jnp.float32))
  np.testing.assert_allclose(got_w, central_difference(lambda x: loss(x, gain),
                                                       w), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(got_gain, central_difference(
      lambda g: loss(w, g), gain), rtol=1e-3, atol=1e-4)



def _numpy_conv_same(x, w):
  """Stride-1 SAME NHWC x HWIO convolution by brute force."""
  kh, kw = w.shape[:2]
  pad = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros(x.shape[:3] + (w.shape[-1],))
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      out[:, i, j] = np.einsum("nhwc,hwco->no", pad[:, i:i + kh, j:j + kw], w)
  return out


def test_wsconv_forward_matches_numpy_and_has_official_params():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  f = hk.transform(lambda x: layers.WSConv2D(5, 3)(x))
  params = f.init(jax.random.key(1), x)
  assert set(params["ws_conv2_d"]) == {"w", "gain", "bias"}
  p = params["ws_conv2_d"]
  p = {**p, "gain": p["gain"] * 1.5, "bias": p["bias"] + 0.25}
  got = f.apply({"ws_conv2_d": p}, None, x)
  w = _numpy_standardize(np.asarray(p["w"]), np.asarray(p["gain"]), 1e-4)
  want = _numpy_conv_same(np.asarray(x), w) + 0.25
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wsconv_preserves_variance_after_gamma_relu():
  x = layers.get_activation("relu")(
      jax.random.normal(jax.random.key(0), (8, 32, 32, 64)))
  f = hk.transform(lambda x: layers.WSConv2D(64, 1)(x))
  out = f.apply(f.init(jax.random.key(1), x), None, x)
  np.testing.assert_allclose(layers.avg_channel_var(out), 1.0, rtol=0.05)


def test_wsconv_keeps_float32_params_under_bfloat16():
  x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
  f = hk.transform(lambda x: layers.WSConv2D(2, 3, feature_group_count=1)(x))
  params = f.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert f.apply(params, None, x).dtype == jnp.bfloat16


def test_wsconv_rejects_indivisible_groups():
  f = hk.transform(lambda x: layers.WSConv2D(4, 3, feature_group_count=3)(x))
  with pytest.raises(ValueError, match="not divisible by 3 groups"):
    f.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))


def test_squeeze_excite_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 8))
  f = hk.transform(lambda x: layers.SqueezeExcite(8, 8, 0.5)(x))
  params = f.init(jax.random.key(1), x)
  fc0 = params["squeeze_excite/~/linear"]
  fc1 = params["squeeze_excite/~/linear_1"]
  assert fc0["w"].shape == (8, 4) and fc1["w"].shape == (4, 8)
  h = np.asarray(x).mean(axis=(1, 2))
  h = np.maximum(h @ fc0["w"] + fc0["b"], 0) @ fc1["w"] + fc1["b"]
  want = 1 / (1 + np.exp(-h))
  got = f.apply(params, None, x)
  assert got.shape == (3, 1, 1, 8)
  np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-5)


def test_stochastic_depth_drops_whole_examples_at_rate():
  x = jnp.ones((4000, 2, 2, 3))
  f = hk.transform(lambda x, t: layers.StochDepth(0.3)(x, t))
  out = np.asarray(f.apply({}, jax.random.key(0), x, True))
  per_example = out.reshape(4000, -1)
  assert np.all((per_example == 0) | (per_example == 1))
  assert np.all(per_example.min(1) == per_example.max(1))
  np.testing.assert_allclose(per_example[:, 0].mean(), 0.7, atol=0.03)
  np.testing.assert_array_equal(f.apply({}, None, x, False), x)
  scaled = hk.transform(
      lambda x: layers.StochDepth(0.5, scale_by_keep=True)(x, True))
  assert set(np.unique(scaled.apply({}, jax.random.key(1), x))) <= {0.0, 2.0}


def test_signal_metrics_match_numpy():
  x = np.random.default_rng(0).normal(0.5, 2.0, (4, 3, 3, 6))
  m = layers.signal_metrics(jnp.asarray(x), 7)
  np.testing.assert_allclose(m["avg_sq_mean_7"],
                             np.mean(x.mean(axis=(0, 1, 2)) ** 2), rtol=1e-5)
  np.testing.assert_allclose(m["avg_var_7"],
                             np.mean(x.var(axis=(0, 1, 2))), rtol=1e-5)
