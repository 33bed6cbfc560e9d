"""One way through a run: validation never changes the config, a pretrained
checkpoint is read once, a resumed run reads no weights again and runs no
initializer, and the run reports its result in one line.

In-process, tiny fine-tuning runs on the digits (a few steps each).
"""
import copy
import os

import jax
import pytest

import nfnets_jax as nj
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import loop
from nfnets_jax.experiment import pretrained_start
from nfnets_jax.experiment import train_state
from nfnets_jax.pretrained import create
import train_harness as testing


@pytest.fixture
def finetune(tmp_path):
  """The default smoke config fine-tuning a saved tiny model for 2 steps."""
  config = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
  config.workdir = str(tmp_path / "run")
  config.train.num_steps = 2
  config.checkpoint.every_steps = 2
  config.pretrained.path = testing.tiny_pretrained(
      config, str(tmp_path / "tiny.npz"))
  return config


def test_validation_decides_without_changing_the_config(finetune):
  before = copy.deepcopy(finetune)
  plan = config_validation.validate(finetune)
  assert finetune == before
  assert plan.spec.total_steps == 2
  assert callable(plan.tx.update) and float(plan.schedule(0)) >= 0.0


@pytest.mark.slow
def test_pretrained_read_once_and_resume_builds_a_template(
    cache_dir, finetune, monkeypatch, capsys):
  reads, inits, templates = [], [], []
  monkeypatch.setattr(create, "load_checkpoint", _spy(
      create.load_checkpoint, reads))
  monkeypatch.setattr(train_state, "init_train_state", _spy(
      train_state.init_train_state, inits))
  monkeypatch.setattr(train_state, "train_state_template", _spy(
      train_state.train_state_template, templates))
  with testing.cached_compiles(cache_dir):
    first = loop.run(finetune)
  assert (len(reads), len(inits), len(templates)) == (1, 1, 0)
  # The result in one line; every parameter's shape in the workdir.
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith("final evaluation")]
  assert lines == [
      f"final evaluation at step 2 on 360 images: top-1 "
      f"{100 * first['top1']:.2f}%, top-5 {100 * first['top5']:.2f}% "
      f"(EMA: top-1 {100 * first['ema_top1']:.2f}%, top-5 "
      f"{100 * first['ema_top5']:.2f}%)"]
  assert os.path.exists(os.path.join(finetune.workdir, loop.PARAM_TABLE_FILE))

  # Resumed to step 4: the template is traced, the pretrained weights are
  # not read again (only the file's first bytes, for its forward) and no
  # initializer runs. A longer run changes the schedule: allowed by name.
  finetune.train.num_steps = 4
  with testing.cached_compiles(cache_dir):
    second = loop.run(finetune, allow_config_change=["train.num_steps"])
  assert (len(reads), len(inits), len(templates)) == (1, 1, 1)
  (net, tx), _ = templates[0]
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(train_state.train_state_template(
                 net, tx, image_size=16, use_ema=True)))
  assert first["count"] == second["count"] == 360


def test_adopting_a_checkpoints_forward_leaves_the_given_config(finetune):
  finetune.pretrained.model = "dm_nfnet_f0"  # timm's definition.
  before = copy.deepcopy(finetune)
  adopted, changed = pretrained_start.adopt_forward(finetune)
  assert finetune == before and adopted is not finetune
  assert changed == nj.TIMM_NFNET_KWARGS
  assert {k: adopted.model.kwargs[k] for k in changed} == changed


def test_old_configs_with_a_lowering_get_a_clear_error(finetune):
  with finetune.unlocked():
    finetune.model.kwargs.conv_impl = "native"
  with pytest.raises(config_validation.ConfigError,
                     match="conv_impl='native' is not a model argument.*"
                     "NFNETS_JAX_CONV=native"):
    config_validation.validate(finetune)


def _spy(fn, calls):
  """`fn`, recording `(args, kwargs)` of each call in `calls`."""
  def wrapped(*args, **kwargs):
    calls.append((args, kwargs))
    return fn(*args, **kwargs)
  return wrapped
