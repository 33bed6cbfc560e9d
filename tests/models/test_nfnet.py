"""NFNet: the paper's sizes, official parameter names, signal propagation."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.models import stats
from nfnets_jax.models import nfnet

# Table 1 of Brock et al. 2021 (ICML): parameters (M) and FLOPs (B, MACs at the
# test resolution).
PAPER = {
    "F0": (71.5, 12.38), "F1": (132.6, 35.54), "F2": (193.8, 62.59),
    "F3": (254.9, 114.76), "F4": (316.1, 215.24), "F5": (377.2, 289.76),
    "F6": (438.4, 377.28),
}

SMALL = dict(width=(64, 128), depth=(3, 2), train_imsize=64, test_imsize=64,
             randaugment_layers=0, randaugment_magnitude=0, drop_rate=0.0)


def _eval_fn(variant, **kw):
  return lambda x: nj.NFNet(1000, variant, **kw)(x, is_training=False)


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_params_and_flops_match_paper(variant):
  params_m, flops_b = PAPER[variant]
  fn = _eval_fn(variant)
  params, state = stats.init_shapes(fn, 64)
  assert state == {}
  assert round(nj.count_params(params) / 1e6, 1) == params_m
  flops = nj.count_flops(fn, nfnet.NFNET_VARIANTS[variant].test_imsize)
  np.testing.assert_allclose(flops / 1e9, flops_b, rtol=0.01)


def test_flops_count_conv_and_dense_macs_not_weight_standardization():
  def fn(x):
    x = nj.WSConv2D(8, 3)(x)  # 8x8 outputs x 8 channels x (3*3*3).
    return hk.Linear(10)(jnp.mean(x, axis=(1, 2)))  # 8 x 10.
  assert nj.count_flops(fn, 8) == 8 * 8 * 8 * 27 + 8 * 10


def test_f0_parameter_names_mirror_official_release():
  params, _ = stats.init_shapes(_eval_fn("F0"), 64)
  assert nj.count_params(params) == 71_489_284
  stem = {f"NFNet/~/stem_conv{i}" for i in range(4)}
  blocks = {"NFNet/~/nf_block"} | {f"NFNet/~/nf_block_{i}" for i in range(1, 12)}
  assert stem <= set(params) and blocks <= set(params)
  assert "NFNet/~/nf_block_12" not in params
  assert set(params["NFNet/~/nf_block_3"]) == {"skip_gain"}
  for conv in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut"):
    assert set(params[f"NFNet/~/nf_block/~/{conv}"]) == {"w", "gain", "bias"}
  # Only transition blocks (first of each stage) have a shortcut conv.
  shortcuts = sorted(k for k in params if k.endswith("conv_shortcut"))
  assert shortcuts == [f"NFNet/~/nf_block{s}/~/conv_shortcut"
                       for s in ("", "_1", "_3", "_9")]
  assert params["NFNet/~/nf_block_9/~/conv1"]["w"].shape == (3, 3, 128, 768)
  se = "NFNet/~/nf_block_11/~/squeeze_excite/~/linear"
  assert params[se]["w"].shape == (1536, 768)
  assert params[se + "_1"]["w"].shape == (768, 1536)
  assert params["NFNet/~/final_conv"]["w"].shape == (1, 1, 1536, 3072)
  assert params["NFNet/~/linear"]["w"].shape == (3072, 1000)


def test_plus_variants_are_wider():
  v = nfnet.NFNET_VARIANTS["F1+"]
  assert v.width == (384, 768, 2048, 2048)
  assert v.depth == nfnet.NFNET_VARIANTS["F1"].depth


def test_unknown_variant_and_bad_custom_variant_raise():
  with pytest.raises(ValueError, match="variant='F9' is unknown.*F0"):
    nfnet.get_variant("F9")
  with pytest.raises(ValueError, match="needs exactly"):
    nfnet.get_variant({"width": (8,), "depth": (1,)})
  with pytest.raises(ValueError, match="same number of stages"):
    nfnet.get_variant({**SMALL, "depth": (1,)})


def test_stochastic_depth_rate_grows_linearly_with_block_index():
  rates = []

  def fn(x):
    net = nj.NFNet(10, SMALL, group_size=16, stochdepth_rate=0.25)
    rates.extend(b.stoch_depth.drop_rate if b.stoch_depth else 0.0
                 for b in net.blocks)
    return net(x, is_training=False)

  stats.init_shapes(fn, 32)
  np.testing.assert_allclose(rates, [0.25 * i / 5 for i in range(5)])


def _signal(x, skip_gains):
  """The forward's scalar metrics on `x`, once per skip gain (one program)."""
  f = hk.transform_with_state(lambda x: nj.NFNet(
      10, SMALL, group_size=16, stochdepth_rate=0.0)(
          x, is_training=False, return_metrics=True))
  params, state = jax.jit(f.init)(jax.random.key(0), x)
  apply = jax.jit(f.apply)
  metrics = []
  for gain in skip_gains:
    p = jax.tree_util.tree_map_with_path(
        lambda path, p, gain=gain: jnp.full_like(p, gain)
        if path[-1].key == "skip_gain" else p, params)
    out, _ = apply(p, state, None, x)
    metrics.append({k: float(v) for k, v in out.items() if v.ndim == 0})
  return metrics


def test_signal_propagation_within_a_stage():
  """Measured, not computed: unit-variance branch inputs, +alpha^2 per block.

  Inputs are white N(0, 1) noise. The first stage has no average pool; at a
  transition, averaging 2x2 windows of spatially uncorrelated activations
  divides their variance by up to 4, so white noise cannot test the reset
  there (NF-ResNets, whose shortcut is a strided conv, test it in
  test_model_families.py).
  """
  m, m0 = _signal(jax.random.normal(jax.random.key(1), (2, 96, 96, 3)),
                  skip_gains=(1.0, 0.0))
  alpha = 0.2
  for i in range(3):  # The first stage.
    np.testing.assert_allclose(m[f"branch_in_avg_var_{i}"], 1.0, rtol=0.1)
  for i in range(1, 3):
    growth = m[f"avg_var_{i + 1}"] - m[f"avg_var_{i}"]
    np.testing.assert_allclose(growth, alpha**2 * m[f"res_avg_var_{i}"],
                               rtol=0.1)
    np.testing.assert_allclose(growth, alpha**2, rtol=0.25)
  # With skip-init (zero gains) every block is the identity at init.
  for i in (2, 5):
    np.testing.assert_allclose(m0[f"avg_var_{i}"], m0[f"avg_var_{i - 1}"],
                               rtol=1e-5)


def test_jit_forward_in_float32_and_bfloat16():
  f = hk.transform_with_state(
      lambda x, t: nj.NFNet(7, SMALL, group_size=16, drop_rate=0.5)(x, t))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params, state = jax.jit(f.init, static_argnums=2)(jax.random.key(1), x,
                                                     True)

  @jax.jit
  def forwards(params, state, x):
    """Train mode in bfloat16; eval mode in float32 and bfloat16."""
    low = x.astype(jnp.bfloat16)
    train, _ = f.apply(params, state, jax.random.key(2), low, True)
    ref, _ = f.apply(params, state, None, x, False)
    low, _ = f.apply(params, state, None, low, False)
    return train, ref, low

  train, ref, low = forwards(params, state, x)
  # Convolutions run in the input dtype; the classifier in float32.
  for out, dtype in ((train, jnp.bfloat16), (ref, jnp.float32),
                     (low, jnp.bfloat16)):
    assert out["pool"].dtype == dtype
    assert out["logits"].shape == (2, 7)
    assert out["logits"].dtype == jnp.float32
  np.testing.assert_allclose(low["logits"], ref["logits"], atol=0.05)
