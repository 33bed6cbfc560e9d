"""Every config: documented, locked, the papers' recipe, and runs one step.

The recipe checks read the per-variant values from the model modules'
tables (configs are data); the end-to-end check runs every config's smoke
form (tiny model, one step) in-process with ImageNet and CIFAR-10 mocked by
`tfds.testing.mock_data`.
"""
import math
import os

import pytest

from nfnets_jax.cli import errors
from nfnets_jax.cli import train_flags
from nfnets_jax.models import nf_regnet
from nfnets_jax.models import nfnet
import train_harness as testing

CONFIGS = testing.config_paths()
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in CONFIGS]
NFNETS = [f"F{i}" for i in range(8)]
# Paper / official release: RandAugment 4 layers; magnitude 5 for F0, 10 for
# F1-F2, 15 for F3-F7.
RA_MAGNITUDE = {"F0": 5, "F1": 10, "F2": 10, "F3": 15, "F4": 15, "F5": 15,
                "F6": 15, "F7": 15}


def _load(name, arg=None):
  return testing.load_config(
      os.path.join(testing.REPO, "configs", f"{name}.py"), arg)


def test_expected_configs_exist():
  expected = {"default", "nf_resnet50", "nf_regnet", "nfnet", "nfnet_finetune"}
  assert expected == set(NAMES)


@pytest.mark.parametrize("old,new", [
    ("nfnet_f3.py", "nfnet.py:f3"), ("nfnet_f3.py:smoke", "nfnet.py:f3,smoke"),
    ("nf_regnet_b0.py", "nf_regnet.py:b0"), ("default.py", "default.py"),
    ("nope.py", "nope.py")])
def test_per_variant_config_names_still_work(old, new):
  configs = os.path.join(testing.REPO, "configs")
  assert train_flags.resolve_config(os.path.join(configs, old)) == (
      os.path.join(configs, new))
  if new != "nope.py":
    via_old = testing.load_config(os.path.join(configs, old))
    path, _, arg = new.partition(":")
    assert via_old == testing.load_config(os.path.join(configs, path),
                                          arg or None)


@pytest.mark.parametrize("arg", ["F9", "F1,F2", "tiny"])
def test_nfnet_config_refuses_unknown_arguments(arg):
  with pytest.raises(errors.UsageError, match="allowed: one variant of F0"):
    _load("nfnet", arg)


@pytest.mark.parametrize("name", NAMES)
def test_documented_and_locked(name):
  path = os.path.join(testing.REPO, "configs", f"{name}.py")
  with open(path) as f:
    doc = f.read().split('"""')[1]
  assert f"--config configs/{name}.py" in doc
  assert "Expected result" in doc and "Runtime" in doc
  config = _load(name)
  with pytest.raises(AttributeError):
    config.train.global_batchsize = 8  # Locked: a typo cannot add a field.
  with pytest.raises(TypeError):
    config.train.global_batch_size = "big"  # Typed.


@pytest.mark.parametrize("variant", NFNETS)
def test_nfnet_recipe(variant):
  c = _load("nfnet", variant)
  v = nfnet.NFNET_VARIANTS[variant]
  assert c.model.name == "NFNet" and c.model.kwargs.variant == variant
  assert c.dataset.name == "imagenet2012"
  assert c.train.global_batch_size == 4096 and c.train.num_epochs == 360
  lr = c.optimizer.lr
  assert (lr.base_lr, lr.base_batch_size, lr.warmup_epochs, lr.schedule,
          lr.end_lr_factor) == (0.1, 256, 5.0, "cosine", 0.0)
  assert c.optimizer.name == "sgd"
  assert c.optimizer.kwargs.to_dict() == {"momentum": 0.9, "nesterov": True}
  assert c.optimizer.weight_decay == 2e-5
  assert (c.optimizer.agc.clipping, c.optimizer.agc.eps) == (0.01, 1e-3)
  assert c.train.label_smoothing == 0.1 and c.train.loss == "softmax"
  assert c.train.ema_decay == 0.99999
  assert c.model.kwargs.stochdepth_rate == 0.25
  assert "drop_rate" not in c.model.kwargs  # The variant's own dropout.
  a = c.train.augment
  assert a.randaugment_layers == 4 == v.randaugment_layers
  assert a.randaugment_magnitude == RA_MAGNITUDE[variant]
  assert a.mixup_alpha > 0 and a.cutmix_alpha > 0
  assert a.random_crop and a.flip
  assert c.train.compute_dtype == "bfloat16"
  assert c.train.image_size == v.train_imsize
  assert c.eval.image_size == v.test_imsize
  assert c.eval.crop_padding == 32
  # F6 as the paper trained it: SAM (the SAM paper's ImageNet rho, per-device
  # perturbations); the others without.
  sam = (0.05, False) if variant == "F6" else (0.0, False)
  assert (c.optimizer.sam.rho, c.optimizer.sam.sync_perturbations) == sam


def test_nf_regnet_recipe():
  c = _load("nf_regnet", "B0")
  v = nf_regnet.NF_REGNET_VARIANTS["B0"]
  assert c.model.name == "NFRegNet" and c.model.kwargs.variant == "B0"
  assert c.train.global_batch_size == 1024 and c.train.num_epochs == 360
  assert c.optimizer.lr.base_lr == 0.4
  assert c.optimizer.lr.base_batch_size == 1024  # Not scaled by batch.
  assert math.isclose(c.optimizer.lr.end_lr_factor * 0.4, 0.001)
  assert c.optimizer.weight_decay == 5e-5 and not c.optimizer.agc.clipping
  assert c.model.kwargs.activation == "silu"
  assert (c.train.image_size, c.eval.image_size) == (v.train_imsize,
                                                    v.test_imsize)


def test_nf_resnet_and_finetune_recipes():
  c = _load("nf_resnet50")
  assert c.model.name == "NFResNet" and c.model.kwargs.depth == 50
  c = _load("nfnet_finetune")
  assert c.pretrained.path and c.pretrained.reinit_head
  assert c.dataset.name != "imagenet2012"


def test_default_is_embedded_digits():
  c = _load("default")
  assert c.dataset.name == "digits" and c.model.name == "NFNet"
  assert c.optimizer.agc.clipping > 0
  doc = open(testing.DEFAULT_CONFIG).read().split('"""')[1]
  for field in ("seed", "model.name", "dataset.name", "train.global_batch_size",
                "eval.every_steps", "checkpoint.max_to_keep", "optimizer",
                "distributed.initialize", "pretrained.path"):
    assert field in doc, field


@pytest.mark.parametrize("name", NAMES)
def test_smoke_form_is_tiny(name):
  c = _load(name, "smoke")
  assert c.train.num_steps == 1 and c.train.global_batch_size == 8
  assert c.train.image_size <= 32 and c.eval.image_size <= 32


# Run end to end by other tests: the digits config's smoke form is the
# session's reference run (conftest `reference_run`, through the CLI), the
# fine-tuning one fine-tunes on an image folder
# (tests/data/test_image_folder.py::test_finetune_config_on_image_folder).
RUN_ELSEWHERE = ("default", "nfnet_finetune")


# In the default suite: the NFNet recipe (augmentation in the train step,
# the default oneDNN convolutions). Opt-in (-m long), to keep the suite under
# CI's 10 minutes: the NF-ResNet and NF-RegNet recipes, whose configs are
# validated above and whose networks train in tests/models.
SMOKE_IN_SUITE = ("nfnet",)


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    n if n in SMOKE_IN_SUITE else pytest.param(n, marks=pytest.mark.long)
    for n in NAMES if n not in RUN_ELSEWHERE])
def test_every_config_runs_one_step(name, tmp_path):
  """The other configs' smoke forms, end to end (ImageNet mocked)."""
  (metrics,) = testing.smoke_all(str(tmp_path), [CONFIGS[NAMES.index(name)]]
                                 ).values()
  for key in ("top1", "top5", "loss", "ema_top1"):
    assert math.isfinite(metrics[key]), (name, key)
  assert metrics["count"] == 32, name  # Mock data: 32 examples a split.
  assert testing.checkpoint_steps(str(tmp_path / name)) == [1], name
