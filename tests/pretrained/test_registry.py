"""Tests of create_model / list_models: names, checkpoints of every format.

Nothing is downloaded: checkpoints are written by the tests (a perturbed,
randomly initialised timm `dm_nfnet_f0`, official-layout pickles, `.npz`
files of tiny models, a tiny `nfnets-train` run).
"""
import json
import shutil

import haiku as hk
import jax
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.data import pipeline
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import loop
from nfnets_jax.experiment import pretrained_start
from nfnets_jax.experiment import recipes
from nfnets_jax.models import families
from nfnets_jax.models import nfnet
from nfnets_jax.models import stats
from nfnets_jax.pretrained import checks as param_checks
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import official as pretrained
from nfnets_jax.pretrained import registry
from nfnets_jax.pretrained import timm as timm_weights
import checkpoint_files
import train_harness as testing

TINY = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
        "test_imsize": 16, "randaugment_layers": 0,
        "randaugment_magnitude": 0, "drop_rate": 0.0}
TINY_KW = {"variant": TINY, "group_size": 8}
# The paper's largest logit-relative gap we accept between two definitions
# that should agree (float32 summation order differs between frameworks).
RTOL = 1e-3


def rel_diff(a, b):
  """max |a - b| over max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_npz(tmp_path, num_classes=10, name="tiny.npz", **kwargs):
  """A randomly initialised tiny NFNet saved as a safe .npz."""
  net = families.make_network("NFNet", {**TINY_KW, **kwargs}, num_classes)
  params, _ = jax.jit(net.init, static_argnames="is_training")(
      jax.random.PRNGKey(3), np.zeros((1, 16, 16, 3), np.float32),
      is_training=False)
  return pretrained.save_npz(jax.device_get(params), tmp_path / name), params


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------


def test_list_models_has_every_family():
  names = nj.list_models()
  for name in ["nfnet_f0", "nfnet_f7", "nfnet_f0+", "nfnet_f7+",
               "dm_nfnet_f0", "dm_nfnet_f6", "nf_resnet26", "nf_resnet420",
               "nf_regnet_b0", "nf_regnet_b8", "resnet50",
               "skipinit_resnet50", "fixup_resnet50"]:
    assert name in names
  assert "dm_nfnet_f7" not in names  # timm has no F7 port.
  assert nj.list_models("dm_") == [f"dm_nfnet_f{i}" for i in range(7)]


def test_official_and_timm_definitions_and_data_configs():
  official, timm = (registry.get_spec(n) for n in ("nfnet_f0",
                                                   "dm_nfnet_f0"))
  assert official.kwargs == {"variant": "F0",
                             **timm_weights.OFFICIAL_NFNET_KWARGS}
  assert timm.kwargs == {"variant": "F0", **timm_weights.TIMM_NFNET_KWARGS}
  # The paper: 192 train, 256 test, resize 288 -> crop 256.
  assert (official.data.train_size, official.data.test_size,
          official.data.crop_padding) == (192, 256, 32)
  # timm: input 192, test 256, crop_pct 0.9 -> floor(256 / 0.9) = 284.
  assert (timm.data.train_size, timm.data.test_size,
          timm.data.crop_padding) == (192, 256, 28)
  assert timm.data.crop_pct == pytest.approx(256 / 284)
  for spec in (official, timm):
    assert spec.data.mean == pytest.approx((123.675, 116.28, 103.53))
    assert spec.data.std == pytest.approx((58.395, 57.12, 57.375))
    assert spec.data.interpolation == "bicubic"
  # F6's timm crop: floor(576 / 0.956) = 602.
  assert registry.get_spec("dm_nfnet_f6").data.crop_padding == 26


def test_timm_data_configs_are_timms():
  timm = pytest.importorskip("timm")
  for variant, (train, test, crop_pct) in registry.TIMM_DATA.items():
    cfg = timm.models.get_pretrained_cfg(f"dm_nfnet_{variant.lower()}")
    assert (cfg.input_size[1], cfg.test_input_size[1], cfg.crop_pct,
            cfg.crop_mode, cfg.interpolation) == (
                train, test, crop_pct, "squash", "bicubic")
    assert tuple(255 * m for m in cfg.mean) == pytest.approx(
        registry.get_spec(f"dm_nfnet_{variant.lower()}").data.mean)


def test_unknown_name_lists_close_names():
  with pytest.raises(ValueError, match="'nfnet_f0'.*list_models"):
    nj.create_model("nfnet_fO")
  with pytest.raises(ValueError, match="dm_nfnet_f1"):
    registry.get_spec("dm_nfnet_f1x")


def test_every_registry_entry_names_a_family_and_its_variant():
  for name in nj.list_models():
    spec = registry.get_spec(name)
    assert spec.family in nj.MODELS, name
    if spec.family == "NFNet":
      assert nfnet.get_variant(spec.kwargs["variant"]).test_imsize == (
          spec.data.test_size), name
  # One of each family traces to a model (jax.eval_shape: nothing runs).
  for name in ("nfnet_f0", "nf_regnet_b0", "nf_resnet50", "resnet50",
               "skipinit_resnet50", "fixup_resnet50"):
    spec = registry.get_spec(name)
    params, _ = stats.param_shapes(spec.family, spec.kwargs, 1000)
    assert params, name


def test_preprocess_is_the_eval_pipeline():
  image = np.random.default_rng(0).integers(0, 256, (37, 29, 3), np.uint8)
  for name in ("nfnet_f0", "dm_nfnet_f0"):
    dc = registry.get_spec(name).data
    want = pipeline.EvalBatch(dc.test_size, 10, dc.crop_padding)(
        [{"image": image, "label": 0, "mask": 1.0}])["images"][0]
    np.testing.assert_array_equal(dc.preprocess(image), want)


# ---------------------------------------------------------------------------
# Random init, checks, heads.
# ---------------------------------------------------------------------------


def test_random_init_model_is_callable_and_trainable():
  model = nj.create_model("nfnet_f0", num_classes=7, **TINY_KW)
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32)
  logits = model(x)
  assert logits.shape == (2, 7) and model.num_classes == 7
  assert model.label_names is None
  # `net` is the training form: apply with is_training=True works.
  apply = jax.jit(model.net.apply, static_argnames="is_training")
  outputs, _ = apply(model.params, model.state, jax.random.PRNGKey(0), x,
                     is_training=True)
  assert outputs["logits"].shape == (2, 7)
  assert nj.create_model("nfnet_f0", **TINY_KW).label_names[0] == (
      "n01440764")  # TFDS's ImageNet synsets for 1000 classes.


def test_wrong_model_checkpoint_is_refused_with_the_differing_names(
    tmp_path):
  path, _ = tiny_npz(tmp_path)
  # F0's network: every tiny name is unexpected or mis-shaped, F0's missing.
  with pytest.raises(param_checks.ParamsMismatchError) as e:
    nj.create_model("nfnet_f0", pretrained=path)
  msg = str(e.value)
  assert str(path) in msg and "'nfnet_f0'" in msg
  assert "missing (176)" in msg and "NFNet/~/nf_block_10/~/conv0/w" in msg
  assert ("NFNet/~/final_conv/w: got (1, 1, 32, 64), expected "
          "(1, 1, 1536, 3072)") in msg
  # Same names, other widths: the mis-shaped ones with both shapes.
  with pytest.raises(param_checks.ParamsMismatchError,
                     match=r"NFNet/~/final_conv/w: got \(1, 1, 32, 64\), "
                     r"expected \(1, 1, 32, 128\)"):
    nj.create_model("nfnet_f0", pretrained=path, final_conv_mult=4.0,
                    **TINY_KW)


def test_tiny_npz_loads_exactly_and_a_new_head_replaces_the_classifier(
    tmp_path):
  path, params = tiny_npz(tmp_path)
  model = nj.create_model("nfnet_f0", pretrained=path, **TINY_KW)
  assert model.num_classes == 10
  for m, leaves in params.items():
    for n, v in leaves.items():
      np.testing.assert_array_equal(model.params[m][n], v)
  new = nj.create_model("nfnet_f0", pretrained=path, num_classes=3, seed=5,
                        **TINY_KW)
  head = "NFNet/~/linear"
  assert new.params[head]["w"].shape == (64, 3)
  np.testing.assert_array_equal(new.params[head]["b"], np.zeros(3))
  assert 0.007 < float(np.std(new.params[head]["w"])) < 0.013
  for m in params:
    if m != head:
      for n in params[m]:
        np.testing.assert_array_equal(new.params[m][n], params[m][n])
  x = np.random.default_rng(1).standard_normal((2, 16, 16, 3), np.float32)
  assert new(x).shape == (2, 3)


def test_classifier_names_of_every_family():
  assert stats.classifier_names("NFNet", TINY_KW) == [
      ("NFNet/~/linear", "b"), ("NFNet/~/linear", "w")]
  for family, kwargs in [("ResNet", {"depth": 26, "width": 0.25}),
                         ("NFRegNet", {"variant": "B0", "width": 0.25})]:
    names = stats.classifier_names(family, kwargs)
    assert len(names) == 2 and {n for _, n in names} == {"w", "b"}


def test_no_name_and_unknown_params_is_refused(tmp_path):
  path, _ = tiny_npz(tmp_path)
  with pytest.raises(ValueError, match="no model name given.*tiny.npz"):
    nj.create_model(pretrained=path)


def test_detect_format(tmp_path):
  path, params = tiny_npz(tmp_path)
  pickled = tmp_path / "F0_haiku.npz"
  pickled.write_bytes(checkpoint_files.old_haiku_pickle(
      jax.device_get(params)))
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"stem.conv1.weight": np.zeros((2, 3, 3, 3), np.float32)},
            str(tmp_path / "w.safetensors"))
  assert create.detect_format(path) == "npz"
  assert create.detect_format(pickled) == "official"
  assert create.detect_format(tmp_path / "w.safetensors") == "timm"
  assert create.detect_format(tmp_path) == "workdir"
  with pytest.raises(FileNotFoundError, match="nope"):
    create.detect_format(tmp_path / "nope")


# ---------------------------------------------------------------------------
# Real F0: timm's weights give timm's logits; official pickles.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_f0(perturbed_timm_f0, tmp_path_factory):
  """A perturbed random timm dm_nfnet_f0, its safetensors file and input."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  model, _, run_timm, _ = perturbed_timm_f0
  path = tmp_path_factory.mktemp("timm") / "dm_nfnet_f0.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(path))
  x, want = run_timm(64)
  return model, path, x, want


def test_dm_nfnet_f0_from_timm_safetensors_gives_timms_logits(timm_f0):
  _, path, x, want = timm_f0
  model = nj.create_model("dm_nfnet_f0", pretrained=path)
  got = np.asarray(model(x))
  diff = rel_diff(got, want)
  print(f"\ndm_nfnet_f0 vs timm, 64 px: max|diff|/max|logit| = {diff:.2e}")
  assert diff <= RTOL
  assert np.array_equal(got.argmax(1), want.argmax(1))
  # Without a name the timm format says dm_nfnet_f0.
  assert create.load_checkpoint(path).spec.name == "dm_nfnet_f0"


def test_torch_pth_and_safetensors_load_the_same_params(timm_f0, tmp_path):
  torch = pytest.importorskip("torch")
  model, path, _, _ = timm_f0
  pth = tmp_path / "weights.ckpt"  # Told by content (a torch zip).
  torch.save({"state_dict": model.state_dict()}, str(pth))
  assert create.detect_format(pth) == "timm"
  a, b = create.load_checkpoint(pth), create.load_checkpoint(path)
  assert a.spec.name == b.spec.name == "dm_nfnet_f0"
  checkpoint_files.assert_params_equal(a.params, b.params)


def test_nfnet_f0_from_an_official_pickle_gives_the_official_logits(
    timm_f0, tmp_path):
  torch_model, _, x, timm_logits = timm_f0
  params, _ = timm_weights.from_timm_state_dict(torch_model.state_dict())
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(checkpoint_files.old_haiku_pickle(params))
  model = nj.create_model(pretrained=path)  # Inferred: nfnet_f0.
  assert model.name == "nfnet_f0" and model.num_classes == 1000
  assert model.data_config.test_size == 256
  got = np.asarray(model(x))
  # The reference: NFNet's official defaults, built independently.
  fwd = hk.transform(lambda im: nfnet.NFNet(1000, "F0")(im,
                                                      is_training=False))
  want = np.asarray(jax.jit(fwd.apply)(params, None, x)["logits"])
  diff = rel_diff(got, want)
  gap = rel_diff(got, timm_logits)
  print(f"\nnfnet_f0 from official pickle vs NFNet defaults: {diff:.2e}; "
        f"vs timm's forward: {gap:.2e}")
  assert diff <= RTOL
  assert gap > 10 * RTOL  # The official definition is not timm's.


# ---------------------------------------------------------------------------
# nfnets-train workdirs.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_workdir_loads_the_newest_ema_params(reference_run, tmp_path):
  saved = testing.load_checkpoint(reference_run)  # The newest step, 12.
  model = nj.create_model(pretrained=reference_run)
  assert model.family == "NFNet" and model.num_classes == 10
  assert model.label_names is None
  assert (model.data_config.test_size, model.data_config.crop_padding) == (
      16, 0)
  for m, leaves in saved["ema_params"].items():
    for n, v in leaves.items():
      np.testing.assert_array_equal(model.params[m][n], v)
  assert not np.array_equal(saved["ema_params"]["NFNet/~/linear"]["w"],
                            saved["params"]["NFNet/~/linear"]["w"])
  x = np.random.default_rng(2).standard_normal((3, 16, 16, 3), np.float32)
  net = families.make_network(model.family, model.model_kwargs, 10)
  want, _ = jax.jit(net.apply, static_argnames="is_training")(
      saved["ema_params"], saved["model_state"] or {}, None, x,
      is_training=False)
  np.testing.assert_allclose(model(x), want["logits"], rtol=1e-5, atol=1e-6)
  raw = create.load_workdir(reference_run, use_ema=False, step=6)
  assert raw.step == 6 and not raw.ema
  # Class names of an image-folder run.
  copy = tmp_path / "run"
  shutil.copytree(reference_run, copy)
  names = [f"class_{i}" for i in range(10)]
  (copy / create.CLASS_NAMES_FILE).write_text(json.dumps(names))
  assert nj.create_model(pretrained=copy).label_names == tuple(names)


# ---------------------------------------------------------------------------
# Fine-tuning configs: the checkpoint's definition must be the network's.
# ---------------------------------------------------------------------------




def test_finetune_from_timm_file_adopts_timms_forward(timm_f0):
  _, path, _, _ = timm_f0
  config = checkpoint_files.finetune_config(path)
  # The recipe's official forward does not fit timm's weights ...
  assert ("timm dm_nfnet_* file, whose forward needs "
          "--config.model.kwargs.activation=gelu_exact "
          "--config.model.kwargs.ws_eps=1e-05 "
          "--config.model.kwargs.ws_eps_mode=add") in checkpoint_files.forward_problems(
              config)[0]
  # ... so the run adopts timm's (loop.run does this before validating), in a
  # new config: the one it was given is left as it was.
  before = config.to_dict()
  adopted, changed = pretrained_start.adopt_forward(config)
  assert config.to_dict() == before
  assert changed == timm_weights.TIMM_NFNET_KWARGS
  assert {k: adopted.model.kwargs[k] for k in changed} == changed
  assert not checkpoint_files.forward_problems(adopted)
  again, changed = pretrained_start.adopt_forward(adopted)  # Idempotent.
  assert again is adopted and not changed
  # Fine-tuning timm's weights with the official definition: allowed.
  official = checkpoint_files.finetune_config(path, model="nfnet_f0")
  assert pretrained_start.adopt_forward(official) == (official, {})
  assert not checkpoint_files.forward_problems(official)
  assert "family config.model.name='NFNet'" in checkpoint_files.forward_problems(
      checkpoint_files.finetune_config(path, model="resnet50"))[0]
  with pytest.raises(config_validation.ConfigError,
                     match="pretrained.model.*did you mean 'dm_nfnet_f0'"):
    config_validation.validate(
        checkpoint_files.finetune_config(path, model="dm_nfnet_f0x"))


def test_initial_state_reads_any_format_and_replaces_the_head(tmp_path):
  config = recipes.nfnet_finetune("smoke")
  config.dataset.name = "digits"
  config.workdir = str(tmp_path / "run")
  net = families.make_network("NFNet", config.model.kwargs.to_dict(), 1000)
  size = config.train.image_size
  params, _ = jax.jit(net.init, static_argnames="is_training")(
      jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32),
      is_training=True)
  params = jax.device_get(params)
  path = tmp_path / "F0_haiku.npz"  # Official layout: a dill-style pickle.
  path.write_bytes(checkpoint_files.old_haiku_pickle(params))
  config.pretrained.path = str(path)
  config.lock()
  plan = config_validation.validate(config)
  c = loop.build(config, plan)
  try:
    state = loop.initial_state(config, plan.spec, c,
                               pretrained_start.read(config))
  finally:
    c.checkpointer.close()
    c.logger.close()
  assert state.params["NFNet/~/linear"]["w"].shape[1] == 10
  for m in params:
    if m != "NFNet/~/linear":
      for n in params[m]:
        np.testing.assert_array_equal(state.params[m][n], params[m][n])
