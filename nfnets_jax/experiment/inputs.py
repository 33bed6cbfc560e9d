"""The loop's view of the data: per-process training stream and eval passes.

The training data is cut into `num_shards` shards (default: one per process).
Each process reads its shards and concatenates their batches, so the global
batch of a step is the same whatever the number of processes, and so is the
data position saved with a checkpoint (one grain state per shard).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import logging
from typing import Any

import ml_collections
import numpy as np

from nfnets_jax import data as data_lib
from nfnets_jax.experiment.config_validation import RunSpec

Batch = dict[str, np.ndarray]


def augment_config(train_config: Any) -> ml_collections.ConfigDict:
  """`config.train.augment` in the form `data.load` takes."""
  a = train_config.augment
  randaugment = None
  if a.randaugment_layers > 0:
    randaugment = {"num_layers": int(a.randaugment_layers),
                   "magnitude": float(a.randaugment_magnitude),
                   "mode": str(a.randaugment_mode)}
  return ml_collections.ConfigDict({
      "random_crop": bool(a.random_crop), "flip": bool(a.flip),
      "randaugment": randaugment, "mixup_alpha": float(a.mixup_alpha),
      "cutmix_alpha": float(a.cutmix_alpha), "on_device": bool(a.on_device)})


class TrainStream:
  """Endless host batches of this process's shards, with their position.

  Iterating yields `(batch, position)` where `position` (one grain state per
  shard, in shard order) is the data position right after this batch: save
  it with the state of the step that consumed the batch.
  """

  def __init__(self, config: Any, spec: RunSpec,
               positions: dict[int, Any] | None = None):
    d = config.dataset
    self.shards = spec.shards
    self._iterators = [
        data_lib.load(
            data_lib.Split.from_string(d.train_split), dataset=d.name,
            batch_size=spec.shard_batch_size,
            image_size=config.train.image_size, is_training=True,
            seed=config.seed, shard_index=shard, shard_count=spec.num_shards,
            augment=augment_config(config.train),
            eval_crop_padding=config.eval.crop_padding,
            num_workers=d.num_workers, data_dir=d.data_dir)
        for shard in self.shards]
    if positions:
      for shard, it in zip(self.shards, self._iterators):
        it.set_state(positions[shard])

  def __iter__(self) -> Iterator[tuple[Batch, dict[int, Any]]]:
    while True:
      parts = [next(it) for it in self._iterators]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      yield batch, {shard: it.get_state()
                    for shard, it in zip(self.shards, self._iterators)}


def positions_from_checkpoint(saved: Sequence[Any], num_shards: int
                              ) -> dict[int, Any] | None:
  """Shard -> grain state from a checkpoint's per-process positions.

  Returns None (start the data afresh, with a warning) when the checkpoint
  was written with a different number of shards.
  """
  merged = {}
  for process_positions in saved:
    merged.update({int(k): v for k, v in process_positions.items()})
  if sorted(merged) != list(range(num_shards)):
    logging.warning(
        "data position not restored: the checkpoint has shards %s, this run "
        "reads %d (set config.dataset.num_shards to keep the data stream "
        "across host counts); the data restarts from its first batch",
        sorted(merged), num_shards)
    return None
  return merged


def eval_batches(config: Any, spec: RunSpec, process_index: int,
                 process_count: int) -> Iterator[Batch]:
  """One ordered pass over this process's part of the eval split.

  Every process yields the same number of batches (padding has mask 0).
  """
  d, e = config.dataset, config.eval
  return data_lib.load(
      data_lib.Split.from_string(d.eval_split), dataset=d.name,
      batch_size=spec.eval_host_batch_size, image_size=e.image_size,
      is_training=False, seed=config.seed, shard_index=process_index,
      shard_count=process_count, eval_crop_padding=e.crop_padding,
      num_workers=0, data_dir=d.data_dir)
