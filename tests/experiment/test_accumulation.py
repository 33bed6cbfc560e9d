"""Gradient accumulation: 4 micro-batches against 1, on 1 and 4 devices.

For a normalizer-free network (no batch statistics) without stochastic
layers, averaging the gradients of 4 equal micro-batches is the full
batch's gradient up to float rounding, so several steps of the package's
train step (AGC, weight decay, Nesterov momentum) must agree.
"""
import textwrap

import pytest

from nfnets_jax.experiment import config_validation
import train_harness as testing

# Three steps of the digits smoke model (NFNet, 16 px) with accumulation 1
# and 4 from the same state and batches; prints the largest difference of
# the parameters and the largest change of a parameter.
_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from nfnets_jax.experiment import config_validation, parallel
    from nfnets_jax.experiment import train_state as ts
    from nfnets_jax.models import families
    import sys; sys.path.insert(0, "tests")
    import train_harness as testing

    config = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
    config.train.global_batch_size = 32
    config.optimizer.lr.base_lr = 1.6
    config.workdir = "/nonexistent/not-written"
    plan = config_validation.validate(config, check_model=False)
    net = families.make_network(config.model.name, config.model.kwargs, 10)
    mesh = parallel.local_mesh()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
      labels = rng.integers(0, 10, 32).astype(np.int32)
      batches.append(parallel.shard({
          "images": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
          "labels": labels,
          "soft_labels": np.eye(10, dtype=np.float32)[labels]}, mesh))
    start = ts.init_train_state(net, plan.tx, seed=0, image_size=16,
                                use_ema=True)
    finals, losses = {}, {}
    for accumulation in (1, 4):
      config.train.accumulation_steps = accumulation
      step = ts.make_train_step(net, plan.tx, plan.schedule, config.train)
      state = parallel.replicate(start, mesh)
      losses[accumulation] = []
      for batch in batches:
        state, metrics = step(state, batch)
        losses[accumulation].append(float(np.asarray(metrics["loss"])[0]))
      finals[accumulation] = parallel.unreplicate(state)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(finals[1]),
                               jax.tree.leaves(finals[4])))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(finals[1].params),
                                jax.tree.leaves(start.params)))
    print(json.dumps({"diff": diff, "moved": moved, "losses": losses}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [
    # One device: opt-in (-m long), to keep the suite under CI's 10 minutes;
    # the 4-device run accumulates on each device the same way.
    pytest.param(1, marks=pytest.mark.long), 4])
def test_four_micro_batches_update_as_one_batch(devices):
  out = testing.run_script(_SCRIPT, devices=devices)
  assert out["moved"] > 1e-2  # Three real steps.
  assert out["diff"] < 1e-5 * max(1.0, out["moved"]), out
  for full, accumulated in zip(out["losses"]["1"], out["losses"]["4"]):
    assert abs(full - accumulated) < 1e-5 * max(1.0, abs(full))


def test_a_batch_that_does_not_split_is_refused_naming_both():
  config = testing.load_config(testing.DEFAULT_CONFIG)
  config.train.global_batch_size = 16
  config.train.accumulation_steps = 3
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(config, check_model=False)
  assert ("config.train.global_batch_size=16 is invalid; allowed: a positive "
          "multiple of 3 (the number of devices, 1 devices, times "
          "train.accumulation_steps=3") in str(err.value)
  config.train.accumulation_steps = 0
  with pytest.raises(config_validation.ConfigError,
                     match="config.train.accumulation_steps=0 is invalid"):
    config_validation.validate(config, check_model=False)
