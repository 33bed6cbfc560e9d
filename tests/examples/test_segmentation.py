"""examples/segmentation.py: the synthetic task, the optimizer's groups, and
one tiny run from the command line.

The tiny run (a 16-32-64 NF-RegNet backbone at 32 px, 150 steps of batch
16) reaches about 95% test pixel accuracy (90% asserted) in 30-55 s on 2
CPU cores, most of it compiling its scanned train step: opt-in (`-m long`),
to keep the suite under CI's 10 minutes. The rest traces or runs small
programs.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import segmentation

TINY_ARGV = ["--image_size", "32", "--widths", "16", "32", "64", "--depths",
             "1", "1", "1", "--decoder_width", "16", "--shapes", "2",
             "--steps", "150", "--log_every", "50"]


@pytest.mark.long
def test_tiny_run_reaches_90_percent_pixel_accuracy(capsys):
  result = segmentation.main(TINY_ARGV)
  out = capsys.readouterr().out.splitlines()
  print(f"\npixel accuracy {result['pixel_accuracy']:.3f}, IoU "
        f"{result['iou']}, {result['seconds']:.1f} s")
  assert result["pixel_accuracy"] >= 0.9
  assert set(result["iou"]) == set(segmentation.CLASSES)
  assert min(result["iou"].values()) > 0.3  # Every class is found.
  losses = result["losses"]
  assert losses.shape == (150,) and np.all(np.isfinite(losses))
  assert losses[-50:].mean() < 0.5 * losses[:50].mean()
  assert out[0].startswith("backbone nf_regnet_b0: ")
  assert "('final_conv', 186, 16)" in out[0]
  assert [line.split()[:2] for line in out[1:4]] == [
      ["step", "50"], ["step", "100"], ["step", "150"]]
  assert out[-1].startswith("test pixel accuracy ")


def test_draw_batch_masks_and_images():
  draw = jax.jit(lambda k: segmentation.draw_batch(k, 32, 32, 3))
  images, masks = draw(jax.random.key(0))
  assert images.shape == (32, 32, 32, 3) and images.dtype == jnp.float32
  assert masks.shape == (32, 32, 32) and masks.dtype == jnp.int32
  images, masks = np.asarray(images), np.asarray(masks)
  counts = np.bincount(masks.ravel(), minlength=len(segmentation.CLASSES))
  assert len(counts) == len(segmentation.CLASSES) and np.all(counts > 0)
  assert 0.5 < counts[0] / masks.size < 0.9  # Mostly background.
  # The fill patterns alternate +colour and -colour: a shape's mean is the
  # background's, so only a neighbourhood tells them apart.
  for c in range(len(segmentation.CLASSES)):
    assert abs(images[masks == c].mean()) < 0.1, c
  assert images[masks == 0].std() == pytest.approx(0.3, abs=0.02)
  assert images[masks > 0].std() > 0.8
  again, _ = draw(jax.random.key(0))  # One key, one batch.
  np.testing.assert_array_equal(images, again)
  other, _ = draw(jax.random.key(1))
  assert not np.allclose(images, other)


def test_decoder_gives_per_pixel_logits():
  maps = [jax.ShapeDtypeStruct((2, s, s, c), jnp.float32)
          for s, c in ((16, 8), (8, 16), (4, 24))]
  f = hk.transform(lambda m: segmentation.Decoder(4, 16)(m, (32, 32)))
  params = jax.eval_shape(f.init, jax.random.key(0), maps)
  assert sorted(params) == ["decoder/classifier", "decoder/up0",
                            "decoder/up1"]
  assert params["decoder/up1"]["w"].shape == (3, 3, 24 + 16, 16)
  assert params["decoder/up0"]["w"].shape == (3, 3, 16 + 8, 16)
  logits = jax.eval_shape(f.apply, params, None, maps)
  assert logits.shape == (2, 32, 32, 4)


def _params():
  ones = lambda *s: jnp.ones(s)
  return {"NF_RegNet/~/initial_conv": {"w": ones(3, 3, 3, 4), "bias": ones(4)},
          "NF_RegNet/~/linear": {"w": ones(4, 2), "b": ones(2)},
          "decoder/up0": {"w": ones(3, 3, 4, 4), "gain": ones(4)},
          "decoder/classifier": {"w": ones(1, 1, 4, 4), "b": ones(4)}}


def test_param_labels():
  labels = segmentation.param_labels(_params())
  assert labels == {
      "NF_RegNet/~/initial_conv": {"w": "backbone", "bias": "backbone"},
      "NF_RegNet/~/linear": {"w": "backbone", "b": "backbone"},
      "decoder/up0": {"w": "decoder", "gain": "decoder"},
      "decoder/classifier": {"w": "decoder", "b": "decoder"}}


@pytest.mark.parametrize("freeze", [True, False])
def test_freezing_zeroes_the_backbone_updates(freeze):
  config = segmentation.Config(freeze_backbone=freeze)  # With AGC.
  tx = segmentation.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for module, leaves in updates.items():
    moved = [bool(jnp.any(u != 0)) for u in leaves.values()]
    trains = module.startswith("decoder") or not freeze
    assert moved == [trains] * len(moved), module


def test_backbone_overrides():
  config = segmentation.Config(widths=(8, 16), depths=(1, 2), image_size=24)
  assert segmentation.backbone_overrides(config) == {
      "variant": {"width": (8, 16), "depth": (1, 2), "train_imsize": 24,
                  "test_imsize": 24, "drop_rate": 0.0},
      "width": 1.0}
  assert segmentation.backbone_overrides(segmentation.Config(
      model="dm_nfnet_f0", widths=None, depths=None)) == {}
  with pytest.raises(ValueError, match="widths and depths go together"):
    segmentation.backbone_overrides(segmentation.Config(depths=None))
  with pytest.raises(ValueError, match="model='nf_resnet50' is not one"):
    segmentation.backbone_overrides(segmentation.Config(model="nf_resnet50"))


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--clipping", "-1"], ["--widths", "8", "16"],
    ["--widths", "8", "16", "--depths", "1"],
    ["--pretrained", "/nonexistent.npz"]])
def test_bad_arguments_exit_2(argv):
  with pytest.raises(SystemExit) as e:
    segmentation.parse_args(argv)
  assert e.value.code == 2


def test_arguments_make_the_config(tmp_path):
  config = segmentation.parse_args(TINY_ARGV + ["--freeze_backbone"])
  assert config == segmentation.Config(
      widths=(16, 32, 64), depths=(1, 1, 1), image_size=32, decoder_width=16,
      shapes=2, steps=150, log_every=50, freeze_backbone=True)
  assert segmentation.parse_args([]) == segmentation.Config()
  config = segmentation.parse_args(["--model", "dm_nfnet_f0",
                                    "--no_custom_variant"])
  assert config.widths is None and config.depths is None
  (tmp_path / "b1.safetensors").write_bytes(b"")
  config = segmentation.parse_args([
      "--model", "nf_regnet_b1", "--pretrained",
      str(tmp_path / "b1.safetensors")])  # The checkpoint's own network.
  assert config.widths is None and config.depths is None
  assert isinstance(segmentation.make_optimizer(config),
                    optax.GradientTransformation)
