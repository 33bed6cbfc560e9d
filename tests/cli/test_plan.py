"""`nfnets-plan`: one device's train step compiled from a config, its memory
and compute read from XLA, and the accumulation steps / remat that fit."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from nfnets_jax.cli import errors
from nfnets_jax.cli import plan
from nfnets_jax.experiment import memory_plan
from nfnets_jax.experiment import train_state as ts
from nfnets_jax.models import families
from nfnets_jax.models import stats
from nfnets_jax.optim import optimizers
import train_harness as testing

SMOKE = f"--config={testing.DEFAULT_CONFIG}:smoke"
BATCH = "--config.train.global_batch_size=32"


def _plan(capsys, *args):
  status = errors.guard(plan.PROG, lambda: plan.run(["nfnets-plan", *args]))
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture(scope="module")
def fitting(tmp_path_factory):
  """The smoke config's plan on 2 devices with room to spare (JSON)."""
  config = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
  with config.unlocked():
    config.train.global_batch_size = 32
  result = memory_plan.plan(config, num_devices=2, num_classes=10,
                            device_memory_gib=1.0)
  return config, result


def _bytes(tree):
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def test_plan_reads_the_compiled_step(fitting):
  config, result = fitting
  step = result.step
  assert result.fits and not result.suggestions and not result.probes
  assert result.per_device_batch == step.micro_batch == 16
  assert (step.accumulation_steps, step.remat, step.backend) == (1, False,
                                                                 "cpu")
  # The arguments are exactly the train state and one device's batch.
  net = families.make_network(config.model.name, config.model.kwargs, 10)
  tx, _ = optimizers.make_optimizer(
      config.optimizer, batch_size=32, steps_per_epoch=1, total_epochs=1.0)
  state = ts.train_state_template(net, tx, image_size=config.train.image_size,
                                  use_ema=config.train.ema_decay is not None)
  size = config.train.image_size
  batch_bytes = 16 * (size * size * 3 * 4 + 4 + 10 * 4)
  assert step.argument_bytes == _bytes(state) + batch_bytes
  # The state is donated: its outputs are written in place.
  assert step.alias_bytes == _bytes(state)
  assert step.peak_bytes == (step.argument_bytes + step.output_bytes
                             - step.alias_bytes + step.temp_bytes)
  assert result.num_params == stats.count_params(state.params)
  model_fn = lambda x: families.build_model(
      config.model.name, 10, **config.model.kwargs)(x, is_training=False)
  assert result.macs_per_image == stats.count_flops(model_fn, size)
  assert step.flops > 2 * 16 * result.macs_per_image  # Forward + backward.


def _linear_step(config, *, per_device_batch, accumulation_steps, remat,
                 num_classes):
  """A stand-in for the compiler: 1000 + 100 (50 with remat) bytes per
  image of a micro-batch, 7 more with accumulation (its gradient sum)."""
  del config, num_classes
  micro = per_device_batch // accumulation_steps
  temp = (50 if remat else 100) * micro + (7 if accumulation_steps > 1 else 0)
  return memory_plan.StepMemory(
      micro_batch=micro, accumulation_steps=accumulation_steps, remat=remat,
      argument_bytes=1000, output_bytes=0, alias_bytes=0, temp_bytes=temp,
      flops=1.0, compile_s=0.0, backend="cpu")


def test_suggestions_are_the_fewest_accumulation_steps_that_fit(monkeypatch):
  config = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
  with config.unlocked():
    config.train.global_batch_size = 64  # 32 per device over 2.
  asked = []

  def step_memory(config, **kwargs):
    asked.append((kwargs["per_device_batch"], kwargs["accumulation_steps"],
                  kwargs["remat"]))
    return _linear_step(config, **kwargs)
  monkeypatch.setattr(memory_plan, "step_memory", step_memory)
  monkeypatch.setattr(memory_plan, "_accumulator_bytes", lambda params: 7)
  # 1000 + 100 x 32 = 4200 bytes; 2000 fit 8 images (1807), or 16 with remat.
  result = memory_plan.plan(config, num_devices=2, num_classes=10,
                            device_memory_gib=2000 / memory_plan.GIB)
  assert result.step.peak_bytes == 4200 and result.fits is False
  assert [(s.accumulation_steps, s.micro_batch, s.remat, s.peak_bytes)
          for s in result.suggestions] == [(4, 8, False, 1807),
                                           (2, 16, True, 1807)]
  # As configured, probes at an eighth of the micro-batch (4 images) with
  # and without remat, then each suggestion once.
  assert asked == [(32, 1, False), (4, 1, False), (4, 1, True),
                   (32, 4, False), (32, 2, True)]
  assert memory_plan.plan(config, num_devices=2, num_classes=10,
                          device_memory_gib=1.0).suggestions == ()


@pytest.mark.long  # Compiles 5-8 steps: ~45 s (-m long).
def test_a_step_that_does_not_fit_gets_compiled_suggestions(fitting):
  config, fits = fitting
  limit_gib = 0.6 * fits.step.peak_bytes / memory_plan.GIB
  crowded = memory_plan.plan(config, num_devices=2, num_classes=10,
                             device_memory_gib=limit_gib)
  assert crowded.fits is False
  assert crowded.step.peak_bytes == fits.step.peak_bytes
  assert [(p.micro_batch, p.remat) for p in crowded.probes] == [
      (2, False), (2, True)]
  assert [s.remat for s in crowded.suggestions] == [False, True]
  for s in crowded.suggestions:
    assert s.peak_bytes <= crowded.device_memory_bytes
    assert s.accumulation_steps * s.micro_batch == 16
  plain, remat = crowded.probes
  assert remat.temp_bytes < plain.temp_bytes


def test_command_line(capsys, monkeypatch, fitting):
  config, fits = fitting
  crowded = dataclasses.replace(
      fits, device_memory_bytes=fits.step.peak_bytes // 2,
      suggestions=(dataclasses.replace(fits.step, accumulation_steps=4,
                                       micro_batch=4),))
  asked = []

  def fake_plan(config, **kwargs):
    asked.append((config, kwargs))
    return crowded if kwargs["device_memory_gib"] < 1 else fits
  monkeypatch.setattr(memory_plan, "plan", fake_plan)
  status, out, err = _plan(capsys, SMOKE, BATCH, "--devices=2",
                           "--device-memory=1", "--json")
  assert status == 0 and not err
  seen, kwargs = asked[-1]
  assert seen.train.global_batch_size == 32
  assert (kwargs["num_devices"], kwargs["device_memory_gib"],
          kwargs["num_classes"]) == (2, 1.0, 10)
  record = json.loads(out)
  assert record["peak_bytes"] == fits.step.peak_bytes
  assert (record["per_device_batch"], record["fits"], record["backend"]) == (
      16, True, "cpu")
  status, out, err = _plan(capsys, SMOKE, BATCH, "--devices=2",
                           "--device_memory=0.001")
  assert status == plan.EXIT_DOES_NOT_FIT
  assert "32 = 2 devices x 16" in out and "XLA:CPU" in out
  first = crowded.suggestions[0]
  assert (f"--config.train.accumulation_steps={first.accumulation_steps} "
          "--config.model.remat=False" in out)
  text = plan.plan_text(fits, config, "configs/default.py:smoke")
  assert "fits               yes" in text


def test_bad_input_names_what_is_allowed(capsys):
  status, _, err = _plan(capsys, SMOKE, "--devices=3")
  assert status == errors.EXIT_USAGE
  assert "config.train.global_batch_size=8 is invalid" in err
  assert "--devices=3 times train.accumulation_steps=1" in err
  status, _, err = _plan(capsys, SMOKE, "--device-memory=-1")
  assert status == errors.EXIT_USAGE and "--device-memory=-1.0" in err
  status, _, err = _plan(capsys, "--devices=1")
  assert status == errors.EXIT_USAGE and "--config is required" in err
  status, _, err = _plan(capsys, SMOKE, "--workdir=/tmp/x")
  assert status == errors.EXIT_USAGE and "--workdir" in err
  status, _, err = _plan(capsys, SMOKE, "--config.model.kwargs.activation=foo")
  assert status == errors.EXIT_USAGE and "config.model.kwargs=" in err
  status, _, err = _plan(capsys, SMOKE, "--config.train.batchsize=8")
  assert status == errors.EXIT_USAGE
  assert "did you mean" in err and "global_batch_size" in err
