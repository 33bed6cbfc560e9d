"""Evaluation: top-1 / top-5 / loss over the whole eval split, all devices.

The eval step is a pmap that returns masked sums `psum`-ed over every device
of every host, so each host ends with the totals of the whole split; padding
examples (mask 0) count for nothing. Evaluation runs in float32.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import haiku as hk
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import compiler
from nfnets_jax.experiment import losses
from nfnets_jax.experiment import parallel

EvalStep = Callable[[hk.Params, hk.State, dict[str, jax.Array]],
                    dict[str, jax.Array]]


def make_eval_step(net: hk.TransformedWithState, loss_kind: str, *,
                   fast_compile: bool = False) -> EvalStep:
  """pmapped `(params, model_state, batch) -> summed metrics`.

  Compiled with the package's CPU compiler options (`cpu.compiler`), and
  without LLVM's expensive passes if `fast_compile`.

  Sums: `loss` (cross-entropy against the one-hot label, of the training
  loss kind), `top1`, `top5` (correct counts) and `count` (real examples).
  """

  def eval_step(params, model_state, batch):
    outputs, _ = net.apply(params, model_state, None, batch["images"],
                           is_training=False)
    logits = outputs["logits"].astype(jnp.float32)
    mask = batch["mask"]
    one_hot = jax.nn.one_hot(batch["labels"], logits.shape[-1])
    sums = {"loss": jnp.sum(losses.cross_entropy(logits, one_hot, loss_kind)
                            * mask),
            "count": jnp.sum(mask)}
    for name, correct in losses.topk_correct(logits, batch["labels"]).items():
      sums[name] = jnp.sum(correct * mask)
    return lax.psum(sums, parallel.AXIS)

  return compiler.Compiled(jax.pmap(eval_step, axis_name=parallel.AXIS),
                           fast=fast_compile)


def evaluate(eval_step: EvalStep, params: Any, model_state: Any,
             batches: Iterable[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Means over the split: `loss`, `top1`, `top5` (fractions), `count` (int).

  Args:
    eval_step: from `make_eval_step`.
    params, model_state: replicated over the local devices.
    batches: this host's eval batches (same count on every host).
    mesh: the local mesh.
  """
  totals = None
  for batch in batches:
    sums = eval_step(params, model_state, parallel.shard(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("the evaluation split gave no batches")
  totals = {k: float(v) for k, v in parallel.unreplicate(totals).items()}
  count = max(totals.pop("count"), 1.0)
  out = {k: v / count for k, v in totals.items()}
  out["count"] = int(count)
  return out
