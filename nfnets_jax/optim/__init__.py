"""Adaptive Gradient Clipping and the papers' optimizers, as optax chains.

- `agc`: `adaptive_grad_clip`, an optax transformation for any params tree.
- `optimizers`: the release's optimizers and schedules (`make_optimizer`),
  and the parameter groups that get AGC and weight decay.
"""
