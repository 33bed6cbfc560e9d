"""Tests of nfnets_jax.pretrained: official pickles, safe .npz, timm weights.

Nothing is downloaded: the tests write files in the official layout
themselves, and compare converted timm models against timm's own forward.
"""
import os
import pickle
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.cli import convert as convert_checkpoint
from nfnets_jax.models import nfnet
from nfnets_jax.pretrained import official as pretrained
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import timm as timm_weights
import checkpoint_files

# A tiny NFNet so that tests can init and run it in ~1 s.
TINY = nfnet.NFNetVariant(width=(32, 64), depth=(1, 2), train_imsize=32,
                          test_imsize=32, randaugment_layers=0,
                          randaugment_magnitude=0, drop_rate=0.0)


def random_params(variant, num_classes=10, seed=0):
  shapes = checks.expected_param_shapes(variant, num_classes)
  rng = np.random.default_rng(seed)
  return {m: {n: rng.standard_normal(s).astype(np.float32)
              for n, s in leaves.items()} for m, leaves in shapes.items()}


def fake_params(variant, num_classes=1000):
  """Zero-stride (unallocated) arrays with a variant's names and shapes."""
  shapes = checks.expected_param_shapes(variant, num_classes)
  zero = np.zeros((), np.float32)
  return {m: {n: np.broadcast_to(zero, s) for n, s in leaves.items()}
          for m, leaves in shapes.items()}


# ---------------------------------------------------------------------------
# Official checkpoint files.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("mapping_cls", [checkpoint_files.OldFrozenDict, checkpoint_files.OldFlatMapping])
@pytest.mark.parametrize("dill_arrays", [True, False])
def test_loads_official_layout_pickle(tmp_path, protocol, mapping_cls,
                                      dill_arrays):
  params = random_params(TINY)
  params["NFNet/~/nf_block"]["skip_gain"] = np.array(0.37, np.float32)
  data = checkpoint_files.old_haiku_pickle(params, mapping_cls, protocol, dill_arrays)
  # The file really is written as the old stack wrote it.
  names = checkpoint_files.pickle_globals(data)
  assert f"haiku._src.data_structures.{mapping_cls.pickle_as[1]}" in names
  assert "numpy.core.multiarray._reconstruct" in names
  assert ("dill._dill._create_array" in names) == dill_arrays
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(data)

  loaded, state = pretrained.load_pretrained(path, variant=TINY)

  assert state == {}
  assert type(loaded) is dict and all(type(v) is dict for v in loaded.values())
  checkpoint_files.assert_params_equal(params, loaded)


def test_loads_haiku_flatmap_pickled_by_dill(tmp_path):
  """Haiku's own FlatMap, dill-pickled, references FlatMapping and dill."""
  dill = pytest.importorskip("dill")
  from haiku._src import data_structures  # pylint: disable=g-import-not-at-top
  params = random_params(TINY)
  data = dill.dumps(data_structures.FlatMap(
      {m: data_structures.FlatMap(v) for m, v in params.items()}))
  assert "haiku._src.data_structures.FlatMapping" in checkpoint_files.pickle_globals(data)
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(data)
  checkpoint_files.assert_params_equal(params, pretrained.load_pretrained(path)[0])


class _Exploit:
  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize("payload, refused", [
    (lambda f: _Exploit(os.system, f"echo pwned > {f}"), ".system"),
    (lambda f: _Exploit(eval, f"open({str(f)!r}, 'w')"), "builtins.eval"),
    (lambda f: {"NFNet/~/linear": {
        "w": np.zeros(2), "b": _Exploit(os.system, f"touch {f}")}},
     ".system"),
    (lambda f: _Exploit(np.load, str(f)), "numpy.load"),
    (lambda f: _Exploit(__import__("codecs").encode, str(f), "rot13"),
     "_codecs.encode"),
])
def test_refuses_malicious_pickle(tmp_path, payload, refused):
  marker = tmp_path / "pwned"
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(pickle.dumps(payload(marker), protocol=2))

  with pytest.raises(pretrained.UnsafeCheckpointError) as err:
    pretrained.load_pretrained(path)

  assert isinstance(err.value, pickle.UnpicklingError)
  assert refused in str(err.value) and str(path) in str(err.value)
  assert not marker.exists()


def test_refuses_malicious_object_inside_official_layout(tmp_path):
  marker = tmp_path / "pwned"
  params = random_params(TINY)
  params["NFNet/~/linear"]["b"] = _Exploit(os.system, f"touch {marker}")
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(checkpoint_files.old_haiku_pickle(params))
  with pytest.raises(pretrained.UnsafeCheckpointError, match="system"):
    pretrained.load_pretrained(path)
  assert not marker.exists()


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "expected a mapping"),
    ({"NFNet/~/linear": {"w": "text"}}, "expected a NumPy array"),
    ({"linear": np.zeros(3)}, "'<module>/<param>'"),
    ({"NFNet/~/linear": {"w": np.array([None])}}, "must be numeric"),
])
def test_rejects_trees_that_are_not_params(tmp_path, bad, match):
  path = tmp_path / "ckpt.pkl"
  path.write_bytes(pickle.dumps(bad))
  with pytest.raises(ValueError, match=match):
    pretrained.load_pretrained(path)


def test_rejects_garbage_file(tmp_path):
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(b"<html>not found</html>")
  with pytest.raises(ValueError, match="neither a NumPy .npz nor a pickled"):
    pretrained.load_pretrained(path)


# ---------------------------------------------------------------------------
# The safe format and the converter.
# ---------------------------------------------------------------------------


def test_npz_roundtrip_of_flat_names(tmp_path):
  params = random_params(TINY)
  out = pretrained.save_npz(params, tmp_path / "tiny")
  assert out.endswith("tiny.npz")
  with np.load(out, allow_pickle=False) as npz:
    assert "NFNet/~/nf_block/~/squeeze_excite/~/linear_1/w" in npz.files
  loaded, state = pretrained.load_pretrained(out, variant=TINY)
  assert state == {}
  checkpoint_files.assert_params_equal(params, loaded)


def test_npz_with_object_arrays_is_refused(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, **{"NFNet/~/linear/w": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="allow_pickle"):
    pretrained.load_pretrained(path)


def test_npy_object_array_of_the_tree(tmp_path):
  params = random_params(TINY)
  path = tmp_path / "params.npy"
  np.save(path, params, allow_pickle=True)
  checkpoint_files.assert_params_equal(params, pretrained.load_pretrained(path)[0])


def test_convert_cli(tmp_path, capsys):
  params = random_params(TINY)
  src = tmp_path / "F0_haiku.npz"
  src.write_bytes(checkpoint_files.old_haiku_pickle(params))
  assert convert_checkpoint.main(["convert", str(src), str(tmp_path / "out")]) == 0
  assert "wrote" in capsys.readouterr().out
  checkpoint_files.assert_params_equal(params,
                      pretrained.load_pretrained(tmp_path / "out.npz")[0])
  assert convert_checkpoint.main(["info", str(tmp_path / "out.npz")]) == 0
  assert "classes=10" in capsys.readouterr().out
  # An explicit variant that does not fit fails with the mismatch listing.
  assert convert_checkpoint.main(["convert", str(src), str(tmp_path / "x"),
                          "--variant", "F0"]) == 2
  err = capsys.readouterr().err
  assert "does not match NFNet variant='F0'" in err and "missing" in err
  assert not (tmp_path / "x.npz").exists()
  # So does an unsafe file, without running it.
  src.write_bytes(pickle.dumps(_Exploit(os.system, "true")))
  assert convert_checkpoint.main(["convert", str(src), str(tmp_path / "y")]) == 2
  assert "refusing to unpickle global posix.system" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Checking against the model, variant inference, heads.
# ---------------------------------------------------------------------------


def test_f0_has_the_papers_parameter_count():
  shapes = checks.expected_param_shapes("F0")
  assert sum(int(np.prod(s)) for leaves in shapes.values()
             for s in leaves.values()) == 71_489_284


def test_check_params_lists_every_difference():
  params = fake_params("F0")
  checks.check_params(params, "F0")
  checks.check_params(params, "dm_nfnet_f0")
  del params["NFNet/~/nf_block_3/~/conv1b"]
  params["NFNet/~/extra"] = {"w": np.zeros(3)}
  params["NFNet/~/stem_conv0"]["w"] = np.zeros((3, 3, 3, 17))
  with pytest.raises(checks.ParamsMismatchError) as err:
    checks.check_params(params, "F0", source="F0_haiku.npz")
  msg = str(err.value)
  assert "F0_haiku.npz" in msg and "variant='F0'" in msg
  assert "missing (3)" in msg and "NFNet/~/nf_block_3/~/conv1b/w" in msg
  assert "unexpected (1)" in msg and "NFNet/~/extra/w" in msg
  assert ("NFNet/~/stem_conv0/w: got (3, 3, 3, 17), expected (3, 3, 3, 16)"
          in msg)


def test_check_params_reads_num_classes_from_the_head():
  checks.check_params(fake_params("F0", num_classes=37), "F0")
  with pytest.raises(checks.ParamsMismatchError, match="mis-shaped"):
    checks.check_params(fake_params("F0", num_classes=37), "F0",
                            num_classes=1000)


@pytest.mark.parametrize("variant", ["F0", "F1", "F0+"])
def test_infer_variant(variant):
  assert checks.infer_variant(fake_params(variant)) == variant


def test_infer_variant_errors():
  with pytest.raises(ValueError,
                     match=r"depths \(1, 2\) and widths \(32, 64\)"):
    checks.infer_variant(random_params(TINY))
  with pytest.raises(ValueError, match="no 'NFNet/~/nf_block"):
    checks.infer_variant({"foo": {"w": np.zeros(1)}})
  params = random_params(TINY)
  del params["NFNet/~/nf_block_1"]
  with pytest.raises(ValueError, match="not contiguous"):
    checks.infer_variant(params)


def test_replace_classifier():
  params = random_params(TINY, num_classes=10)
  new = checks.replace_classifier(params, "NFNet", {"variant": TINY}, 3,
                                  seed=1)
  head = new["NFNet/~/linear"]
  assert head["w"].shape == (params["NFNet/~/linear"]["w"].shape[0], 3)
  assert head["w"].dtype == np.float32
  np.testing.assert_array_equal(head["b"], np.zeros(3))
  assert np.std(head["w"]) == pytest.approx(checks.CLASSIFIER_STDDEV, rel=0.2)
  assert all(new[m][n] is params[m][n] for m in params  # Shared, not copied.
             for n in params[m] if m != "NFNet/~/linear")
  assert params["NFNet/~/linear"]["w"].shape[1] == 10  # input untouched

  checks.check_params(new, TINY, num_classes=3)


def test_replaced_classifier_runs():
  params = checks.replace_classifier(random_params(TINY), "NFNet",
                                     {"variant": TINY}, 3, seed=1)
  fwd = hk.transform(lambda x: nfnet.NFNet(3, TINY)(x, is_training=False))
  logits = jax.jit(fwd.apply)(params, None, jnp.ones((2, 16, 16, 3)))["logits"]
  assert logits.shape == (2, 3)


def test_replace_classifier_errors():
  with pytest.raises(ValueError, match="num_classes=0"):
    checks.replace_classifier(random_params(TINY), "NFNet", {"variant": TINY},
                              0)


# ---------------------------------------------------------------------------
# timm's dm_nfnet_*.
# ---------------------------------------------------------------------------


def _haiku_shape(timm_key, shape):
  """timm tensor shape -> Haiku param shape, written out independently."""
  if timm_key.endswith("skipinit_gain"):
    return shape
  if timm_key.endswith(".gain"):
    return shape[:1]
  if len(shape) == 4 and "attn_last" in timm_key:
    return (shape[1], shape[0])
  if len(shape) == 4:
    o, i, h, w = shape
    return (h, w, i, o)
  if len(shape) == 2:
    return shape[::-1]
  return shape


@pytest.mark.parametrize("variant", ["F0", "F1", "F6"])
def test_timm_names_and_shapes_match_the_model(variant):
  timm = pytest.importorskip("timm")
  model = timm.create_model(f"dm_nfnet_{variant.lower()}", device="meta")
  timm_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

  names = timm_weights.timm_param_names(timm_shapes)

  got = {}
  for key, (module, name) in names.items():
    got.setdefault(module, {})[name] = _haiku_shape(key, timm_shapes[key])
  assert got == checks.expected_param_shapes(variant)


def test_timm_dm_nfnet_configs_are_what_we_document():
  timm = pytest.importorskip("timm")
  from timm.layers import make_divisible  # pylint: disable=g-import-not-at-top
  for variant in ["F0", "F1", "F2", "F3", "F4", "F5", "F6"]:
    cfg = timm.models.nfnet.model_cfgs[f"dm_nfnet_{variant.lower()}"]
    ours = nfnet.NFNET_VARIANTS[variant]
    assert tuple(cfg.depths) == ours.depth and tuple(cfg.channels) == ours.width
    assert cfg.std_conv_eps == timm_weights.TIMM_NFNET_KWARGS["ws_eps"]
    assert cfg.act_layer == "gelu" and cfg.gamma_in_act and cfg.same_padding
    assert cfg.skipinit and cfg.attn_layer == "se"
    rd_ratio = cfg.attn_kwargs["rd_ratio"]
    for ch in cfg.channels:  # timm's SE width rounding == official int()
      assert make_divisible(ch * rd_ratio, 8, round_limit=0.0) == int(
          ch * rd_ratio)


def test_timm_conversion_errors():
  with pytest.raises(ValueError, match="not part of a timm dm_nfnet"):
    timm_weights.from_timm_state_dict({"stem.conv1.weight": np.zeros(
        (16, 3, 3, 3)), "module.fc.weight": np.zeros((2, 2))})
  sd = {f"stages.0.0.{k}": np.zeros(s) for k, s in [
      ("conv1.weight", (8, 8, 1, 1)), ("conv1.gain", (8, 1, 1, 1))]}
  with pytest.raises(ValueError, match="no skipinit_gain"):
    timm_weights.from_timm_state_dict(sd)
  sd["stages.0.2.skipinit_gain"] = np.zeros(())
  with pytest.raises(ValueError, match=r"stage 0 has blocks \[0, 2\]"):
    timm_weights.from_timm_state_dict(sd)


@pytest.fixture
def timm_f0(perturbed_timm_f0):
  return perturbed_timm_f0


@pytest.mark.parametrize("size", [64, 66])  # even and odd feature maps
def test_timm_logits_equal_with_timm_kwargs(timm_f0, size):
  _, _, run_timm, run_ours = timm_f0
  x, want = run_timm(size)
  got = run_ours(x, **timm_weights.TIMM_NFNET_KWARGS)
  scale = np.abs(want).max()
  rel = np.abs(got - want).max() / scale
  print(f"\n{size}px timm kwargs: max|logit|={scale:.4g} "
        f"max|diff|/max|logit|={rel:.3g}")
  assert scale > 0.1  # the perturbed network gives non-trivial logits
  assert rel <= 1e-3


def test_timm_logits_close_with_official_kwargs(timm_f0):
  """Same weights, official eps/GELU: close, but measurably not equal."""
  _, _, run_timm, run_ours = timm_f0
  x, want = run_timm(66)
  got = run_ours(x, **timm_weights.OFFICIAL_NFNET_KWARGS)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f"\n66px official kwargs: max|diff|/max|logit|={rel:.3g}")
  assert 1e-3 < rel < 0.1
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_timm_numpy_state_dict_and_converter_copies(timm_f0):
  model, params, _, _ = timm_f0
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  converted, _ = timm_weights.from_timm_state_dict(sd)
  checkpoint_files.assert_params_equal(params, converted)
  w = sd["stem.conv1.weight"]
  np.testing.assert_array_equal(converted["NFNet/~/stem_conv0"]["w"],
                                w.transpose(2, 3, 1, 0))
  assert not np.shares_memory(converted["NFNet/~/stem_conv0"]["w"], w)
  assert checks.infer_variant(converted) == "F0"


def test_convert_timm_cli(timm_f0, tmp_path):
  torch = pytest.importorskip("torch")
  model, params, _, _ = timm_f0
  src = tmp_path / "dm_nfnet_f0.pth"
  torch.save(model.state_dict(), src)
  assert convert_checkpoint.main(["convert-timm", str(src), str(tmp_path / "f0.npz")
                          ]) == 0
  checkpoint_files.assert_params_equal(params, pretrained.load_pretrained(
      tmp_path / "f0.npz", variant="F0")[0])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))
