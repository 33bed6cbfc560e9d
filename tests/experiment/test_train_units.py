"""Unit tests of the loop's pieces (in-process, one CPU device, no training)."""
import io
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets_jax.experiment import checkpoint_io
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import inputs
from nfnets_jax.experiment import logging as run_logging
from nfnets_jax.experiment import losses
from nfnets_jax.experiment import parallel
from nfnets_jax.experiment import train_state as ts


def test_topk_correct_only_strictly_larger_logits_count():
  logits = jnp.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
  labels = jnp.array([0, 1, 0])
  got = losses.topk_correct(logits, labels, ks=(1, 2, 5))
  np.testing.assert_array_equal(got["top1"], [1, 1, 0])
  np.testing.assert_array_equal(got["top2"], [1, 1, 0])
  np.testing.assert_array_equal(got["top5"], [1, 1, 1])  # k capped at 3.


def test_label_smoothing_and_losses():
  y = jnp.eye(4)[jnp.array([0, 3])]
  smooth = losses.smooth_labels(y, 0.1)
  np.testing.assert_allclose(smooth.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(smooth[0], [0.925, 0.025, 0.025, 0.025])
  logits = jnp.zeros((2, 4))
  np.testing.assert_allclose(losses.cross_entropy(logits, y, "softmax"),
                             np.log(4), rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, y, "sigmoid"),
                             4 * np.log(2), rtol=1e-6)
  with pytest.raises(ValueError, match="config.train.loss='hinge'"):
    losses.cross_entropy(logits, y, "hinge")


def test_ema_decay_warmup_is_the_official_tf1_ema():
  d = ts.ema_decay_at(0.99999, jnp.array(0), warmup=True)
  np.testing.assert_allclose(d, 0.1)
  d = ts.ema_decay_at(0.99999, jnp.array(10**7), warmup=True)
  np.testing.assert_allclose(d, 0.99999)
  np.testing.assert_allclose(ts.ema_decay_at(0.9, jnp.array(0), False), 0.9)


def test_replicate_unreplicate_and_shard():
  mesh = parallel.local_mesh()
  tree = {"a": np.arange(6.0).reshape(2, 3), "b": np.int32(7)}
  rep = parallel.replicate(tree, mesh)
  assert rep["a"].shape == (jax.local_device_count(), 2, 3)
  back = parallel.unreplicate(rep)
  np.testing.assert_array_equal(back["a"], tree["a"])
  assert back["b"] == 7
  batch = parallel.shard({"x": np.arange(8.0)}, mesh)
  assert batch["x"].shape == (jax.local_device_count(), 8)
  assert parallel.allgather_json({"k": [1, 2]}) == [{"k": [1, 2]}]


def test_prefetch_keeps_order_and_tags():
  mesh = parallel.local_mesh()
  source = (({"x": np.full(4, i, np.float32)}, f"tag{i}") for i in range(5))
  out = list(parallel.prefetch_to_device(source, mesh, size=2))
  assert [tag for _, tag in out] == [f"tag{i}" for i in range(5)]
  assert [float(b["x"][0, 0]) for b, _ in out] == [0, 1, 2, 3, 4]


def test_distributed_initialize_modes(monkeypatch):
  cfg = config_schema.base_config().distributed
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert not parallel.wants_distributed(cfg)  # 'auto' on one machine.
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
  assert parallel.wants_distributed(cfg)
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
  cfg.coordinator_address = "10.0.0.1:1234"
  assert parallel.wants_distributed(cfg)
  cfg.initialize = "False"
  assert not parallel.wants_distributed(cfg)
  cfg.initialize = "sometimes"
  with pytest.raises(ValueError, match="config.distributed.initialize"):
    parallel.wants_distributed(cfg)


def test_positions_from_checkpoint():
  saved = [{"0": {"p": 1}}, {"1": {"p": 2}}]
  assert inputs.positions_from_checkpoint(saved, 2) == {0: {"p": 1},
                                                        1: {"p": 2}}
  assert inputs.positions_from_checkpoint(saved, 4) is None  # Re-sharded.


def test_checkpointer_round_trip_keeps_last_k(tmp_path):
  params = {"lin": {"w": np.ones((2, 3), np.float32)}}
  tx = optax.sgd(0.1, momentum=0.9)
  state = ts.TrainState(
      params=params, model_state={}, opt_state=jax.device_get(tx.init(params)),
      ema_params=params, ema_model_state={}, step=np.asarray(0, np.int32),
      rng=np.asarray(jax.random.PRNGKey(3)))
  ckpt = checkpoint_io.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state._replace(step=np.asarray(step, np.int32)),
              [{"0": {"pos": step}}])
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  restored, positions = ckpt.restore(state)
  assert int(restored.step) == 3 and positions == [{"0": {"pos": 3}}]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  np.testing.assert_array_equal(restored.rng, state.rng)
  ckpt.close()


def _event_scalars(logdir):
  """`(tag, step, value)` of every scalar in a TensorBoard event directory.

  Reads the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and
  parses each payload as an `Event` proto.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  (name,) = os.listdir(logdir)
  data = open(os.path.join(logdir, name), "rb").read()
  scalars, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    for value in event.summary.value:
      scalars.append((value.tag, event.step, value.simple_value))
    offset += 16 + length
  return scalars


def test_run_logger_writes_json_lines(tmp_path):
  logger = run_logging.RunLogger(str(tmp_path), enabled=True, total_steps=2,
                                 progress_bar=False, tensorboard=True)
  assert logger.start(0) == []
  logger.write(1, "train", {"loss": np.float32(1.5), "top1": 0.25})
  logger.write(2, "eval", {"top1": 0.5})
  logger.close()
  records = run_logging.read_metrics(str(tmp_path))
  assert [(r["step"], r["split"]) for r in records] == [(1, "train"),
                                                        (2, "eval")]
  assert records[0]["loss"] == 1.5
  assert _event_scalars(tmp_path / "tensorboard") == [
      ("train/loss", 1, 1.5), ("train/top1", 1, 0.25), ("eval/top1", 2, 0.5)]


def test_run_logger_ends_with_the_final_line_below_the_progress_bar(
    tmp_path, monkeypatch):
  terminal = io.StringIO()  # stdout and stderr, as one terminal shows them.
  monkeypatch.setattr(sys, "stdout", terminal)
  monkeypatch.setattr(sys, "stderr", terminal)
  logger = run_logging.RunLogger(str(tmp_path), enabled=True, total_steps=2,
                                 progress_bar=True, tensorboard=False)
  logger.start(0)
  logger.advance(2)
  logger.finish("final evaluation at step 2")
  logger.close()
  lines = terminal.getvalue().replace("\r", "\n").splitlines()
  assert "2/2" in "".join(lines)  # The bar was drawn ...
  assert lines[-1] == "final evaluation at step 2"  # ... and closed above.
