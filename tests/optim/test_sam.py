"""SAM in the train step: the two-gradient rule against a NumPy
transcription, with AGC, weight decay and Nesterov momentum in the chain.

Rule (Foret et al., ICLR 2021, Algorithm 1), per step, on a device's shard
k of the batch and the weights w:
  g_k = grad L_k(w);  e = rho * g / ||g||  (g: a device's own g_k with
  per-device perturbations, the SAM paper's m-sharpness; the mean over
  devices with global ones);  G = mean_k grad L_k(w + e_k);
  then G goes through the optimizer as a plain gradient would: AGC (units
  clipped to lambda * max(||w_unit||, eps)), w += -lr * (d + mu * m) with
  d = G + wd * w (weights only), m <- mu * m + d.
"""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax.optim import agc
from nfnets_jax.optim import optimizers
import train_harness as testing

RHO, LAM, LR, WD, MU = 0.5, 0.4, 0.3, 1e-2, 0.9


def _data(seed=0, n=16, features=12, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features))
  y = rng.integers(0, classes, n)
  w = rng.normal(size=(features, classes)) * 0.3
  b = rng.normal(size=(classes,)) * 0.1
  return x, y, w, b


def np_grad(w, b, x, y):
  """Softmax cross-entropy of `x @ w + b`, mean over the batch: (dw, db)."""
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(w.shape[1])[y]) / len(x)
  return x.T @ d, d.sum(0)


def np_agc(g, w, eps=1e-3):
  """Columns of a kernel are units; a bias is one unit."""
  g = g.copy()
  units = [np.s_[:, j] for j in range(g.shape[1])] if g.ndim == 2 else [
      np.s_[:]]
  for u in units:
    cap = LAM * max(np.linalg.norm(w[u]), eps)
    norm = np.linalg.norm(g[u])
    if norm > cap:
      g[u] *= cap / norm
  return g


def np_sam_sgd(w, b, shards, steps, *, sync):
  """`steps` SAM steps over the same `[(x, y) per device]` shards."""
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  for _ in range(steps):
    grads = [np_grad(w, b, x, y) for x, y in shards]
    if sync:
      mean = [np.mean(g, 0) for g in zip(*grads)]
      grads = [mean] * len(shards)
    perturbed = []
    for (gw, gb), (x, y) in zip(grads, shards):
      norm = np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2))
      perturbed.append(np_grad(w + RHO * gw / norm, b + RHO * gb / norm,
                               x, y))
    gw, gb = (np.mean(g, 0) for g in zip(*perturbed))
    dw = np_agc(gw, w) + WD * w
    db = np_agc(gb, b)
    mw, mb = MU * mw + dw, MU * mb + db
    w, b = w - LR * (dw + MU * mw), b - LR * (db + MU * mb)
  return w, b


def sam_tx(mask):
  return optimizers.with_sam(optax.chain(
      agc.adaptive_grad_clip(LAM, 1e-3),
      optimizers.sgd(LR, weight_decay=WD, weight_decay_mask=mask,
                     momentum=MU, nesterov=True)), RHO)


def test_two_sam_steps_are_the_two_gradient_rule():
  x, y, w, b = _data()
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  tx = sam_tx({"w": True, "b": False})

  def loss(p):
    logits = jnp.asarray(x, jnp.float32) @ p["w"] + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(y)))

  @jax.jit
  def step(p, state):
    g = jax.grad(loss)(p)
    updates, state = tx.update(g, state, p,
                               grad_fn=lambda q, _: jax.grad(loss)(q))
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state)
  want_w, want_b = np_sam_sgd(w, b, [(x, y)], 2, sync=True)
  np.testing.assert_allclose(params["w"], want_w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(params["b"], want_b, rtol=2e-5, atol=2e-6)
  # The test means something: AGC clipped some units and not others, and
  # SAM differs from plain SGD at these settings.
  gw, gb = np_grad(w, b, x, y)
  norm = np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2))
  perturbed_gw, _ = np_grad(w + RHO * gw / norm, b + RHO * gb / norm, x, y)
  caps = LAM * np.maximum(np.linalg.norm(w, axis=0), 1e-3)
  assert 0 < np.sum(np.linalg.norm(perturbed_gw, axis=0) > caps) < w.shape[1]
  plain_w = w - LR * (np_agc(gw, w) + WD * w) * (1 + MU)
  assert np.abs(plain_w - np_sam_sgd(w, b, [(x, y)], 1, sync=True)[0]
                ).max() > 1e-3


# The package's pmapped train step on 4 devices with a Haiku linear model,
# per-device and global perturbations, 2 steps each.
_SCRIPT = textwrap.dedent("""
    import json, types
    import haiku as hk, jax, numpy as np, optax
    from nfnets_jax.experiment import parallel, train_state as ts
    from nfnets_jax.optim import agc, optimizers
    import sys; sys.path[:0] = ["tests", "tests/optim"]
    from test_sam import _data, sam_tx

    x, y, w, b = _data()
    images = x.reshape(16, 2, 2, 3).astype(np.float32)
    net = hk.transform_with_state(lambda images, is_training: {
        "logits": hk.Linear(3)(images.reshape(images.shape[0], -1))})
    config = types.SimpleNamespace(compute_dtype="float32",
                                   label_smoothing=0.0, loss="softmax",
                                   ema_decay=None, ema_warmup=True,
                                   accumulation_steps=1)
    tx = sam_tx({"linear": {"w": True, "b": False}})
    mesh = parallel.local_mesh()
    batch = parallel.shard({"images": images, "labels": y.astype(np.int32),
                            "soft_labels": np.eye(3, dtype=np.float32)[y]},
                           mesh)
    out = {}
    for mode in (optimizers.PER_DEVICE, optimizers.GLOBAL):
      step = ts.make_train_step(net, tx, lambda s: 0.0, config,
                                sam_perturbation=mode)
      state = ts.init_train_state(net, tx, seed=0, image_size=2,
                                  use_ema=False,
                                  params={"linear": {"w": w, "b": b}})
      state = parallel.replicate(jax.tree.map(
          lambda a: np.asarray(a, np.float32) if a.dtype == np.float64
          else a, state), mesh)
      for _ in range(2):
        state, metrics = step(state, batch)
      p = parallel.unreplicate(state.params)["linear"]
      out[mode] = {k: np.asarray(v).tolist() for k, v in p.items()}
      out[mode]["finite"] = bool(np.asarray(metrics["finite"]).all())
    print(json.dumps(out))
""")


def test_four_devices_perturb_per_device_or_globally_as_documented():
  out = testing.run_script(_SCRIPT, devices=4)
  x, y, w, b = _data()
  shards = [(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(4)]
  results = {}
  for mode, sync in ((optimizers.PER_DEVICE, False),
                     (optimizers.GLOBAL, True)):
    assert out[mode]["finite"]
    want_w, want_b = np_sam_sgd(w, b, shards, 2, sync=sync)
    np.testing.assert_allclose(out[mode]["w"], want_w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out[mode]["b"], want_b, rtol=2e-5, atol=2e-6)
    results[mode] = np.asarray(out[mode]["w"])
  # The two semantics are different rules here (not rounding apart).
  assert np.abs(results[optimizers.PER_DEVICE]
                - results[optimizers.GLOBAL]).max() > 1e-4


def test_sam_settings_from_the_config():
  from nfnets_jax.experiment import config_schema  # pylint: disable=g-import-not-at-top
  o = config_schema.base_config().optimizer
  assert optimizers.sam_perturbation(o) is None
  o.sam.rho = 0.05
  assert optimizers.sam_perturbation(o) == optimizers.PER_DEVICE
  o.sam.sync_perturbations = True
  assert optimizers.sam_perturbation(o) == optimizers.GLOBAL
  tx, _ = optimizers.make_optimizer(o, batch_size=256, steps_per_epoch=10,
                                    total_epochs=1.0)
  state = tx.init({"NFNet/~/conv": {"w": jnp.zeros((3, 3, 2, 2))},
                   "NFNet/~/linear": {"w": jnp.zeros((2, 2))}})
  assert isinstance(state, optax.contrib.SAMState)
  o.sam.rho = -0.1
  try:
    optimizers.make_optimizer(o, batch_size=256, steps_per_epoch=10,
                              total_epochs=1.0)
  except ValueError as err:
    assert "config.optimizer.sam.rho" in str(err) and "-0.1" in str(err)
  else:
    raise AssertionError("a negative rho was accepted")
