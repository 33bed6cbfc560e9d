"""Tests for nfnets_jax.optim against NumPy transcriptions of the release.

The references below restate, in NumPy, the update rules of the official
release's `optim.py` (SGD, SGD_AGC, Adam, RMSProp, Fromage), its parameter
groups (`experiment_nfnets.py`) and its schedules (`WarmupCosineDecay`,
`WarmupExpDecay`).
"""

import math

import haiku as hk
import jax
import ml_collections
import numpy as np
import optax
import pytest

from nfnets_jax.optim import agc
from nfnets_jax.optim import optimizers as optim


def nfnet_like_params(top="NFNet", seed=0):
  """A tiny tree with the release's NFNet parameter names and layouts."""
  rng = np.random.default_rng(seed)
  shapes = {
      f"{top}/~/stem_conv0": {"w": (3, 3, 3, 4), "gain": (4,), "bias": (4,)},
      f"{top}/~/nf_block/~/conv0": {"w": (1, 1, 4, 4), "gain": (4,),
                                    "bias": (4,)},
      f"{top}/~/nf_block/~/squeeze_excite/~/linear": {"w": (4, 2), "b": (2,)},
      f"{top}/~/nf_block/~/squeeze_excite/~/linear_1": {"w": (2, 4),
                                                        "b": (4,)},
      f"{top}/~/nf_block": {"skip_gain": ()},
      f"{top}/~/final_conv": {"w": (1, 1, 4, 6), "gain": (6,), "bias": (6,)},
      f"{top}/~/linear": {"w": (6, 5), "b": (5,)},
  }
  return {m: {n: np.asarray(rng.normal(size=s), np.float32)
              for n, s in d.items()} for m, d in shapes.items()}


def small_params(seed=0):
  """Five leaves: a conv with gain and bias, a skip gain, the classifier."""
  full = nfnet_like_params(seed=seed)
  return {k: full[k] for k in ("NFNet/~/stem_conv0", "NFNet/~/nf_block",
                               "NFNet/~/linear")}


def random_grads(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: np.asarray(rng.normal(size=p.shape) * scale, np.float32),
      params)


# The release's partition predicates (experiment_nfnets.py), restated.
def official_is_gain_or_bias(module, name):
  del module
  return name in ("scale", "offset", "b") or "gain" in name or "bias" in name


def official_is_classifier(module, name):
  return (not official_is_gain_or_bias(module, name) and "linear" in module
          and "squeeze_excite" not in module)


def _map(fn, *trees):
  """Maps fn(module, name, *leaves) over two-level param dicts."""
  return {m: {n: fn(m, n, *(t[m][n] for t in trees)) for n in trees[0][m]}
          for m in trees[0]}


def np_unitwise_norm(x):
  x = np.float64(x)
  axes = None if x.ndim <= 1 else tuple(range(x.ndim - 1))
  return np.sqrt(np.sum(x**2, axis=axes, keepdims=True))


def np_clip(g, p, clipping, eps):
  max_norm = clipping * np.maximum(np_unitwise_norm(p), eps)
  g_norm = np_unitwise_norm(g)
  return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)


# Per-leaf update rules of the release's optim.py, restated. Each takes
# (param, grad, state dict, hyperparameters) and returns the new param.
def np_sgd(p, g, s, lr, wd, momentum, nesterov, clipping=None, eps=1e-3):
  if clipping is not None:
    g = np_clip(g, p, clipping, eps)
  if wd is not None:
    g = g + wd * p
  if momentum is not None:
    s["m"] = momentum * s.get("m", 0.0) + g
    g = g + momentum * s["m"] if nesterov else s["m"]
  return p - lr * g


def np_adam(p, g, s, lr, wd, beta1, beta2, eps, use_adamw):
  s["t"] = s.get("t", 0) + 1
  if wd is not None:
    if use_adamw:
      p = p * (1 - lr * wd)
    else:
      g = g + wd * p
  s["m"] = beta1 * s.get("m", 0.0) + (1 - beta1) * g
  s["v"] = beta2 * s.get("v", 0.0) + (1 - beta2) * g * g
  step = lr * s["m"] / (1 - beta1 ** s["t"])
  denom = np.sqrt(s["v"]) / np.sqrt(1 - beta2 ** s["t"]) + eps
  return p - step / denom


def np_rmsprop(p, g, s, lr, wd, decay, momentum, eps):
  if wd is not None:
    g = g + wd * p
  s["rms"] = decay * s.get("rms", 1.0) + (1 - decay) * g**2
  step = lr * g / np.sqrt(s["rms"] + eps)
  if momentum is not None:
    s["m"] = momentum * s.get("m", 0.0) + step
    step = s["m"]
  return p - step


def np_fromage(p, g, s, lr, wd, eps):
  del s
  if wd is not None:
    g = g + wd * p
  g_norm = max(np.linalg.norm(np.ravel(g)), eps)
  p_norm = max(np.linalg.norm(np.ravel(p)), eps)
  return (p - lr * g * p_norm / g_norm) / math.sqrt(1 + lr**2)


def run_optax(tx, params, grads_seq):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params


def _apply(tx, p, s, g):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s


def run_reference(rule, params, grads_seq, wd, lrs, clip=False, **hyper):
  """Runs `rule` per leaf with the release's weight-decay/AGC groups."""
  params = jax.tree.map(np.float64, params)
  states = _map(lambda m, n, p: {}, params)
  for lr, grads in zip(lrs, grads_seq):
    def leaf(m, n, p, g):
      kw = dict(hyper)
      if clip:
        kw["clipping"] = None if official_is_classifier(m, n) else clip
      return rule(p, np.float64(g), states[m][n], lr,
                  None if official_is_gain_or_bias(m, n) else wd, **kw)
    params = _map(leaf, params, grads)
  return params


def assert_trees_close(got, want, rtol):
  for m in want:
    for n in want[m]:
      np.testing.assert_allclose(got[m][n], want[m][n], rtol=rtol,
                                 atol=rtol * 0.1, err_msg=f"{m}/{n}")


# --- parameter groups ---------------------------------------------------------


@pytest.mark.parametrize("top", ["NFNet", "NFResNet", "NFRegNet", "ResNet"])
def test_masks_reproduce_release_groups(top):
  params = nfnet_like_params(top)
  params[f"{top}/~/bn"] = {"scale": np.ones(3), "offset": np.zeros(3)}
  wd = optim.weight_decay_mask(params)
  clip = optim.agc_mask(params)
  assert wd == _map(lambda m, n, _: not official_is_gain_or_bias(m, n), params)
  assert clip == _map(lambda m, n, _: not official_is_classifier(m, n), params)
  # Exactly one parameter escapes AGC: the classifier weight.
  assert [k for k, v in jax.tree_util.tree_leaves_with_path(clip) if not v
         ] == [(jax.tree_util.DictKey(f"{top}/~/linear"),
                jax.tree_util.DictKey("w"))]
  assert clip[f"{top}/~/linear"]["b"]
  assert clip[f"{top}/~/nf_block"]["skip_gain"]
  assert clip[f"{top}/~/nf_block/~/squeeze_excite/~/linear"]["w"]
  assert wd[f"{top}/~/linear"]["w"]
  assert not wd[f"{top}/~/nf_block"]["skip_gain"]


def test_agc_mask_on_haiku_names():
  # Haiku names a Linear built in __init__ `Net/~/linear`, one built in
  # __call__ `net/linear`; both are the top-level module's classifier.
  class Net(hk.Module):

    def __init__(self):
      super().__init__()
      self.fc = hk.Linear(3)

    def __call__(self, x):
      return self.fc(jax.nn.relu(hk.Conv1D(4, 3)(x)))

  class CallNet(hk.Module):

    def __call__(self, x):
      return hk.Linear(3)(jax.nn.relu(hk.Conv1D(4, 3)(x)))

  class TwoLinearNet(Net):

    def __call__(self, x):
      return self.fc(hk.Linear(4)(x))

  init = lambda m: hk.transform(lambda x: m()(x)).init(
      jax.random.PRNGKey(0), np.ones((1, 5, 2), np.float32))
  for module, classifier in ((Net, "net/~/linear"),
                             (CallNet, "call_net/linear")):
    params = init(module)
    assert optim.find_classifier(params) == classifier
    mask = optim.agc_mask(params)
    assert [n for n, v in jax.tree_util.tree_leaves_with_path(mask)
            if not v] == [(jax.tree_util.DictKey(classifier),
                           jax.tree_util.DictKey("w"))]
  # `two_linear_net/~/linear` and `two_linear_net/linear`: ambiguous.
  with pytest.raises(ValueError, match="found \\['two_linear_net/linear', "
                     "'two_linear_net/~/linear'\\]"):
    optim.find_classifier(init(TwoLinearNet))


def test_agc_mask_classifier_rule():
  params = nfnet_like_params()
  assert optim.find_classifier(params) == "NFNet/~/linear"
  mask = optim.agc_mask(params, classifier_module="NFNet/~/final_conv")
  assert not mask["NFNet/~/final_conv"]["w"]
  assert mask["NFNet/~/linear"]["w"]
  # Nested linears are never the classifier.
  del params["NFNet/~/linear"]
  with pytest.raises(ValueError, match="found none"):
    optim.agc_mask(params)
  # With linear_1 beside it, linear may not be the last layer.
  params["Net/~/linear"] = {"w": np.ones((2, 2))}
  params["Net/~/linear_1"] = {"w": np.ones((2, 2))}
  with pytest.raises(ValueError, match="siblings \\['Net/~/linear_1'\\]"):
    optim.agc_mask(params)
  assert not optim.agc_mask(
      params, classifier_module="Net/~/linear_1")["Net/~/linear_1"]["w"]
  with pytest.raises(ValueError, match="no parameter 'Net/~/head/w'"):
    optim.agc_mask(params, classifier_module="Net/~/head")


# --- optimizers ---------------------------------------------------------------

_STEPS = 3


@pytest.mark.parametrize("name, kwargs, rule, ref_kwargs", [
    ("sgd", {}, np_sgd, dict(momentum=0.9, nesterov=True)),
    ("sgd", dict(momentum=0.5, nesterov=False), np_sgd,
     dict(momentum=0.5, nesterov=False)),
    ("sgd", dict(momentum=None), np_sgd, dict(momentum=None, nesterov=False)),
    ("adam", {}, np_adam,
     dict(beta1=0.9, beta2=0.999, eps=1e-8, use_adamw=False)),
    ("adam", dict(beta1=None, beta2=0.99), np_adam,
     dict(beta1=0.0, beta2=0.99, eps=1e-8, use_adamw=False)),
    ("adamw", dict(eps=1e-6), np_adam,
     dict(beta1=0.9, beta2=0.999, eps=1e-6, use_adamw=True)),
    ("rmsprop", dict(decay=0.9, momentum=0.9), np_rmsprop,
     dict(decay=0.9, momentum=0.9, eps=1e-8)),
    ("rmsprop", dict(decay=0.99), np_rmsprop,
     dict(decay=0.99, momentum=None, eps=1e-8)),
    ("fromage", {}, np_fromage, dict(eps=1e-5)),
])
def test_optimizers_match_release(name, kwargs, rule, ref_kwargs):
  params = nfnet_like_params(seed=1)
  grads_seq = [random_grads(params, s) for s in range(_STEPS)]
  lr, wd = 0.05, 0.1
  tx = optim.OPTIMIZERS[name](lr, weight_decay=wd, **kwargs)
  got = run_optax(tx, params, grads_seq)
  want = run_reference(rule, params, grads_seq, wd, [lr] * _STEPS,
                       **ref_kwargs)
  assert_trees_close(got, want, rtol=2e-5)


def test_sgd_dampening():
  params = nfnet_like_params(seed=2)
  grads_seq = [random_grads(params, s) for s in range(_STEPS)]
  got = run_optax(optim.sgd(0.1, momentum=0.9, nesterov=False, dampening=0.5),
                  params, grads_seq)
  # Dampening 0.5 on every gradient == halved gradients, no weight decay.
  want = run_optax(optim.sgd(0.1, momentum=0.9, nesterov=False), params,
                   [jax.tree.map(lambda g: g / 2, gs) for gs in grads_seq])
  assert_trees_close(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="dampening must be 0 with nesterov"):
    optim.sgd(0.1, nesterov=True, dampening=0.5)


# --- schedules ----------------------------------------------------------------


def official_warmup_cosine(itr, max_val, min_val, num_steps, warmup_steps):
  if itr <= warmup_steps:
    return max_val * itr / warmup_steps
  frac = (itr - warmup_steps) / (num_steps - warmup_steps)
  return 0.5 * (max_val - min_val) * (1 + math.cos(math.pi * frac)) + min_val


def official_warmup_exp(itr, max_val, warmup_steps, factor, interval):
  if itr <= warmup_steps:
    return max_val * itr / warmup_steps
  return max_val * factor ** math.floor((itr - warmup_steps) / interval)


def test_cosine_schedule_matches_release():
  # ImageNet at batch 4096: peak 0.1 * 4096 / 256 = 1.6; a fractional warmup
  # of 5 epochs x 312.5 steps would be 1562.5 steps; here scaled down:
  # 10 steps/epoch, 0.55 epochs of warmup = 5.5 steps, 3 epochs.
  sched = optim.make_schedule(base_lr=0.1, batch_size=4096, warmup_epochs=0.55,
                              total_epochs=3, steps_per_epoch=10,
                              end_lr_factor=0.01)
  got = [float(sched(i)) for i in range(31)]
  want = [official_warmup_cosine(i, 1.6, 0.016, 30, 5.5) for i in range(31)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[0] == 0.0 and got[-1] == pytest.approx(0.016)
  # Held at the end value afterwards.
  assert float(sched(100)) == pytest.approx(0.016)


def test_peak_is_linear_in_batch_size():
  for batch in (256, 1024, 4096):
    sched = optim.make_schedule(base_lr=0.1, batch_size=batch,
                                warmup_epochs=1, total_epochs=10,
                                steps_per_epoch=4, schedule="constant")
    assert float(sched(4)) == pytest.approx(0.1 * batch / 256)
    assert float(sched(39)) == pytest.approx(0.1 * batch / 256)
    assert float(sched(2)) == pytest.approx(0.05 * batch / 256)


def test_exponential_schedule_matches_release():
  sched = optim.make_schedule(base_lr=0.4, batch_size=1024,
                              base_batch_size=1024, warmup_epochs=1,
                              total_epochs=10, steps_per_epoch=10,
                              schedule="exponential", decay_factor=0.5,
                              decay_epochs=2.5)
  got = [float(sched(i)) for i in range(100)]
  want = [official_warmup_exp(i, 0.4, 10, 0.5, 25) for i in range(100)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_no_warmup_is_plain_cosine():
  sched = optim.make_schedule(base_lr=0.1, batch_size=256, warmup_epochs=0,
                              total_epochs=1, steps_per_epoch=8)
  np.testing.assert_allclose([float(sched(i)) for i in range(9)],
                             [0.05 * (1 + math.cos(math.pi * i / 8))
                              for i in range(9)], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear"), "schedule='linear' is not a known schedule; "
     "allowed: 'cosine', 'constant', 'exponential'"),
    (dict(base_lr=-0.1), "base_lr must be > 0, got -0.1"),
    (dict(batch_size=0), "batch_size must be > 0"),
    (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    (dict(warmup_epochs=10), "total_epochs must be > warmup_epochs"),
    (dict(steps_per_epoch=2.5), "steps_per_epoch must be an int > 0"),
    (dict(end_lr_factor=2.0), "end_lr_factor must be in \\[0, 1\\]"),
    (dict(schedule="exponential"), "decay_factor must be in \\(0, 1\\]"),
])
def test_schedule_errors(kwargs, match):
  args = dict(base_lr=0.1, batch_size=256, warmup_epochs=1, total_epochs=10,
              steps_per_epoch=5)
  with pytest.raises(ValueError, match=match):
    optim.make_schedule(**{**args, **kwargs})


# --- the recipe from a config -------------------------------------------------


def nfnet_config(**overrides):
  cfg = dict(
      name="sgd",
      kwargs={"momentum": 0.9, "nesterov": True},
      weight_decay=2e-5,
      agc=dict(clipping=0.01, eps=1e-3),
      lr=dict(base_lr=0.1, base_batch_size=256, warmup_epochs=1.0,
              schedule="cosine", end_lr_factor=0.0),
      track_clip_stats=True,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize("name", ["sgd", "sgd_agc"])
def test_nfnet_recipe_matches_release_sgd_agc(name):
  # The release: SGD_AGC(momentum 0.9, nesterov, wd 2e-5, clipping 0.01,
  # eps 1e-3) with groups {gains/biases: no wd}, {classifier w: no clip},
  # lr WarmupCosineDecay(max=0.1 * B / 256). Gradients are large enough that
  # AGC clips most units; weight decay is raised to make it visible.
  params = nfnet_like_params(seed=3)
  grads_seq = [random_grads(params, s, scale=10.0) for s in range(5)]
  tx, sched = optim.make_optimizer(
      nfnet_config(name=name, weight_decay=0.01), batch_size=512,
      steps_per_epoch=2, total_epochs=4, params=params)
  got = run_optax(tx, params, grads_seq)
  lrs = [official_warmup_cosine(i, 0.2, 0.0, 8, 2) for i in range(5)]
  np.testing.assert_allclose([float(sched(i)) for i in range(5)], lrs,
                             rtol=1e-6)
  want = run_reference(np_sgd, params, grads_seq, 0.01, lrs, clip=0.01,
                       momentum=0.9, nesterov=True)
  assert_trees_close(got, want, rtol=2e-5)
  # Without the classifier exemption the result would differ.
  w = "NFNet/~/linear"
  assert not np.allclose(np_clip(grads_seq[1][w]["w"], params[w]["w"], 0.01,
                                 1e-3), grads_seq[1][w]["w"])


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_from_config(name):
  params = small_params(seed=4)
  grads = random_grads(params, 0)
  tx, _ = optim.make_optimizer(nfnet_config(name=name, kwargs={}),
                               batch_size=256, steps_per_epoch=2,
                               total_epochs=3)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
  for _ in range(2):  # the first step has lr 0 (warmup from 0)
    new, state = step(params, state, grads)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.all(np.isfinite(b)) and not np.array_equal(a, b)
  stats = agc.clip_stats(state)
  assert 0 < float(stats["agc_clip_frac"]) <= 1
  assert "agc_clip_frac/NFNet/~/linear/w" not in stats
  assert "agc_clip_frac/NFNet/~/linear/b" in stats


def test_agc_disabled():
  params = small_params(seed=5)
  grads_seq = [random_grads(params, s) for s in range(2)]
  want = run_optax(optim.sgd(0.1, weight_decay=2e-5), params, grads_seq)
  for clipping in (None, 0.0):
    tx, _ = optim.make_optimizer(
        nfnet_config(agc=dict(clipping=clipping, eps=1e-3),
                     lr=dict(base_lr=0.1, warmup_epochs=0,
                             schedule="constant")),
        batch_size=256, steps_per_epoch=1, total_epochs=2)
    assert_trees_close(run_optax(tx, params, grads_seq), want, rtol=1e-6)
    assert agc.clip_stats(tx.init(params)) == {}


@pytest.mark.parametrize("overrides, match", [
    (dict(name="lars"), "config.optimizer.name='lars' is not a known "
     "optimizer; allowed: 'adam', 'adamw', 'fromage', 'rmsprop', 'sgd', "
     "'sgd_agc'"),
    (dict(kwargs={"betas": (0.9, 0.99)}), "config.optimizer.kwargs has "
     "\\['betas'\\] not accepted by 'sgd'"),
    (dict(kwargs={"momentum": 1.5}), "config.optimizer.kwargs: momentum must "
     "be in \\[0, 1\\)"),
    (dict(weight_decay=-1e-5), "config.optimizer.weight_decay must be >= 0"),
    (dict(agc=dict(clipping=-0.01)), "config.optimizer.agc.clipping must be "
     ">= 0"),
    (dict(agc=dict(clipping=0.01, eps=-1.0)), "config.optimizer.agc.eps"),
    (dict(name="sgd_agc", agc=dict(clipping=None)), "needs "
     "config.optimizer.agc.clipping > 0"),
    (dict(lr=dict(base_lr=-0.1)), "config.optimizer.lr.base_lr must be > 0, "
     "got -0.1"),
    (dict(lr=dict(base_lr=0.1, schedule="step")),
     "config.optimizer.lr.schedule='step' is not a known schedule; allowed: "
     "'cosine', 'constant', 'exponential'"),
    (dict(lr=dict(warmup_epochs=1)), "config.optimizer.lr.base_lr is "
     "required"),
])
def test_make_optimizer_errors(overrides, match):
  cfg = nfnet_config(**overrides)
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(cfg, batch_size=256, steps_per_epoch=5,
                         total_epochs=10)


def test_make_optimizer_checks_mask_early_when_given_params():
  params = {"mlp/~/linear_1": {"w": np.ones((2, 2))}}
  with pytest.raises(ValueError, match="Cannot tell the classifier"):
    optim.make_optimizer(nfnet_config(), batch_size=256, steps_per_epoch=5,
                         total_epochs=10, params=params)
  cfg = nfnet_config(agc=dict(clipping=0.01,
                              classifier_module="mlp/~/linear_1"))
  tx, _ = optim.make_optimizer(cfg, batch_size=256, steps_per_epoch=5,
                               total_epochs=10, params=params)
  assert agc.clip_stats(tx.init(params)) == {"agc_clip_frac": 0.0}


def test_readme_example():
  # The README's "AGC in your own optax chain" snippet, with module imports.
  params = small_params(seed=6)
  grads = random_grads(params, 1)
  clip = optax.masked(agc.adaptive_grad_clip(0.01, track_clip_stats=True),
                      optim.agc_mask)
  tx = optax.chain(clip, optax.add_decayed_weights(2e-5,
                                                   optim.weight_decay_mask),
                   optax.sgd(learning_rate=0.1, momentum=0.9, nesterov=True))
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics = agc.clip_stats(opt_state)
  want = run_optax(optim.sgd(0.1, weight_decay=2e-5), params, [
      _map(lambda m, n, g, p: g if (m, n) == ("NFNet/~/linear", "w")
           else np_clip(g, p, 0.01, 1e-3), grads, params)])
  assert_trees_close(optax.apply_updates(params, updates), want, rtol=1e-5)
  assert 0 < float(metrics["agc_clip_frac"]) <= 1
