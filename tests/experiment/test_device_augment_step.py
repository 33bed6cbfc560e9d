"""`train.augment.on_device`: the train step augments the host's draws and
steps as it does on the batch the host augments (same numbers on CPU)."""
import jax
import numpy as np
import pytest

from nfnets_jax.data import pipeline
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import parallel
from nfnets_jax.experiment import train_state as ts
from nfnets_jax.models import families
import train_harness as testing


# Opt-in (-m long), for CI's 10 minutes: two train-step compiles. The
# default suite checks the batches themselves (tests/data/
# test_device_augment.py) and runs the NFNet recipes' smoke forms, which
# augment in the step, end to end (test_configs.py).
@pytest.mark.long
def test_step_on_device_draws_equals_step_on_host_batch():
  config = testing.load_config(testing.DEFAULT_CONFIG, "smoke")
  config.train.global_batch_size = 8
  config.workdir = "/nonexistent/not-written"
  a = config.train.augment
  a.random_crop, a.flip, a.mixup_alpha, a.cutmix_alpha = True, True, 0.2, 1.0
  a.randaugment_layers, a.randaugment_magnitude = 2, 10
  plan = config_validation.validate(config, check_model=False)
  net = families.make_network(config.model.name, config.model.kwargs, 10)
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (20, 24, 3)).astype(np.uint8),
               "label": i % 10} for i in range(16)]
  mesh = parallel.local_mesh()
  start = ts.init_train_state(net, plan.tx, seed=0, image_size=16,
                              use_ema=True)
  results = {}
  for on_device in (False, True):
    a.on_device = on_device
    augment = pipeline.Augment(True, True, 2, 10.0, 0.2, 1.0, "relative",
                               on_device)
    batch = pipeline.TrainBatch(16, augment, 10, 2)(
        examples, np.random.default_rng(3))
    step = ts.make_train_step(net, plan.tx, plan.schedule, config.train,
                              augment=ts.device_augmentation(config.train))
    state, metrics = step(parallel.replicate(start, mesh),
                          parallel.shard(batch, mesh))
    results[on_device] = (float(np.asarray(metrics["loss"])[0]),
                          parallel.unreplicate(state.params))
  assert "ra_ops" in batch and batch["images"].shape == (8, 16, 16, 3)
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(results[True][1]),
                       jax.tree.leaves(results[False][1])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ts.device_augmentation(config.train) is not None
  a.on_device = False
  assert ts.device_augmentation(config.train) is None
