"""NF-ResNet, NF-RegNet and the baselines (BN ResNet, SkipInit, Fixup).

Parameterized over families as dm-haiku's `nets/resnet_test.py`: jit forward
in float32 and bfloat16, output and metric keys, parameter counts against
timm and the official layout, official parameter names, errors, and signal
propagation measured on activations at init.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.cpu import compiler
from nfnets_jax.models import fixup_resnet
from nfnets_jax.models import stats
from nfnets_jax.models import families
from nfnets_jax.models import nf_regnet
from nfnets_jax.models import nf_resnet
from nfnets_jax.models import resnet
from nfnets_jax.models import skipinit_resnet
import signal_utils

NUM_CLASSES = 7
TINY_REGNET = dict(width=(16, 32), depth=(1, 2), train_imsize=32,
                   test_imsize=32, drop_rate=0.2)
TINY = dict(depth=(1, 1), width=0.25)

# name -> (constructor, kwargs, blocks, has BN state). Narrow two-stage
# networks (32x32 input: 8x8 and 4x4 stages), with dropout, stochastic depth
# and SE where the family has them; the signal tests below run deeper ones.
FAMILIES = {
    "NFResNet": (nf_resnet.NFResNet,
                 dict(TINY, drop_rate=0.2, se_ratio=0.25), 2, False),
    "NFResNet-noWS": (nf_resnet.NFResNet, dict(TINY, use_ws=False), 2,
                      False),
    "NFRegNet": (nf_regnet.NFRegNet,
                 dict(variant=dict(TINY_REGNET, depth=(1, 1))), 2, False),
    "ResNet": (resnet.ResNet, dict(TINY, drop_rate=0.2, se_ratio=0.25), 2,
               True),
    "ResNet-unnormalized": (resnet.ResNet, dict(TINY, normalization="none"),
                           2, False),
    "SkipInitResNet": (skipinit_resnet.SkipInitResNet,
                       dict(TINY, drop_rate=0.2), 2, False),
    "FixupResNet": (fixup_resnet.FixupResNet, dict(TINY, drop_rate=0.2), 2,
                    False),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def forward(request):
  """One compile per family: f32 train, f32 eval and bf16 eval forwards."""
  ctor, kwargs, num_blocks, has_state = FAMILIES[request.param]
  f = hk.transform_with_state(
      lambda x, t, m=False: ctor(NUM_CLASSES, **kwargs)(x, t, m))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  params, state = compiler.run_once(
      lambda rng, x: f.init(rng, x, True), jax.random.key(1), x)
  # Non-zero skip gains and scalar biases so every branch contributes.
  params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 0 else p, params)

  # The train step sees another batch than init did: with the init batch
  # the first norm's statistics repeat, and its average moves by rounding.
  x_train = jax.random.normal(jax.random.key(3), x.shape)

  def run(params, state, rng, x, x_train):
    train = f.apply(params, state, rng, x_train, True, True)
    ref = f.apply(params, state, None, x, False)
    low = f.apply(params, state, None, x.astype(jnp.bfloat16), False)
    return train, ref, low

  # One program compiled without LLVM optimization: 3-4x faster to compile
  # on CPU (the train-mode RNG kernels), same program.
  args = (params, state, jax.random.key(2), x, x_train)
  outs = compiler.run_once(run, *args)
  return dict(name=request.param, params=params, state=state, outs=outs,
              num_blocks=num_blocks, has_state=has_state)


def test_float32_forward_shapes_and_metric_keys(forward):
  (out, new_state), _, _ = forward["outs"]
  n = forward["num_blocks"]
  assert out["logits"].shape == (4, NUM_CLASSES)
  assert out["logits"].dtype == jnp.float32
  assert out["pool"].ndim == 2 and out["pool"].shape[0] == 4
  keys = {"logits", "pool"}
  keys |= {f"{k}_{i}" for k in ("avg_sq_mean", "avg_var")
           for i in range(n + 1)}
  keys |= {f"{k}_{i}" for k in ("res_avg_var", "branch_in_avg_var")
           for i in range(n)}
  assert set(out) == keys
  for k, v in out.items():
    assert np.all(np.isfinite(v)), k
  # Batch-norm moving averages live in Haiku state and move in training.
  # Init leaves each average at init's batch statistic; the first debiased
  # update sets it to the step batch's statistic, >= 1% away here for a new
  # batch (with the same batch, the first norm's would move by rounding).
  assert bool(forward["state"]) == forward["has_state"]
  for old, new in zip(jax.tree.leaves(forward["state"]),
                      jax.tree.leaves(new_state)):
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    assert np.max(np.abs(new - old)) > 1e-4 * np.max(np.abs(old))


def test_bfloat16_forward_matches_float32(forward):
  _, (ref, ref_state), (low, low_state) = forward["outs"]
  assert low["pool"].dtype == jnp.bfloat16
  # Parameters stay float32 whatever the compute dtype.
  for p in jax.tree.leaves(forward["params"]):
    assert p.dtype == jnp.float32
  assert set(low) == {"logits", "pool"}
  np.testing.assert_allclose(low["pool"].astype(jnp.float32), ref["pool"],
                             rtol=0.05, atol=0.05)
  np.testing.assert_allclose(low["logits"], ref["logits"], rtol=0.05,
                             atol=0.05)
  # Evaluation reads the moving averages and leaves them alone.
  for s in (ref_state, low_state):
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), forward["state"],
                        s)
    assert all(jax.tree.leaves(same))


# (timm model, our constructor) with exactly timm's layout: rounding channels
# to multiples of 8 (NF-RegNet) and no skip-gain scalar (timm zero-inits the
# last conv's gain instead).
TIMM_LAYOUT = {
    "nf_resnet50": lambda: nf_resnet.NFResNet(1000, 50, skipinit_gain=None),
    "nf_resnet26": lambda: nf_resnet.NFResNet(1000, 26, skipinit_gain=None),
    "nf_seresnet50": lambda: nf_resnet.NFResNet(
        1000, 50, skipinit_gain=None, se_ratio=1 / 16),
    "nf_regnet_b0": lambda: nf_regnet.NFRegNet(
        1000, "B0", ch_div=8, skipinit_gain=None),
    "nf_regnet_b1": lambda: nf_regnet.NFRegNet(
        1000, "B1", ch_div=8, skipinit_gain=None),
    "resnetv2_50": lambda: resnet.ResNet(1000, 50),
}
TIMM_COUNTS = {
    "nf_resnet50": 25_557_032, "nf_resnet26": 15_995_176,
    "nf_seresnet50": 28_088_024, "nf_regnet_b0": 8_764_288,
    "nf_regnet_b1": 10_223_984, "resnetv2_50": 25_549_352,
}


def _count(build, image_size=64):
  params, _ = stats.init_shapes(lambda x: build()(x, True), image_size)
  return stats.count_params(params)


@pytest.mark.parametrize("timm_name", sorted(TIMM_LAYOUT))
def test_param_counts_equal_known_timm_counts(timm_name):
  assert _count(TIMM_LAYOUT[timm_name]) == TIMM_COUNTS[timm_name]


@pytest.mark.parametrize("timm_name", ["nf_resnet50", "nf_regnet_b0"])
def test_param_counts_equal_timm_models(timm_name):
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # Shapes only: no weight init.
    model = timm.create_model(timm_name, pretrained=False)
  expected = sum(p.numel() for p in model.parameters())
  assert expected == TIMM_COUNTS[timm_name]
  assert _count(TIMM_LAYOUT[timm_name]) == expected


def test_official_layouts_add_one_skip_gain_per_block():
  # NF-ResNet-50: timm's count plus 16 skip gains (25.56M either way).
  assert _count(lambda: nf_resnet.NFResNet(1000, 50)) == 25_557_032 + 16
  # NF-RegNet-B0 with the official channel rounding (int(), not % 8).
  assert _count(lambda: nf_regnet.NFRegNet(1000, "B0")) == 8_595_372
  assert _count(lambda: nf_regnet.NFRegNet(
      1000, "B0", ch_div=8)) == 8_764_288 + 16


def _names(ctor, **kwargs):
  params, _ = stats.init_shapes(
      lambda x: ctor(10, **kwargs)(x, True), 32)
  return {k: set(v) for k, v in params.items()}


WS = {"w", "gain", "bias"}


def test_nf_resnet_names_mirror_official():
  names = _names(nf_resnet.NFResNet, depth=(1, 2), width=0.25,
                 se_ratio=0.25)
  root = "NF_ResNet/~/"
  expected = {root + "initial_conv": WS, root + "linear": {"w", "b"}}
  for b, convs in (("nf_res_block", ("conv0", "conv1", "conv2",
                                     "conv_shortcut")),
                   ("nf_res_block_1", ("conv0", "conv1", "conv2",
                                       "conv_shortcut")),
                   ("nf_res_block_2", ("conv0", "conv1", "conv2"))):
    expected[root + b] = {"skip_gain"}
    expected.update({f"{root}{b}/~/{c}": WS for c in convs})
    for lin in ("linear", "linear_1"):
      expected[f"{root}{b}/~/squeeze_excite/~/{lin}"] = {"w", "b"}
  assert names == expected
  plain = _names(nf_resnet.NFResNet, depth=(1,), width=0.25, use_ws=False)
  assert plain[root + "nf_res_block/~/conv1"] == {"w", "b"}


def test_nf_regnet_names_mirror_official():
  names = _names(nf_regnet.NFRegNet, variant=TINY_REGNET)
  root = "NF_RegNet/~/"
  assert names[root + "initial_conv"] == WS
  assert names[root + "final_conv"] == WS
  assert names[root + "linear"] == {"w", "b"}
  for b in ("nf_block", "nf_block_1", "nf_block_2"):
    assert names[root + b] == {"skip_gain"}
    for c in ("conv0", "conv1", "conv2"):
      assert names[f"{root}{b}/~/{c}"] == WS
    assert names[f"{root}{b}/~/squeeze_excite/~/linear_1"] == {"w", "b"}
  assert root + "nf_block_2/~/conv_shortcut" not in names
  assert len(names) == 3 + 3 * 6 + 2  # stem, head, blocks, 2 shortcuts.
  params, _ = stats.init_shapes(
      lambda x: nf_regnet.NFRegNet(1000, "B0")(x, True), 32)
  # Official B0: 0.75 * 48 = 36 stem channels; first block expansion 1,
  # rounded down to whole groups of 8.
  assert params[root + "initial_conv"]["w"].shape == (3, 3, 3, 36)
  assert params[root + "nf_block/~/conv1"]["w"].shape == (3, 3, 8, 32)
  assert params[root + "final_conv"]["w"].shape == (1, 1, 330, 960)


def test_resnet_names_mirror_official():
  names = _names(resnet.ResNet, depth=(1, 2), width=0.25)  # 3 blocks.
  root = "ResNet/~/"
  bn = {"scale", "offset"}
  assert names[root + "initial_conv"] == {"w"}
  assert names[root + "final_bn"] == bn
  for b in ("res_block_v2", "res_block_v2_1", "res_block_v2_2"):
    for i in range(3):
      assert names[f"{root}{b}/~/bn{i}"] == bn
      assert names[f"{root}{b}/~/conv{i}"] == {"w"}
  assert root + "res_block_v2_2/~/conv_shortcut" not in names
  bare = _names(resnet.ResNet, depth=(1, 2), width=0.25,
                normalization="none")
  assert set(bare) == {k for k in names if "bn" not in k}


def test_baseline_names_mirror_official():
  names = _names(skipinit_resnet.SkipInitResNet, depth=(1,), width=0.25)
  root = "SkipInit_ResNet/~/"
  assert names[root + "initial_conv"] == {"w"}
  assert names[root + "nf_res_block"] == {"skip_gain"}
  assert names[root + "nf_res_block/~/conv_shortcut"] == {"w", "b"}
  names = _names(fixup_resnet.FixupResNet, depth=(1,), width=0.25)
  root = "FixUp_ResNet/~/"
  assert names["FixUp_ResNet"] == {"bias1", "bias2"}
  assert names[root + "res_block"] == {
      "bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b", "scale"}
  assert names[root + "res_block/~/conv2"] == {"w"}


def test_depths():
  assert resnet.get_depths(50) == resnet.get_depths("ResNet50") == (3, 4, 6,
                                                                     3)
  assert resnet.get_depths((24, 24, 24, 24)) == resnet.RESNET_DEPTHS[288]
  assert resnet.get_depths([2, 3]) == (2, 3)
  # The bottleneck nets: 3 convs per block plus stem and classifier.
  for depth in (26, 50, 101, 152, 200, 350):
    assert 3 * sum(resnet.RESNET_DEPTHS[depth]) + 2 == depth


@pytest.mark.parametrize("ctor,kwargs,match", [
    (nf_resnet.NFResNet, dict(depth=51), "depth=51"),
    (nf_resnet.NFResNet, dict(depth="ResNet51"), "'ResNet51'"),
    (nf_resnet.NFResNet, dict(depth=(3, 0)), r"\(3, 0\)"),
    (nf_resnet.NFResNet, dict(activation="relu7"), "'relu7'"),
    (nf_regnet.NFRegNet, dict(variant="B9"), "'B9'"),
    (nf_regnet.NFRegNet, dict(variant=dict(width=(8,), depth=(1,))),
     "needs exactly"),
    (resnet.ResNet, dict(normalization="weightnorm"), "'weightnorm'"),
    (resnet.ResNet, dict(depth=(1, 1, 1, 1, 1)), "positive ints"),
    (skipinit_resnet.SkipInitResNet, dict(depth=34), "depth=34"),
    (fixup_resnet.FixupResNet, dict(activation="gelu_fast"), "'gelu_fast'"),
])
def test_unknown_variant_raises(ctor, kwargs, match):
  with pytest.raises(ValueError, match=match):
    hk.transform(lambda: ctor(10, **kwargs)).init(None)


def test_registry_builds_every_family():
  for name in ("NFResNet", "NFRegNet", "ResNet", "SkipInitResNet",
               "FixupResNet"):
    assert name in families.MODELS
  params, _ = stats.init_shapes(
      lambda x: families.build_model("NFResNet", 10, depth=26)(x, True), 32)
  assert "NF_ResNet/~/nf_res_block_7" in params


def _measure(ctor, kwargs, depths, alphas, batch=16):
  """Signal metrics at init on N(0, 1) input, skip gains set to 1, per alpha.

  Alpha is not a parameter, so one init serves every alpha. Compiled at
  optimization level 0, which changes no number beyond float rounding.
  """
  fns = [hk.transform(lambda x, a=a: ctor(10, alpha=a, **kwargs)(
      x, False, True)) for a in alphas]
  x = jax.random.normal(jax.random.key(3), (batch, 32, 32, 3))
  params = compiler.run_once(fns[0].init, jax.random.key(0), x[:1])
  params = signal_utils.set_skip_gains(params, 1.0)
  outs = compiler.run_once(
      lambda p, x: [f.apply(p, None, x) for f in fns], params, x)
  return [signal_utils.block_arrays(o, sum(depths)) for o in outs]


def test_nf_resnet_signal_propagation():
  """Measured variances follow the NF-ResNet analysis.

  32x32 N(0, 1) inputs make 8x8 and 4x4 stages, where zero padding drops
  ~16% / ~31% of a 3x3 conv's window, so each branch adds a little less than
  alpha^2: the test allows for it. The first block sees the max-pooled stem
  (variance ~0.37), which the official design leaves uncorrected; its
  projection shortcut resets the stream.
  """
  depths = (4, 4)
  small, large = _measure(nf_resnet.NFResNet,
                          dict(depth=depths, width=2, stochdepth_rate=0.0),
                          depths, alphas=(0.2, 0.5))
  transitions = signal_utils.transition_blocks(depths)
  n = sum(depths)
  assert small["branch_in"][0] == pytest.approx(small["h_var"][0])
  assert small["branch_in"][0] < 0.5
  # Default alpha: every later branch input within 10% of unit variance and
  # Var(h) within 10% of the prediction 1 + k alpha^2.
  np.testing.assert_allclose(small["branch_in"][1:], 1.0, rtol=0.1)
  np.testing.assert_allclose(
      small["h_var"][1:], signal_utils.predicted_variances(depths, 0.2),
      rtol=0.1)
  # alpha = 0.5 makes growth and reset unmistakable.
  alpha = 0.5
  h, res = large["h_var"], large["res"]
  for i in range(n):
    if i in transitions:
      if i > 0:  # Reset: from ~1 + 3 alpha^2 back to ~1 + alpha^2.
        assert h[i] > 1.5 and h[i + 1] < 1.3
      np.testing.assert_allclose(h[i + 1], 1 + alpha**2 * res[i], rtol=0.15)
    else:
      growth = (h[i + 1] - h[i]) / alpha**2
      np.testing.assert_allclose(growth, res[i], rtol=0.1)
      assert 0.6 < growth < 1.05
  # beta keeps branch inputs near 1 while Var(h) reaches ~1.8.
  assert h.max() > 1.7
  np.testing.assert_allclose(large["branch_in"][1:], 1.0, rtol=0.2)
  np.testing.assert_allclose(
      h[1:], signal_utils.predicted_variances(depths, alpha), rtol=0.2)


def test_nf_regnet_signal_propagation():
  """Measured variances within NF-RegNet stages.

  The stem output (first branch input) has unit variance. Every stage starts
  with a 2x2 average-pool shortcut, which on spatially white N(0, 1)
  activations divides the variance by up to 4 (measured: ~0.27), so unlike
  the NF-ResNet's strided-conv shortcut it does not reset the stream to 1;
  within a stage each block adds alpha^2 Var(branch) as predicted.
  """
  depths = (3, 3)
  variant = dict(width=(32, 64), depth=depths, train_imsize=32,
                 test_imsize=32, drop_rate=0.0)
  # Same numbers as the CPU default, faster to compile with 18 groups.
  with nj.conv_impl("native"):
    (m,) = _measure(nf_regnet.NFRegNet,
                    dict(variant=variant, width=1, stochdepth_rate=0.0),
                    depths, alphas=(0.5,))
  alpha = 0.5
  np.testing.assert_allclose(m["branch_in"][0], 1.0, rtol=0.1)
  transitions = signal_utils.transition_blocks(depths)
  h, res = m["h_var"], m["res"]
  for i in range(sum(depths)):
    if i in transitions:
      assert h[i + 1] < 0.8 * h[i]
    else:
      np.testing.assert_allclose(h[i + 1] - h[i], alpha**2 * res[i],
                                 rtol=0.2)
  # The branch sees Var(h) beta^2, beta = 1 / sqrt(predicted Var(h)) of
  # the block before (1 for the first block), transitions included.
  beta_sq = 1 / np.concatenate(
      [[1.0], signal_utils.predicted_variances(depths, alpha)[:-1]])
  np.testing.assert_allclose(m["branch_in"], h[:-1] * beta_sq, rtol=1e-4)
