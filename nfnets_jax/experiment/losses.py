"""Classification losses and top-k accuracy, as the NFNet experiments use them.

The official release (`nfnets/experiment.py`) smooths the (possibly
MixUp/CutMix-mixed) one-hot targets as `(1 - s) * y + s / num_classes` and
trains with softmax or sigmoid cross-entropy, averaged over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax", "sigmoid")


def smooth_labels(targets: jax.Array, smoothing: float) -> jax.Array:
  """Label smoothing of soft targets `[B, C]` (official formula)."""
  if smoothing <= 0.0:
    return targets
  num_classes = targets.shape[-1]
  return (1.0 - smoothing) * targets + smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array, kind: str
                  ) -> jax.Array:
  """Per-example cross-entropy `[B]` of float32 logits against soft targets.

  Args:
    logits: `[B, C]`.
    targets: `[B, C]` probabilities (soft labels).
    kind: 'softmax' (categorical) or 'sigmoid' (one binary loss per class,
      summed over classes).
  """
  logits = logits.astype(jnp.float32)
  if kind == "softmax":
    return optax.softmax_cross_entropy(logits, targets)
  if kind == "sigmoid":
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
  raise ValueError(f"config.train.loss={kind!r} is unknown; allowed: "
                   f"{list(LOSSES)}")


def topk_correct(logits: jax.Array, labels: jax.Array,
                 ks: tuple[int, ...] = (1, 5)) -> dict[str, jax.Array]:
  """Per-example 0/1 float32 indicators `top{k}` that `labels` is in the top k.

  `k` is capped at the number of classes (top-5 of a 3-class problem is 1).
  The label is in the top k when fewer than k logits are strictly larger
  (a tie with the label does not push it out).
  """
  num_classes = logits.shape[-1]
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  num_greater = jnp.sum(logits > label_logit, axis=-1)
  return {f"top{k}": (num_greater < min(k, num_classes)).astype(jnp.float32)
          for k in ks}
