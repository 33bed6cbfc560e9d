"""Tests of timm's other NF models: `NormFreeNet`, its weights, its names.

Nothing is downloaded: each parity test builds a random timm model of one
kind (ECA-NFNet-L, NFNet-L, NF-ResNet, NF-SE-ResNet, NF-ECA-ResNet,
NF-RegNet, timm's NFNet-F), perturbs it (every gain, including the
zero-initialized last gain of each branch, so that no branch is trivially
zero), saves it as `.safetensors` and loads it with `create_model` and no
name: recognition names the model, and its logits are timm's (eval mode,
2 images at 64 or 66 px: odd map sizes 33 -> 17 -> 9 -> 5 -> 3 test the
padding). Recognition of every timm NF model and its full shape check run
on torch's meta device (no weights).
"""
import dataclasses
import functools
import pathlib
import re

import haiku as hk
import jax
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.cli import predict
from nfnets_jax.data import preprocessing
from nfnets_jax.experiment import pretrained_start
from nfnets_jax.models import families
from nfnets_jax.models import layers
from nfnets_jax.models import normfree
from nfnets_jax.models import stats
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import registry
from nfnets_jax.pretrained import timm as timm_weights
from nfnets_jax.pretrained import timm_normfree
import checkpoint_files

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

REPO = pathlib.Path(__file__).resolve().parents[2]
RTOL = 1e-4  # max |ours - timm| / max |timm|, logits and feature maps.
# (timm name, registry name, input side): one model of each kind (and
# eca_nfnet_l0 in `test_eca_nfnet_l0_logits_and_feature_maps_are_timms`).
KINDS = [
    ("nfnet_l0", "nfnet_l0", 66),
    ("nf_resnet26", "timm_nf_resnet26", 66),
    # The ResNet blocks with SE / ECA: attention paths nfnet_l0 and
    # eca_nfnet_l0 run too (opt-in, to keep the suite under 10 minutes).
    pytest.param("nf_seresnet26", "nf_seresnet26", 64,
                 marks=pytest.mark.long),
    pytest.param("nf_ecaresnet26", "nf_ecaresnet26", 66,
                 marks=pytest.mark.long),
    ("nf_regnet_b0", "timm_nf_regnet_b0", 64),
    # timm's NFNet-F: the paths of nfnet_l0 with GELU, 71M parameters.
    pytest.param("nfnet_f0", "timm_nfnet_f0", 66, marks=pytest.mark.long),
]


def rel_diff(a, b):
  """max |a - b| over max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())



@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
  """`get(timm name)` -> (perturbed timm model, its .safetensors), once."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  root, made = tmp_path_factory.mktemp("timm_normfree"), {}

  def get(name):
    if name not in made:
      model = timm.create_model(name).eval()
      torch.manual_seed(0)
      checkpoint_files.perturb_timm(model)
      path = root / f"{name}.safetensors"
      save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                str(path))
      made[name] = model, path
    return made[name]

  return get


def images(size):
  return np.random.default_rng(size).standard_normal(
      (2, size, size, 3)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("timm_name, name, size", KINDS)
def test_timm_file_is_recognized_and_gives_timms_logits(
    timm_file, timm_name, name, size):
  torch_model, path = timm_file(timm_name)
  model = nj.create_model(pretrained=path)
  assert (model.name, model.family, model.num_classes) == (
      name, "NormFreeNet", 1000)
  x = images(size)
  with torch.no_grad():
    want = torch_model(nchw(x)).numpy()
  diff = rel_diff(model(x), want)
  print(f"\n{name} vs timm {timm_name}, {size} px: max|diff|/max|logit| = "
        f"{diff:.2e}")
  assert diff <= RTOL


def test_eca_nfnet_l0_logits_and_feature_maps_are_timms(timm_file):
  """The maps of timm's `features_only=True`: stem.conv3, stages.0-2,
  final_conv, each before the activation that follows it."""
  torch_model, path = timm_file("eca_nfnet_l0")
  features = timm.create_model("eca_nfnet_l0", features_only=True).eval()
  # features_only flattens `stem.conv1` to `stem_conv1`, `stages.0` to
  # `stages_0`, and has no head.
  features.load_state_dict({
      re.sub(r"^(stem|stages)\.", r"\1_", k): v
      for k, v in torch_model.state_dict().items()
      if not k.startswith("head.")})
  x = images(64)
  with torch.no_grad():
    want = [f.permute(0, 2, 3, 1).numpy() for f in features(nchw(x))]
    want_logits = torch_model(nchw(x)).numpy()
  model = nj.create_model(pretrained=path)
  assert (model.name, model.family) == ("eca_nfnet_l0", "NormFreeNet")
  apply = jax.jit(functools.partial(model.net.apply, is_training=False,
                                    return_features=True))
  outputs = apply(model.params, model.state, None, x)[0]
  diff = rel_diff(outputs["logits"], want_logits)
  print(f"\neca_nfnet_l0 vs timm, 64 px: max|diff|/max|logit| = {diff:.2e}")
  assert diff <= RTOL
  got = outputs["features"]
  info = families.feature_info("NormFreeNet", model.model_kwargs)
  assert [(i.module, i.channels, i.reduction) for i in info] == [
      (d["module"], d["num_chs"], d["reduction"])
      for d in features.feature_info.get_dicts()]
  assert len(got) == len(want)
  for i, g, w in zip(info, got, want):
    assert g.shape == w.shape == (2, 64 // i.reduction, 64 // i.reduction,
                                  i.channels), i.module
    diff = rel_diff(g, w)
    print(f"\n{i.module}: {diff:.2e}")
    assert diff <= RTOL, i.module


@pytest.mark.parametrize("name, want", [
    ("eca_nfnet_l0", [("stem.conv3", 64, 2), ("stages.0", 256, 4),
                      ("stages.1", 512, 8), ("stages.2", 1536, 16),
                      ("final_conv", 2304, 32)]),
    ("timm_nf_resnet50", [("stem.conv", 64, 2), ("stages.0", 256, 4),
                          ("stages.1", 512, 8), ("stages.2", 1024, 16),
                          ("stages.3", 2048, 32)]),
    ("timm_nf_regnet_b1", [("stem.conv", 40, 2), ("stages.0", 40, 4),
                           ("stages.1", 80, 8), ("stages.2", 160, 16),
                           ("final_conv", 960, 32)]),
])
def test_feature_info_is_timms(name, want):
  spec = registry.get_spec(name)
  info = families.feature_info(spec.family, spec.kwargs)
  assert [(i.module, i.channels, i.reduction) for i in info] == want


def test_pth_loads_the_same_and_timms_name_builds_timms_definition(
    timm_file, tmp_path):
  torch_model, path = timm_file("nf_resnet26")
  pth = tmp_path / "weights.pth"
  torch.save({"state_dict": torch_model.state_dict()}, str(pth))
  a, b = create.load_checkpoint(pth), create.load_checkpoint(path)
  assert a.format == b.format == "timm"
  assert a.spec.name == b.spec.name == "timm_nf_resnet26"
  checkpoint_files.assert_params_equal(a.params, b.params)
  # 'nf_resnet26' names the official NFResNet; a timm file of timm's
  # nf_resnet26 builds timm's definition instead.
  assert registry.get_spec("nf_resnet26").family == "NFResNet"
  model = nj.create_model("nf_resnet26", pretrained=pth)
  assert (model.name, model.family) == ("timm_nf_resnet26", "NormFreeNet")
  # The header alone tells the model (what a fine-tuning config reads).
  assert timm_normfree.identify(timm_normfree.param_shapes(
      timm_weights.read_timm_shapes(str(pth)))) == "timm_nf_resnet26"


def test_params_of_no_model_name_the_closest(timm_file, tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch_model, _ = timm_file("nf_resnet26")
  path = tmp_path / "cut.safetensors"
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()
             if not k.startswith("stages.3.1.")}, str(path))
  with pytest.raises(ValueError, match=re.escape(
      "the closest: timm_nf_resnet26 (depths: (2, 2, 2, 2), params have "
      "(2, 2, 2, 1))")) as err:
    nj.create_model(pretrained=path)
  assert "no model name given" in str(err.value)
  assert str(path) in str(err.value)
  with pytest.raises(checks.ParamsMismatchError,
                     match=r"(?s)missing \(9\).*stages_3_1/~/conv1/w"):
    nj.create_model("timm_nf_resnet26", pretrained=path)


def test_timm_files_stay_dm_nfnet_when_they_have_skip_gains():
  keys = ["stem.conv1.weight", "stages.0.0.skipinit_gain"]
  assert timm_normfree.is_dm_nfnet(keys)
  assert not timm_normfree.is_dm_nfnet(keys[:1])
  with pytest.raises(ValueError, match="not part of a timm NormFreeNet"):
    timm_normfree.param_names(["stem.conv1.weight", "head.norm.weight"])


# ---------------------------------------------------------------------------
# The config table, the registry, recognition: timm's definitions, no weights.
# ---------------------------------------------------------------------------


def test_config_table_is_timms():
  nfnet = pytest.importorskip("timm.models.nfnet")
  assert set(normfree.NORMFREE_CONFIGS) == set(nfnet.model_cfgs) - {
      "test_nfnet"}
  for name, cfg in normfree.NORMFREE_CONFIGS.items():
    want = dataclasses.asdict(nfnet.model_cfgs[name])
    attn = want.pop("attn_kwargs") or {}
    want["depths"], want["channels"] = (tuple(want["depths"]),
                                        tuple(want["channels"]))
    want["act_layer"] = {"gelu": "gelu_exact"}.get(want["act_layer"],
                                                   want["act_layer"])
    got = dataclasses.asdict(cfg)
    if cfg.attn_layer == "se":  # ECA has no hidden width.
      assert (got["attn_rd_ratio"], got["attn_rd_divisor"]) == (
          attn.get("rd_ratio", 1 / 16), attn.get("rd_divisor", 8)), name
    for key in ("attn_rd_ratio", "attn_rd_divisor"):
      del got[key]
    assert got == want, name


def test_registry_names_and_data_configs_are_timms():
  # Every timm NF model has a name; timm's names are kept where free.
  assert set(registry.TIMM_NAMES) == set(normfree.NORMFREE_CONFIGS)
  prefixed = sorted(n for n in registry.TIMM_NAMES.values()
                    if n.startswith(registry.TIMM_PREFIX))
  assert prefixed == sorted(
      [f"timm_nf_resnet{d}" for d in (26, 50, 101)]
      + [f"timm_nf_regnet_b{i}" for i in range(6)]
      + [f"timm_nfnet_f{i}" for i in range(8)])
  for name in prefixed:  # The official definition keeps the plain name.
    assert registry.get_spec(name[len(registry.TIMM_PREFIX):]).family != (
        "NormFreeNet")
  assert len(nj.list_models()) == 72 + 28
  for timm_name, (train, test, crop_pct) in (
      registry.TIMM_NORMFREE_DATA.items()):
    cfg = timm.models.get_pretrained_cfg(timm_name)
    assert (cfg.input_size[1], (cfg.test_input_size or cfg.input_size)[1],
            cfg.test_crop_pct or cfg.crop_pct, cfg.crop_mode,
            cfg.interpolation) == (train, test, crop_pct, "center",
                                   "bicubic"), timm_name
    data = registry.get_spec(registry.TIMM_NAMES[timm_name]).data
    assert (data.train_size, data.test_size, data.crop_mode) == (
        train, test, "center")
    assert data.crop_padding == registry.timm_crop_padding(test, crop_pct)
    assert tuple(255 * m for m in cfg.mean) == pytest.approx(data.mean)
    assert tuple(255 * s for s in cfg.std) == pytest.approx(data.std)
  # eca_nfnet_l0 evaluates at 288 px without a margin (test_crop_pct 1).
  assert registry.get_spec("eca_nfnet_l0").data.crop_padding == 0


def test_every_model_has_its_own_layout():
  layouts = {n: timm_normfree.config_layout(c)
             for n, c in timm_normfree.candidates().items()}
  assert len(layouts) == 28
  assert len(set(layouts.values())) == len(layouts)


def timm_shapes(name):
  """A timm model's state-dict shapes, built on torch's meta device."""
  model = timm.create_model(name, device="meta")
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("timm_name", [
    "eca_nfnet_l3", "nfnet_f7", "nf_regnet_b5", "nf_ecaresnet101"])
def test_recognized_from_shapes_alone(timm_name):
  shapes, _ = timm_shapes(timm_name)
  assert timm_normfree.identify(timm_normfree.param_shapes(shapes)) == (
      registry.TIMM_NAMES[timm_name])


@pytest.mark.long
def test_every_timm_model_is_recognized_and_fits_its_definition():
  """All 28: recognized, same shapes as ours, timm's parameter count."""
  for timm_name, name in registry.TIMM_NAMES.items():
    if timm_name.startswith("dm_"):
      continue
    shapes, model = timm_shapes(timm_name)
    params = timm_normfree.param_shapes(shapes)
    assert timm_normfree.identify(params) == name
    want, _ = stats.param_shapes("NormFreeNet", {"variant": timm_name}, 1000)
    assert params == want, name
    assert sum(int(np.prod(s)) for leaves in params.values()
               for s in leaves.values()) == sum(
                   p.numel() for p in model.parameters()), name
    info = families.feature_info("NormFreeNet", {"variant": timm_name})
    assert [(i.module, i.channels, i.reduction) for i in info] == [
        (d["module"], d["num_chs"], d["reduction"])
        for d in model.feature_info], name


# ---------------------------------------------------------------------------
# Evaluation crop, nfnets-predict, fine-tuning, the model zoo table.
# ---------------------------------------------------------------------------


def test_center_crop_keeps_the_aspect_ratio():
  image = np.random.default_rng(0).integers(0, 256, (30, 45, 3), np.uint8)
  data = registry.get_spec("nf_seresnet26").data  # 224 px, crop_pct 0.9.
  resize = data.test_size + data.crop_padding
  assert (data.crop_mode, resize) == ("center", 248)
  # The shorter side to 248, the longer to int(248 * 45 / 30) = 372.
  full = preprocessing.resize_bicubic(image, 248, 372)
  want = preprocessing.normalize(full[12:236, 74:298])
  np.testing.assert_array_equal(data.preprocess(image), want)
  bad = dataclasses.replace(data, crop_mode="border")
  with pytest.raises(ValueError, match="crop modes"):
    bad.preprocess(image)


def test_predict_reads_a_timm_file(timm_file, tmp_path, capsys):
  PIL = pytest.importorskip("PIL.Image")
  _, path = timm_file("nf_resnet26")
  image = tmp_path / "cat.png"
  PIL.fromarray(np.random.default_rng(1).integers(
      0, 256, (40, 30, 3), np.uint8)).save(image)
  assert predict.main(["--pretrained", str(path), "--top-k", "2",
                       str(image)]) == 0
  assert capsys.readouterr().out.startswith(f"{image}: ")


@pytest.mark.long
def test_export_of_a_timm_model(timm_file, tmp_path):
  _, path = timm_file("nf_resnet26")
  model = nj.create_model(pretrained=path)
  artifact = nj.export(model, tmp_path / "r26.nfx", batch_size=1)
  exported = nj.load_exported(artifact)
  assert exported.name == "timm_nf_resnet26"
  assert exported.data_config == model.data_config  # crop_mode 'center'.
  x = images(224)[:1]
  np.testing.assert_allclose(exported(x), model(x), rtol=1e-5, atol=1e-5)




def test_finetuning_a_timm_file_adopts_its_normfreenet(timm_file):
  _, path = timm_file("eca_nfnet_l0")
  config = checkpoint_files.finetune_config(path)
  # The recipe's NFNet does not fit: the problem says what to set ...
  (problem,) = checkpoint_files.forward_problems(config)
  assert "is 'eca_nfnet_l0' (timm's definition, a NormFreeNet)" in problem
  assert "--config.model.name=NormFreeNet" in problem
  # ... and the run sets it (loop.run does this before validating).
  before = config.to_dict()
  adopted, changed = pretrained_start.adopt_forward(config)
  assert config.to_dict() == before
  assert changed == {"name": "NormFreeNet", "kwargs": {
      "variant": "eca_nfnet_l0", "stochdepth_rate": 0.1}}
  assert adopted.model.name == "NormFreeNet"
  assert adopted.model.kwargs.to_dict() == changed["kwargs"]
  assert not checkpoint_files.forward_problems(adopted)
  assert pretrained_start.adopt_forward(adopted) == (adopted, {})
  # pretrained.model picks the NormFreeNet to fine-tune it as.
  assert pretrained_start.adopt_forward(checkpoint_files.finetune_config(
      path, model="nfnet_l0"))[1]["kwargs"]["variant"] == "nfnet_l0"
  # The weights fit the adopted network, with a new head.
  net = families.make_network("NormFreeNet", adopted.model.kwargs, 10)
  params, _ = pretrained_start.initial_params(
      adopted, net, 10, pretrained_start.read(adopted))
  assert params["NormFreeNet/~/linear"]["w"].shape == (2304, 10)


def test_model_zoo_has_one_row_per_name():
  text = (REPO / "docs" / "model_zoo.md").read_text()
  rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", text, re.MULTILINE)
  assert [n for n, _ in rows] == nj.list_models()
  definitions = dict(rows)
  assert definitions["nfnet_f0"].strip() == "official"
  assert definitions["timm_nf_resnet50"].strip() == "timm `nf_resnet50`"


def test_custom_config_signal_metrics_and_errors():
  tiny = {"depths": (1, 2), "channels": (16, 32), "stem_type": "deep",
          "stem_chs": 16, "group_size": 8, "attn_layer": "se",
          "num_features": 48, "extra_conv": True}
  net = families.make_network("NormFreeNet", {"variant": tiny}, 3)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
  params, state = stats.init_shapes(net, 32)
  out, _ = jax.eval_shape(lambda p, s, x: hk.transform_with_state(
      lambda x: normfree.NormFreeNet(3, tiny)(
          x, is_training=True, return_metrics=True)).apply(
              p, s, jax.random.key(0), x), params, state, x)
  assert out["logits"].shape == (2, 3) and out["pool"].shape == (2, 48)
  assert {k for k in out if k.startswith("avg_var_")} == {
      f"avg_var_{i}" for i in range(4)}  # The stem, then each block.
  assert {k for k in out if k.startswith("res_avg_var_")} == {
      f"res_avg_var_{i}" for i in range(3)}
  # 'deep': stem convs of 8, 8, 16 channels; the map is the second's.
  assert [(f.module, f.channels, f.reduction) for f in families.feature_info(
      "NormFreeNet", {"variant": tiny})] == [
          ("stem.conv2", 8, 2), ("stages.0", 16, 4), ("final_conv", 48, 8)]
  with pytest.raises(ValueError, match="variant='nfnet_l9' is unknown"):
    normfree.get_config("nfnet_l9")
  with pytest.raises(ValueError, match="stem_type='5x5'; allowed"):
    normfree.get_config({**tiny, "stem_type": "5x5"})
  with pytest.raises(ValueError, match="needs 'depths' and 'channels'"):
    normfree.get_config({"depths": (1,), "width": 2})


def test_eca_gate_is_a_1d_conv_over_channels():
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 256), np.float32)
  fwd = hk.transform(lambda x: layers.EfficientChannelAttention(256)(x))
  params = fwd.init(jax.random.key(0), x)
  (w,) = jax.tree.leaves(params)
  assert w.shape == (layers.eca_kernel_size(256),) == (5,)
  gate = np.asarray(fwd.apply(params, None, x))[:, 0, 0]
  y = np.pad(x.mean(axis=(1, 2)), ((0, 0), (2, 2)))
  want = 1 / (1 + np.exp(-sum(w[j] * y[:, j:j + 256] for j in range(5))))
  np.testing.assert_allclose(gate, want, rtol=1e-5)
