"""The NFNet papers' optimizers and learning-rate schedules as optax chains.

Everything here is built from optax parts; nothing keeps its own update loop.
It reproduces the official release (deepmind-research/nfnets: `optim.py`,
`experiment.py`, `experiment_nfnets.py`):

* `OPTIMIZERS` maps a lower-case name to a builder, one per optimizer of the
  release's `optim.py`: 'sgd' (SGD), 'sgd_agc' (SGD_AGC), 'adam' (Adam),
  'adamw' (Adam with `use_adamw`), 'rmsprop' (RMSProp), 'fromage' (Fromage).
  The release's `Hybrid` (different optimizers for parameter groups) is
  `optax.multi_transform` and has no single-name entry.
* `agc_mask` / `weight_decay_mask` are the release's parameter groups:
  AGC everywhere but the classifier weight, weight decay everywhere but gains
  and biases.
* `make_schedule` is the release's `WarmupCosineDecay` (and
  `WarmupExpDecay`) with the learning rate scaled by batch size.
* `make_optimizer` builds the whole recipe from a config: AGC on the raw
  gradient, then weight decay, then the optimizer.

Reference: Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image
Recognition Without Normalization", ICML 2021 (arXiv:2102.06171), Section 5
and Appendix: SGD with Nesterov momentum 0.9, weight decay 2e-5, AGC with
clipping 0.01 on all but the classifier, learning rate 0.1 x batch / 256 with
5 epochs of linear warmup then cosine decay to zero.
"""

from collections.abc import Callable, Mapping
import inspect
import numbers
import re
from typing import Any, Optional, Union

import jax
import ml_collections
import optax

from nfnets_jax.optim import agc as agc_lib

Params = Mapping[str, Mapping[str, Any]]
Mask = Union[Any, Callable[[Any], Any]]

# Parameter names the release exempts from weight decay: BatchNorm/LayerNorm
# `scale`/`offset`, Linear `b`, and anything named like a gain or a bias
# (WSConv2D `gain`/`bias`, NF block `skip_gain`).
_NO_DECAY_NAMES = frozenset({"scale", "offset", "b"})
# A direct child `linear` of a top-level module: `Net/~/linear` when built in
# the parent's __init__ (the release's models), `Net/linear` in its __call__.
_CLASSIFIER_RE = re.compile(r"[^/]+/(~/)?linear")
_NUMBERED_LINEAR_RE = re.compile(r"([^/]+)/(~/)?linear_\d+")


def _split_path(path: tuple[Any, ...]) -> tuple[str, str]:
  """(module name, parameter name) of a leaf path in a Haiku params tree."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
          for k in path]
  return "/".join(keys[:-1]), keys[-1]


def weight_decay_mask(params: Params) -> Any:
  """Which parameters get weight decay, exactly as the official release.

  Weight decay applies to weights only: parameters named `scale`, `offset` or
  `b`, or whose name contains `gain` or `bias` (so `gain`, `bias`,
  `skip_gain`), get none. The classifier weight does get weight decay.

  Args:
    params: a Haiku params tree `{module_name: {param_name: array}}` (any
      pytree whose leaf paths end in the parameter name works).

  Returns:
    A tree like `params` of Python bools, True where weight decay applies.
  """
  def decays(path, _):
    _, name = _split_path(path)
    return not (name in _NO_DECAY_NAMES or "gain" in name or "bias" in name)
  return jax.tree_util.tree_map_with_path(decays, params)


def find_classifier(params: Params) -> str:
  """Module name of the network's classifier: the top-level `linear`.

  The rule: the classifier is the module named `<top>/~/linear` (or
  `<top>/linear`, Haiku's name for a Linear built in `__call__`), where `<top>`
  is the network's top-level module (`NFNet/~/linear`, `NFResNet/~/linear`,
  `NFRegNet/~/linear`, `ResNet/~/linear`). Nested linears (squeeze-excite's
  `.../squeeze_excite/~/linear`) are never the classifier.

  Args:
    params: a Haiku params tree.

  Returns:
    The classifier's module name.

  Raises:
    ValueError: if there is no such module, several, or if the top-level
      module also has `linear_1`, ... (then `linear` is not the final layer and
      the classifier must be named explicitly).
  """
  modules = sorted({_split_path(p)[0]
                    for p, _ in jax.tree_util.tree_leaves_with_path(params)})
  found = [m for m in modules if _CLASSIFIER_RE.fullmatch(m)]
  if len(found) != 1:
    raise ValueError(
        "Cannot tell the classifier: expected exactly one top-level module "
        f"named '<network>/~/linear' or '<network>/linear', found "
        f"{found or 'none'}. Pass "
        "classifier_module='<module name>' (e.g. 'NFNet/~/linear')."
    )
  top = found[0].split("/", 1)[0]
  numbered = [m for m in modules
              if (match := _NUMBERED_LINEAR_RE.fullmatch(m))
              and match.group(1) == top]
  if numbered:
    raise ValueError(
        f"Cannot tell the classifier: {found[0]!r} has siblings {numbered}, so "
        "it may not be the final layer. Pass classifier_module explicitly."
    )
  return found[0]


def agc_mask(params: Params, *, classifier_module: Optional[str] = None) -> Any:
  """Which parameters AGC clips, exactly as the official release.

  AGC applies to every parameter except the classifier's weight `w`. The
  classifier's bias, the squeeze-excite linears, gains, biases and the
  zero-initialised skip gains are all clipped (paper, Sec. 4.1: "we find it
  is also beneficial not to clip the final linear layer").

  Use with `optax.masked(nfnets_jax.adaptive_grad_clip(c), agc_mask)`.

  Args:
    params: a Haiku params tree `{module_name: {param_name: array}}`.
    classifier_module: the classifier's module name; by default
      `find_classifier(params)`, the top-level module's `linear`.

  Returns:
    A tree like `params` of Python bools, False only for the classifier's `w`.

  Raises:
    ValueError: if the classifier cannot be found, or `classifier_module` has
      no parameter `w` in `params`.
  """
  if classifier_module is None:
    classifier_module = find_classifier(params)
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: _split_path(path) != (classifier_module, "w"), params)
  if all(jax.tree.leaves(mask)):
    raise ValueError(
        f"classifier_module={classifier_module!r}: no parameter "
        f"'{classifier_module}/w' in params."
    )
  return mask


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
  if not ok:
    raise ValueError(f"{name} must be {requirement}, got {value!r}.")


def _decay(weight_decay: float, mask: Mask) -> optax.GradientTransformation:
  """Weight decay `g + wd * w` where `mask` is True; identity if wd == 0."""
  _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
  if weight_decay == 0:
    return optax.identity()
  return optax.add_decayed_weights(weight_decay, mask)


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = weight_decay_mask,
    momentum: Optional[float] = 0.9,
    nesterov: bool = True,
    dampening: float = 0.0,
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and weight decay, as the release's `SGD`.

  Update: `g <- g + wd * w` (masked), `m <- momentum * m + (1 - dampening) * g`,
  step `-lr * (g + momentum * m)` with Nesterov, `-lr * m` without. Weight
  decay is not part of the loss (so AGC, applied before, never sees it) but
  does go through momentum, like the release and PyTorch.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decay coefficient (the paper: 2e-5 for NFNets).
    weight_decay_mask: tree or callable selecting decayed parameters.
    momentum: momentum coefficient in [0, 1), or None/0 for plain SGD.
    nesterov: Nesterov momentum (the paper's choice).
    dampening: damping of the gradient into the momentum buffer; only without
      Nesterov (as in PyTorch).

  Returns:
    An optax chain.
  """
  momentum = momentum or None
  if momentum is not None:
    _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1) or None")
  _check("dampening", dampening, 0 <= dampening < 1, "in [0, 1)")
  _check("dampening", dampening, not (dampening and nesterov),
         "0 with nesterov=True")
  return optax.chain(
      _decay(weight_decay, weight_decay_mask),
      optax.scale(1.0 - dampening) if dampening else optax.identity(),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = weight_decay_mask,
    beta1: Optional[float] = 0.9,
    beta2: Optional[float] = 0.999,
    eps: float = 1e-8,
    use_adamw: bool = False,
) -> optax.GradientTransformation:
  """Adam (Kingma & Ba, 2015) as the release's `Adam`, optionally AdamW.

  Without `use_adamw`, weight decay is added to the gradient before the
  moments; with it, it is decoupled (Loshchilov & Hutter, 2019):
  `w <- w - lr * (adam_step + wd * w)`. `beta1=None` drops the first moment,
  `beta2=None` divides by `|g| + eps` (the release's options), which is optax's
  Adam with that beta set to 0.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decay coefficient.
    weight_decay_mask: tree or callable selecting decayed parameters.
    beta1: first-moment decay in [0, 1), or None.
    beta2: second-moment decay in [0, 1), or None.
    eps: added to the denominator, >= 0.
    use_adamw: decoupled weight decay.

  Returns:
    An optax chain.
  """
  b1, b2 = beta1 or 0.0, beta2 or 0.0
  _check("beta1", beta1, 0 <= b1 < 1, "in [0, 1) or None")
  _check("beta2", beta2, 0 <= b2 < 1, "in [0, 1) or None")
  _check("eps", eps, eps >= 0, ">= 0")
  decay = _decay(weight_decay, weight_decay_mask)
  scale = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(
      *((scale, decay) if use_adamw else (decay, scale)),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = weight_decay_mask,
    beta1: Optional[float] = 0.9,
    beta2: Optional[float] = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """AdamW: `adam(..., use_adamw=True)`, decoupled weight decay.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decay coefficient.
    weight_decay_mask: tree or callable selecting decayed parameters.
    beta1: first-moment decay in [0, 1), or None.
    beta2: second-moment decay in [0, 1), or None.
    eps: added to the denominator, >= 0.

  Returns:
    An optax chain.
  """
  return adam(learning_rate, weight_decay=weight_decay,
              weight_decay_mask=weight_decay_mask, beta1=beta1, beta2=beta2,
              eps=eps, use_adamw=True)


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = weight_decay_mask,
    decay: float = 0.9,
    momentum: Optional[float] = None,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """RMSProp (Tieleman & Hinton, 2012) as the release's `RMSProp` (TF style).

  `v <- decay * v + (1 - decay) * g^2` with `v` initialised to ones, as in
  TensorFlow; step `s = lr * g / sqrt(v + eps)`; with momentum,
  `m <- momentum * m + s` and the update is `-m` (learning rate inside the
  momentum). Weight decay is added to the gradient first.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decay coefficient.
    weight_decay_mask: tree or callable selecting decayed parameters.
    decay: squared-gradient average decay in [0, 1).
    momentum: heavy-ball momentum in [0, 1), or None/0.
    eps: added inside the square root, >= 0.

  Returns:
    An optax chain.
  """
  _check("decay", decay, 0 <= decay < 1, "in [0, 1)")
  if momentum is not None:
    _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1) or None")
  _check("eps", eps, eps >= 0, ">= 0")
  return optax.chain(
      _decay(weight_decay, weight_decay_mask),
      optax.scale_by_rms(decay=decay, eps=eps, initial_scale=1.0),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(momentum) if momentum else optax.identity(),
  )


def fromage(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask = weight_decay_mask,
    eps: float = 1e-5,
) -> optax.GradientTransformation:
  """Fromage (Bernstein et al., 2020, arXiv:2002.03432) as the release's.

  `g <- g + wd * w` (masked), then
  `w <- (w - lr * g * max(||w||, eps) / max(||g||, eps)) / sqrt(1 + lr^2)`
  with whole-tensor norms: optax's `fromage` with `min_norm=eps`.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decay coefficient.
    weight_decay_mask: tree or callable selecting decayed parameters.
    eps: minimum norm, > 0, so zero-initialised parameters can move.

  Returns:
    An optax chain.
  """
  _check("eps", eps, eps > 0, "> 0")
  return optax.chain(_decay(weight_decay, weight_decay_mask),
                     optax.fromage(learning_rate, min_norm=eps))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    # The release's SGD_AGC is SGD with clipping; here AGC is a separate link
    # of the chain (config.agc), which `make_optimizer` requires for this name.
    "sgd_agc": sgd,
    "adam": adam,
    "adamw": adamw,
    "rmsprop": rmsprop,
    "fromage": fromage,
}

SCHEDULES = ("cosine", "constant", "exponential")


def make_schedule(
    *,
    base_lr: float,
    batch_size: int,
    base_batch_size: int = 256,
    warmup_epochs: float,
    total_epochs: float,
    steps_per_epoch: int,
    schedule: str = "cosine",
    end_lr_factor: float = 0.0,
    decay_factor: Optional[float] = None,
    decay_epochs: Optional[float] = None,
) -> optax.Schedule:
  """Linear warmup from 0, then decay; peak lr scaled with the batch size.

  The peak is `base_lr * batch_size / base_batch_size` (paper: 0.1 x B / 256).
  Step counts come from epochs: `warmup_epochs * steps_per_epoch` warmup steps
  (may be fractional, as in the release) and
  `floor(total_epochs * steps_per_epoch)` steps in all. After warmup:

  * 'cosine': cosine decay to `end_lr_factor * peak` at the last step, then
    held there (the release's `WarmupCosineDecay` with
    `min_val = end_lr_factor * peak`).
  * 'constant': the peak.
  * 'exponential': `peak * decay_factor ** floor(epochs since warmup /
    decay_epochs)`, floored at `end_lr_factor * peak` (`WarmupExpDecay`).

  The schedule is evaluated at the optimizer's step count, 0 on the first
  update, like the release's `global_step`.

  Args:
    base_lr: learning rate for `base_batch_size`, > 0.
    batch_size: global batch size, > 0.
    base_batch_size: batch size `base_lr` refers to, > 0. Set it to
      `batch_size` for no scaling (the NF-RegNet recipe).
    warmup_epochs: epochs of linear warmup, >= 0.
    total_epochs: epochs of training, > `warmup_epochs` (>= for 'constant').
    steps_per_epoch: optimizer steps per epoch, > 0.
    schedule: one of `SCHEDULES`.
    end_lr_factor: final (cosine) or minimum (exponential) lr over the peak,
      in [0, 1].
    decay_factor: 'exponential' only: factor per decay, in (0, 1].
    decay_epochs: 'exponential' only: epochs between decays, > 0.

  Returns:
    An optax schedule, step -> learning rate.

  Raises:
    ValueError: on an unknown schedule or a value out of range.
  """
  return _make_schedule(
      "", base_lr=base_lr, batch_size=batch_size,
      base_batch_size=base_batch_size, warmup_epochs=warmup_epochs,
      total_epochs=total_epochs, steps_per_epoch=steps_per_epoch,
      schedule=schedule, end_lr_factor=end_lr_factor,
      decay_factor=decay_factor, decay_epochs=decay_epochs)


def _make_schedule(field_prefix: str, *, base_lr, batch_size, base_batch_size,
                   warmup_epochs, total_epochs, steps_per_epoch, schedule,
                   end_lr_factor, decay_factor, decay_epochs) -> optax.Schedule:
  """`make_schedule`; errors name config fields as `field_prefix + arg`."""
  f = lambda name: field_prefix + name
  if schedule not in SCHEDULES:
    raise ValueError(
        f"{f('schedule')}={schedule!r} is not a known schedule; allowed: "
        f"{', '.join(map(repr, SCHEDULES))}.")
  _check(f("base_lr"), base_lr, base_lr > 0, "> 0")
  _check("batch_size", batch_size, batch_size > 0, "> 0")
  _check(f("base_batch_size"), base_batch_size, base_batch_size > 0, "> 0")
  _check("steps_per_epoch", steps_per_epoch,
         isinstance(steps_per_epoch, numbers.Integral) and steps_per_epoch > 0,
         "an int > 0")
  _check(f("warmup_epochs"), warmup_epochs, warmup_epochs >= 0, ">= 0")
  if schedule == "constant":
    _check("total_epochs", total_epochs, total_epochs >= warmup_epochs,
           f">= {f('warmup_epochs')} ({warmup_epochs})")
  else:
    _check("total_epochs", total_epochs, total_epochs > warmup_epochs,
           f"> {f('warmup_epochs')} ({warmup_epochs})")
  _check(f("end_lr_factor"), end_lr_factor, 0 <= end_lr_factor <= 1,
         "in [0, 1]")
  if schedule == "exponential":
    _check(f("decay_factor"), decay_factor,
           decay_factor is not None and 0 < decay_factor <= 1, "in (0, 1]")
    _check(f("decay_epochs"), decay_epochs,
           decay_epochs is not None and decay_epochs > 0, "> 0")

  peak = base_lr * batch_size / base_batch_size
  warmup_steps = warmup_epochs * steps_per_epoch
  total_steps = int(total_epochs * steps_per_epoch)
  if schedule == "cosine":
    after = optax.cosine_decay_schedule(
        peak, decay_steps=total_steps - warmup_steps, alpha=end_lr_factor)
  elif schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.exponential_decay(
        peak, transition_steps=decay_epochs * steps_per_epoch,
        decay_rate=decay_factor, staircase=True,
        end_value=end_lr_factor * peak)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
  return optax.join_schedules([warmup, after], boundaries=[warmup_steps])


def make_optimizer(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    steps_per_epoch: int,
    total_epochs: float,
    params: Optional[Params] = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The training recipe from `config.optimizer`: AGC, weight decay, optimizer.

  The chain is `masked(adaptive_grad_clip, agc_mask)` on the raw gradient,
  then the named optimizer with its (masked) weight decay, with the learning
  rate from `make_schedule`. With `name='sgd'`, `kwargs={'momentum': 0.9,
  'nesterov': True}`, `weight_decay=2e-5`, `agc.clipping=0.01` this is the
  NFNet recipe of the paper and the official `experiment_nfnets.py`. With
  `sam.rho > 0` the chain is wrapped in SAM (`with_sam`).

  Args:
    config: the experiment's `config.optimizer`, with fields
      `name` (a key of `OPTIMIZERS`), `kwargs` (dict, optimizer arguments),
      `weight_decay` (float, default 0), `agc` (`{clipping: float | None,
      eps: float, classifier_module: str | None}`; clipping None or 0
      disables AGC), `lr` (`{base_lr, base_batch_size=256, warmup_epochs=0,
      schedule='cosine', end_lr_factor=0, decay_factor, decay_epochs}`, see
      `make_schedule`), `track_clip_stats` (bool, default False), `sam`
      (`{rho: float, 0 = off, sync_perturbations: bool}`).
    batch_size: global batch size.
    steps_per_epoch: optimizer steps per epoch.
    total_epochs: epochs of training.
    params: if given, the AGC mask is computed now (errors surface here);
      otherwise from the gradient tree at the first update.

  Returns:
    `(optimizer, schedule)`; `schedule(step)` is the learning rate at `step`,
    for logging.

  Raises:
    ValueError: naming the config field, on an unknown name, an unknown
      kwarg, or a value out of range.
  """
  name = config.get("name")
  if name not in OPTIMIZERS:
    raise ValueError(
        f"config.optimizer.name={name!r} is not a known optimizer; allowed: "
        f"{', '.join(map(repr, sorted(OPTIMIZERS)))}.")
  lr = config.get("lr") or {}
  if lr.get("base_lr") is None:
    raise ValueError("config.optimizer.lr.base_lr is required.")
  schedule = _make_schedule(
      "config.optimizer.lr.",
      base_lr=lr["base_lr"], batch_size=batch_size,
      base_batch_size=lr.get("base_batch_size", 256),
      warmup_epochs=lr.get("warmup_epochs", 0.0), total_epochs=total_epochs,
      steps_per_epoch=steps_per_epoch, schedule=lr.get("schedule", "cosine"),
      end_lr_factor=lr.get("end_lr_factor", 0.0),
      decay_factor=lr.get("decay_factor"), decay_epochs=lr.get("decay_epochs"))

  builder = OPTIMIZERS[name]
  kwargs = dict(config.get("kwargs") or {})
  allowed = [p for p in inspect.signature(builder).parameters
             if p not in ("learning_rate", "weight_decay", "weight_decay_mask")]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f"config.optimizer.kwargs has {unknown} not accepted by {name!r}; "
        f"allowed: {allowed}.")
  weight_decay = config.get("weight_decay") or 0.0
  _check("config.optimizer.weight_decay", weight_decay, weight_decay >= 0,
         ">= 0")
  try:
    base = builder(schedule, weight_decay=weight_decay, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.optimizer.kwargs: {e}") from e

  agc_cfg = config.get("agc") or {}
  clipping = agc_cfg.get("clipping") or 0.0
  _check("config.optimizer.agc.clipping", clipping, clipping >= 0,
         ">= 0 or None")
  if name == "sgd_agc" and not clipping:
    raise ValueError(
        "config.optimizer.name='sgd_agc' needs config.optimizer.agc.clipping "
        "> 0 (the paper uses 0.01); use name='sgd' for SGD without AGC.")
  tx = base
  if clipping:
    eps = agc_cfg.get("eps", 1e-3)
    _check("config.optimizer.agc.eps", eps, eps >= 0, ">= 0")
    classifier = agc_cfg.get("classifier_module")
    if params is None:
      mask = lambda tree: agc_mask(tree, classifier_module=classifier)
    else:
      mask = agc_mask(params, classifier_module=classifier)
    clip = agc_lib.adaptive_grad_clip(
        clipping, eps, track_clip_stats=bool(config.get("track_clip_stats")))
    tx = optax.chain(optax.masked(clip, mask), base)
  rho = (config.get("sam") or {}).get("rho") or 0.0
  _check("config.optimizer.sam.rho", rho, rho >= 0, ">= 0 (0: no SAM)")
  return (with_sam(tx, rho) if rho else tx), schedule


def with_sam(tx: optax.GradientTransformation, rho: float
             ) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization around `tx` (Foret et al., ICLR 2021).

  `optax.contrib.sam` in opaque mode: each `update(g, state, params,
  grad_fn=...)` takes the ascent step `params + rho * g / ||g||` (the
  gradient normalized over the whole tree, `optax.contrib.normalize`), calls
  `grad_fn(perturbed_params, 0)` for the gradient there, and passes that
  gradient through `tx` (AGC, weight decay, momentum, learning rate) at the
  unperturbed params, exactly as `tx` treats a gradient without SAM. Which
  gradient `g` is (a device's own or the global one) is the caller's choice
  (`train_state.make_train_step`).

  Args:
    tx: the outer optimizer.
    rho: the neighbourhood radius (> 0).
  """
  ascent = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  return optax.contrib.sam(tx, ascent, sync_period=2, opaque_mode=True)


# How a SAM run's ascent gradient is taken across devices.
PER_DEVICE, GLOBAL = "per_device", "global"


def sam_perturbation(config: ml_collections.ConfigDict) -> Optional[str]:
  """`None` without SAM; `PER_DEVICE` (each device perturbs with its own
  shard's gradient: the SAM paper's m-sharpness, m = the per-device batch)
  or `GLOBAL` (all with the global gradient), from `config.optimizer.sam`."""
  sam = config.get("sam") or {}
  if not sam.get("rho"):
    return None
  return GLOBAL if sam.get("sync_perturbations") else PER_DEVICE
