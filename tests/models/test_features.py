"""Feature backbones: `return_features`, `feature_info`, `apply_stages`.

Shapes are checked for every family by tracing (`jax.eval_shape`, nothing
compiled); values against the forward's own pool in one compiled program;
the maps of timm's models by timm's own `feature_info` (their values in
tests/pretrained/test_features_timm.py).
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.cpu import compiler
from nfnets_jax.models import families
from nfnets_jax.models import layers
from nfnets_jax.models import stats

TINY_NFNET = dict(width=(16, 32, 48), depth=(1, 1, 2), train_imsize=32,
                  test_imsize=32, randaugment_layers=0,
                  randaugment_magnitude=0, drop_rate=0.0)
TINY_REGNET = dict(width=(16, 24, 32), depth=(1, 2, 1), train_imsize=32,
                   test_imsize=32, drop_rate=0.0)
TINY_RESNET = dict(depth=(1, 2, 1, 1), width=0.25)
# family -> (kwargs, [(module, channels, reduction)] of its maps).
FAMILIES = {
    "NFNet": (dict(variant=TINY_NFNET, group_size=8),
              [("stem.conv3", 64, 2), ("stages.0", 16, 4),
               ("stages.1", 32, 8), ("final_conv", 96, 16)]),
    "NFRegNet": (dict(variant=TINY_REGNET, width=1.0),
                 [("stem.conv", 16, 2), ("stages.0", 16, 4),
                  ("stages.1", 24, 8), ("final_conv", 93, 16)]),
    "NFResNet": (TINY_RESNET,
                 [("stem.conv", 4, 2), ("stages.0", 16, 4),
                  ("stages.1", 32, 8), ("stages.2", 64, 16),
                  ("stages.3", 128, 32)]),
    "ResNet": (TINY_RESNET,
               [("stem.conv", 4, 2), ("stages.0", 16, 4),
                ("stages.1", 32, 8), ("stages.2", 64, 16),
                ("stages.3", 128, 32)]),
    "SkipInitResNet": (TINY_RESNET,
                       [("stem.conv", 4, 2), ("stages.0", 16, 4),
                        ("stages.1", 32, 8), ("stages.2", 64, 16),
                        ("stages.3", 128, 32)]),
    "FixupResNet": (TINY_RESNET,
                    [("stem.act", 4, 2), ("stages.0", 16, 4),
                     ("stages.1", 32, 8), ("stages.2", 64, 16),
                     ("stages.3", 128, 32)]),
}


def test_every_family_has_features():
  assert families.feature_families() == sorted(families.MODELS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", [66])  # odd maps: ceil(size / 2) a stride
def test_feature_shapes_follow_feature_info(family, size):
  kwargs, want = FAMILIES[family]
  info = families.feature_info(family, kwargs)
  assert [(f.module, f.channels, f.reduction) for f in info] == want
  net = families.make_network(family, kwargs, 5)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  params, state = stats.init_shapes(net, size)
  with_features, _ = jax.eval_shape(
      lambda p, s, x: net.apply(p, s, None, x, False, return_features=True),
      params, state, x)
  without, _ = jax.eval_shape(
      lambda p, s, x: net.apply(p, s, None, x, False), params, state, x)
  maps = with_features.pop("features")
  assert with_features == without  # Nothing else changes.
  # SAME padding: each stride-2 layer gives ceil(size / 2).
  assert [m.shape for m in maps] == [
      (2, -(-size // f.reduction), -(-size // f.reduction), f.channels)
      for f in info]
  assert all(m.dtype == jnp.float32 for m in maps)


def test_features_are_the_maps_the_forward_uses():
  """The first map is the stem conv's output; the last one, activated and
  averaged, is the forward's `pool` (one NF-RegNet, one program)."""
  variant = dict(TINY_REGNET, width=(16,), depth=(1,))  # One stage.
  net = hk.transform(lambda x: families.build_model(
      "NFRegNet", 3, variant=variant, activation="relu")(
          x, is_training=False, return_features=True))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  def run(key, x):
    params = net.init(key, x)
    stem = params["NF_RegNet/~/initial_conv"]
    w = layers.standardize_weight(stem["w"], stem["gain"])
    want_stem = jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return net.apply(params, None, x), want_stem + stem["bias"]

  out, want_stem = compiler.run_once(run, jax.random.key(1), x)
  np.testing.assert_allclose(out["features"][0], want_stem, rtol=1e-4,
                             atol=1e-4)
  act = layers.get_activation("relu")
  np.testing.assert_allclose(jnp.mean(act(out["features"][-1]), axis=(1, 2)),
                             out["pool"], rtol=1e-5, atol=1e-6)


def test_feature_info_matches_timm_for_timm_layouts():
  """Our timm-layout networks name, size and stride their maps as timm."""
  timm = pytest.importorskip("timm")
  layouts = {
      "dm_nfnet_f0": ("NFNet", dict(variant="F0")),
      "nf_resnet50": ("NFResNet", dict(depth=50, skipinit_gain=None)),
      "nf_regnet_b1": ("NFRegNet", dict(variant="B1", ch_div=8,
                                        skipinit_gain=None)),
      "resnetv2_50": ("ResNet", dict(depth=50)),
  }
  for name, (family, kwargs) in layouts.items():
    model = timm.create_model(name, device="meta")
    want = [(d["module"], d["num_chs"], d["reduction"])
            for d in model.feature_info]
    got = [(f.module, f.channels, f.reduction)
           for f in families.feature_info(family, kwargs)]
    assert got == want, name


def test_apply_stages_keeps_each_stage_output():
  blocks = [lambda x, k=k: (x * 10 + k, {}) for k in range(1, 5)]
  outputs, metrics = hk.transform(lambda: layers.apply_stages(
      blocks, (1, 0, 3), jnp.zeros(()), False)).apply({}, None)
  assert [float(o) for o in outputs] == [1.0, 1.0, 1234.0]
  assert metrics == {}
  with pytest.raises(ValueError, match=r"depths=\(1, 2\) sum to 3; the "
                     "network has 4 blocks"):
    layers.apply_stages(blocks, (1, 2), jnp.zeros(()), False)


def test_feature_info_errors(monkeypatch):
  with pytest.raises(ValueError, match="config.model.name='Nope' is invalid"):
    families.feature_info("Nope", {})

  class Plain(hk.Module):
    def __init__(self, num_classes):
      super().__init__()

    def __call__(self, x, is_training):
      return {"logits": x}

  monkeypatch.setitem(families.MODELS, "Plain", Plain)
  with pytest.raises(ValueError, match=r"family='Plain' has no feature maps "
                     r"\(return_features\); allowed: one of \["):
    families.feature_info("Plain", {})
