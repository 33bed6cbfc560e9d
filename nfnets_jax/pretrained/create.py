"""`create_model`: a named model with weights from any checkpoint, callable.

    import nfnets_jax as nj
    model = nj.create_model("dm_nfnet_f0", pretrained="dm_nfnet_f0.safetensors")
    logits = model(images)   # [N, 256, 256, 3] normalized -> [N, 1000]

`pretrained` is told apart by its content (`detect_format`):
  official  DeepMind's `F0_haiku.npz` ... (a dill pickle, read by the
            restricted unpickler of `pretrained.official`: no code runs);
  npz       a safe `.npz` of flat `module/param` names (`save_npz`);
  timm      a timm NF model's state dict, `.safetensors` or torch `.pth`:
            `dm_nfnet_*` as an `NFNet` (`pretrained.timm`), any other
            (`eca_nfnet_l0`, `nf_resnet50`, ...) as a `NormFreeNet`
            (`pretrained.timm_normfree`);
  workdir   an `nfnets-train` workdir: the model of its `config.json`, the
            newest checkpoint's EMA params when the run kept them (else the
            raw ones), the class names of `class_names.json` when present;
  exported  an `nfnets_jax.export()` artifact: not loadable here (no
            params tree; use `nfnets_jax.load_exported`).
Without a name the model is inferred: an NFNet's variant from its params
(`nfnet_*` for official and npz files, `dm_nfnet_*` for timm's), a
NormFreeNet's from its names and shapes (`timm_normfree.identify`), a
workdir's from its config. Params that do not fit the model are refused
with every differing name and shape.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import importlib.util
import json
import os
from typing import Any
import warnings
import zipfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import compiler
from nfnets_jax.cpu import lowering
from nfnets_jax.experiment import run_identity
from nfnets_jax.models import families
from nfnets_jax.models import host_init
from nfnets_jax.models import layers
from nfnets_jax.models import stats
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import export
from nfnets_jax.pretrained import official
from nfnets_jax.pretrained import registry
from nfnets_jax.pretrained import timm
from nfnets_jax.pretrained import timm_normfree

PathLike = str | os.PathLike
FORMATS = ("official", "npz", "timm", "workdir", "exported")
# What an nfnets-train run that fine-tuned on an image folder writes: a JSON
# list of class names, index = label.
CLASS_NAMES_FILE = "class_names.json"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Weights read from a file or workdir, before they meet a model.

  Attributes:
    path: where they came from.
    format: one of `FORMATS`.
    params, state: host NumPy trees `{module: {name: array}}`.
    spec: the model they were trained as, when it can be told (NFNet
      params, a workdir's config), else None.
    label_names: class names (a workdir's `class_names.json`), or None.
    step: a workdir checkpoint's training step (None for files).
    ema: whether the params are a workdir's EMA params.
    spec_error: why `spec` is None when the params are a NormFreeNet's
      (the closest models and how they differ), else None.
  """
  path: str
  format: str
  params: dict[str, dict[str, np.ndarray]]
  state: dict[str, dict[str, np.ndarray]]
  spec: registry.ModelSpec | None
  label_names: tuple[str, ...] | None = None
  step: int | None = None
  ema: bool = False
  spec_error: str | None = None


@dataclasses.dataclass(eq=False)
class Model:
  """A network and its weights: `model(images)` gives eval-mode logits
  (or, made with `features_only=True`, the backbone's feature maps).

  Attributes:
    name: the registry name (or the workdir's model, for a workdir).
    net: `hk.transform_with_state` of `forward(images, is_training)` ->
      outputs dict (`logits`, `pool`), the form `nfnets-train` trains.
    params, state: the weights (device arrays).
    num_classes: classifier outputs.
    data_config: the input geometry (`preprocess` and the pipelines use it).
    family, model_kwargs: the `models.families.MODELS` class and its
      constructor arguments.
    label_names: class names by index, or None.
    feature_indices: None: `model(images)` gives logits; else the indices
      (into `families.feature_info`, increasing) of the feature maps it
      gives instead, a list (`feature_info` describes them).

  The forward is compiled on the first call for each input shape and
  convolution lowering (`nfnets_jax.cpu.conv_impl`; 'auto' is 'native' here,
  `lowering.resolved_inference_conv_impl`), with the package's CPU compiler
  options.
  """
  name: str
  net: hk.TransformedWithState
  params: hk.Params
  state: hk.State
  num_classes: int
  data_config: registry.DataConfig
  family: str
  model_kwargs: Mapping[str, Any]
  label_names: tuple[str, ...] | None = None
  feature_indices: tuple[int, ...] | None = None
  _jitted: dict[str, Any] = dataclasses.field(default_factory=dict,
                                              init=False, repr=False)
  # (the params object, its standardized kernels): see `kernels`.
  _kernels: tuple[Any, dict[str, jax.Array]] | None = dataclasses.field(
      default=None, init=False, repr=False)

  def standardize(self, params: hk.Params, state: hk.State
                  ) -> dict[str, jax.Array]:
    """Every WS convolution's standardized kernel for `params` (pure):
    module name -> HWIO kernel; empty for networks without WS convolutions.

    The modules are those of the family's one cached trace (`stats.traced`
    of `family`, `model_kwargs`); the kernels are
    `layers.standardize_kernels`.
    """
    del state  # Kernels depend on the params alone.
    ws_convs = stats.traced(self.family, self.model_kwargs).ws_convs
    return layers.standardize_kernels(params, ws_convs)

  def kernels(self) -> dict[str, jax.Array]:
    """`standardize(self.params, self.state)`, computed once per params.

    Recomputed when `self.params` is assigned a new tree (compared by
    identity: assign a new tree rather than changing arrays inside it).
    """
    if self._kernels is None or self._kernels[0] is not self.params:
      if "standardize" not in self._jitted:
        # Many small programs run once: without LLVM's expensive passes
        # F0's compile took 1.5 s instead of 3.9 s (a loaded 2-core CPU).
        self._jitted["standardize"] = compiler.Compiled(
            jax.jit(self.standardize), fast=True)
      self._kernels = (self.params,
                       self._jitted["standardize"](self.params, self.state))
    return self._kernels[1]

  def logits(self, params: hk.Params, state: hk.State, images: jax.Array,
             kernels: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """The pure eval-mode forward: `[N, H, W, 3]` -> `[N, num_classes]`.

    Args:
      params, state: the weights.
      images: normalized NHWC float images.
      kernels: `standardize(params, state)`: the forward then does no weight
        standardization of its own (same logits). None: it standardizes.
    """
    return self._eval_outputs(params, state, images, kernels)["logits"]

  def _eval_outputs(self, params: hk.Params, state: hk.State,
                    images: jax.Array,
                    kernels: Mapping[str, jax.Array] | None,
                    return_features: bool = False) -> dict[str, Any]:
    """The network's eval-mode outputs, given kernels or standardizing."""
    with (contextlib.nullcontext() if kernels is None
          else layers.standardized_kernels(kernels)):
      outputs, _ = self.net.apply(params, state, None, images,
                                  is_training=False,
                                  return_features=return_features)
    return outputs

  def forward(self, params: hk.Params, state: hk.State, images: jax.Array,
              kernels: Mapping[str, jax.Array] | None = None
              ) -> jax.Array | list[jax.Array]:
    """What `model(images)` computes, pure: `logits`, or with
    `feature_indices` the list of those feature maps, each
    `[N, H / reduction, W / reduction, channels]` (`feature_info`).

    Args: as `logits`'.
    """
    if self.feature_indices is None:
      return self.logits(params, state, images, kernels)
    features = self._eval_outputs(params, state, images, kernels,
                                  return_features=True)["features"]
    return [features[i] for i in self.feature_indices]

  @property
  def feature_info(self) -> tuple[layers.FeatureInfo, ...]:
    """The maps `model(images)` returns (`features_only=True`); for a
    logits model, every map its network has (`families.feature_info`).

    Raises:
      ValueError: a family without feature maps.
    """
    info = families.feature_info(self.family, self.model_kwargs)
    if self.feature_indices is None:
      return info
    return tuple(info[i] for i in self.feature_indices)

  def __call__(self, images: Any) -> jax.Array | list[jax.Array]:
    """Logits `[N, num_classes]` of normalized NHWC float images, or a
    features model's maps (`forward`).

    Weights are standardized once per params (`kernels`), not per call.
    Compiled on the first call (and again for each new input shape).
    """
    impl = lowering.resolved_inference_conv_impl()
    if impl not in self._jitted:
      self._jitted[impl] = compiler.jit(self.forward)
    with lowering.conv_impl(impl):  # Read when a new shape is traced.
      return self._jitted[impl](self.params, self.state, jnp.asarray(images),
                                self.kernels())

  def preprocess(self, image: np.ndarray | str | os.PathLike) -> np.ndarray:
    """One `[H, W, 3]` 0-255 RGB image, or an image file's path, -> the
    model's eval input (`DataConfig.preprocess`)."""
    return self.data_config.preprocess(image)


def imagenet_label_names() -> tuple[str, ...] | None:
  """The 1000 ImageNet synsets in label order (from TFDS), or None."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "datasets",
                      "imagenet2012", "labels.txt")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  return names if len(names) == 1000 else None


def _is_safetensors(head: bytes, size: int) -> bool:
  """safetensors: a little-endian u64 header length, then a JSON object."""
  if len(head) < 9:
    return False
  return head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def detect_format(path: PathLike) -> str:
  """Which of `FORMATS` a checkpoint path is, from its content.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return "workdir"
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  with open(path, "rb") as f:
    head = f.read(max(16, len(export.MAGIC)))
  if head.startswith(export.MAGIC):
    return "exported"
  if head.startswith(_ZIP_MAGIC):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile:
      return "npz"  # np.load names the problem.
    # torch.save writes `<archive>/data.pkl`; np.savez only `*.npy`.
    return "timm" if any(n.endswith("data.pkl") for n in names) else "npz"
  if _is_safetensors(head, os.path.getsize(path)):
    return "timm"
  if path.lower().endswith(timm.TORCH_SUFFIXES):
    return "timm"  # A legacy (non-zip) torch pickle.
  return "official"


def _nfnet_spec(params: Mapping[str, Any], timm: bool
                ) -> registry.ModelSpec | None:
  """The registry entry of NFNet params (by their variant), if any."""
  try:
    variant = checks.infer_variant(params)
  except ValueError:
    return None
  return registry.REGISTRY.get(registry.name_for_nfnet(variant, timm=timm))


def _normfree_spec(params: Mapping[str, Any]
                   ) -> tuple[registry.ModelSpec | None, str | None]:
  """`(registry entry, None)` of NormFreeNet params, or `(None, why not)`."""
  try:
    name = timm_normfree.identify(stats.as_shapes(params))
    return registry.get_spec(name), None
  except ValueError as err:
    return None, str(err)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_class_names(workdir: str) -> tuple[str, ...] | None:
  """A workdir's `class_names.json` (a list, index = label), if present.

  Raises:
    ValueError: the file is not a JSON list of strings.
  """
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return None
  names = _read_json(path)
  if not isinstance(names, list) or not all(isinstance(n, str)
                                            for n in names):
    raise ValueError(f"{path}: expected a JSON list of class names")
  return tuple(names)


def workdir_spec(workdir: str) -> registry.ModelSpec:
  """The model and eval geometry of an `nfnets-train` workdir's config (its
  config.json with the changes resumes were allowed,
  `run_identity.workdir_config`).

  Raises:
    FileNotFoundError: no config.json (not a workdir).
    ValueError: a config.json without the model / train / eval fields.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r} is a directory without "
                            "config.json; not an nfnets-train workdir")
  config = run_identity.workdir_config(workdir)
  run = os.path.basename(os.path.normpath(workdir))
  try:
    kwargs = dict(config["model"].get("kwargs") or {})
    for key in families.RUNTIME_SETTINGS:
      if key in kwargs:
        # Written before the lowering became a run-time setting: not part of
        # the model, so the checkpoint loads the same without it.
        warnings.warn(f"{path}: ignoring model.kwargs.{key}={kwargs.pop(key)!r}"
                      " (now a run-time setting: $NFNETS_JAX_CONV)",
                      stacklevel=2)
    return registry.ModelSpec(
        name=f"{config['model']['name']} ({run})",
        family=config["model"]["name"],
        kwargs=kwargs,
        data=registry.DataConfig(
            train_size=int(config["train"]["image_size"]),
            test_size=int(config["eval"]["image_size"]),
            crop_padding=int(config["eval"]["crop_padding"])))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: no model/train/eval field {e}; not an "
                     "nfnets-train config") from None


def load_workdir(workdir: str, *, step: int | None = None,
                 use_ema: bool = True) -> Checkpoint:
  """The newest (or `step`) checkpoint of an `nfnets-train` workdir.

  Args:
    workdir: the run's `--workdir`.
    step: a checkpoint step (None: the newest).
    use_ema: take the EMA params/state when the run kept them.

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: an unknown step.
  """
  spec = workdir_spec(workdir)
  step = workdir_step(workdir, step)
  from nfnets_jax.experiment import checkpoint_io  # orbax: only for workdirs.
  saved = checkpoint_io.read_state(os.path.join(workdir, "checkpoints"), step)
  ema = bool(use_ema and saved.get("ema_params"))
  prefix = "ema_" if ema else ""
  return Checkpoint(
      path=workdir, format="workdir", params=saved[f"{prefix}params"],
      state=saved.get(f"{prefix}model_state") or {}, spec=spec,
      label_names=read_class_names(workdir), step=step, ema=ema)


def workdir_step(workdir: PathLike, step: int | None = None) -> int:
  """`step` if the workdir has that checkpoint, the newest if None.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    ValueError: `step` is not one of its checkpoints.
  """
  workdir = os.fspath(workdir)
  from nfnets_jax.experiment import checkpoint_io  # orbax: only for workdirs.
  steps = checkpoint_io.checkpoint_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/<step> "
                            "directory: nothing to load")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"step={step} is not a checkpoint of {workdir!r}; "
                     f"available: {steps}")
  return step


def load_checkpoint(path: PathLike, *, step: int | None = None,
                    use_ema: bool = True) -> Checkpoint:
  """Reads weights in any of `FORMATS` but 'exported' (see module doc).

  Args:
    path: a checkpoint file or an `nfnets-train` workdir.
    step, use_ema: for workdirs (see `load_workdir`).

  Raises:
    FileNotFoundError: a missing path, or a workdir without checkpoints.
    ValueError: an unreadable file, an exported artifact.
    UnsafeCheckpointError: a pickle asking for code (nothing ran).
  """
  path = os.fspath(path)
  kind = detect_format(path)
  if kind == "workdir":
    return load_workdir(path, step=step, use_ema=use_ema)
  if kind == "exported":
    raise ValueError(f"{path} is an exported model (nfnets_jax.export()): it "
                     "has no params to load; use nfnets_jax.load_exported")
  if kind == "timm":
    state_dict = timm.load_timm_file(path)
    if timm_normfree.is_dm_nfnet(state_dict):
      params, state = timm.from_timm_state_dict(state_dict)
    else:
      params, state = timm_normfree.from_timm_state_dict(state_dict), {}
  else:
    params, state = official.load_pretrained(path)
  spec, spec_error = _nfnet_spec(params, timm=kind == "timm"), None
  if spec is None and timm_normfree.is_normfree(params):
    spec, spec_error = _normfree_spec(params)
  return Checkpoint(path=path, format=kind, params=params, state=state,
                    spec=spec, spec_error=spec_error)


def feature_indices(info: Sequence[layers.FeatureInfo],
                    out_indices: Sequence[int] | None, name: str
                    ) -> tuple[int, ...]:
  """The maps `out_indices` selects of a model's `info`, as timm selects
  them: indices into the full list, negative ones from its end.

  Args:
    info: every map of the model (`families.feature_info`).
    out_indices: the selection; None: all.
    name: the model's name (for errors).

  Returns:
    Non-negative indices into `info`, increasing, each once.

  Raises:
    ValueError: an empty selection, or an index that is not an int in
      `[-len(info), len(info) - 1]`, naming it and the maps there are.
  """
  n = len(info)
  if out_indices is None:
    return tuple(range(n))
  allowed = (f"allowed: ints in [{-n}, {n - 1}] for the {n} maps of {name} "
             f"{[f.module for f in info]}")
  if np.ndim(out_indices) != 1:
    raise ValueError(f"out_indices={out_indices!r} is not a sequence of map "
                     f"indices; {allowed}")
  chosen = set()
  for i in out_indices:
    if (isinstance(i, bool) or not isinstance(i, (int, np.integer))
        or not -n <= i < n):
      raise ValueError(f"out_indices={out_indices!r}: {i!r} is not a map "
                       f"index; {allowed}")
    chosen.add(int(i) % n)
  if not chosen:
    raise ValueError(f"out_indices={out_indices!r} selects no map; {allowed}")
  return tuple(sorted(chosen))


def resolve_label_names(names: Sequence[str] | None, num_classes: int
                        ) -> tuple[str, ...] | None:
  """A model's class names: `names` (a workdir's), else the ImageNet
  synsets for 1000 classes; None when there are none or their count is not
  `num_classes`."""
  if names is None and num_classes == 1000:
    names = imagenet_label_names()
  if names is None or len(names) != num_classes:
    return None
  return tuple(names)


def create_model(name: str | None = None, *,
                 pretrained: PathLike | Checkpoint | None | bool = None,
                 num_classes: int | None = None, seed: int = 0,
                 features_only: bool = False,
                 out_indices: Sequence[int] | None = None,
                 **model_kwargs: Any) -> Model:
  """Builds a named model, with weights from `pretrained` if given.

  Args:
    name: a registry name (`list_models()`); None: inferred from
      `pretrained` (an NFNet's variant, a NormFreeNet's layout, a workdir's
      config). A name that timm uses for another definition (`nf_resnet50`,
      `nf_regnet_b1`, `nfnet_f0`, ...: the official one here) with a timm
      file of that model builds timm's (`timm_nf_resnet50`, ...): the file
      tells the two apart.
    pretrained: a checkpoint in any format of `detect_format` but
      'exported', or a `Checkpoint` `load_checkpoint` read. None: random
      weights from `seed`, with a warning that says so; False: random
      weights, asked for (no warning).
    num_classes: classifier outputs. Default: the checkpoint's, else the
      name's (1000). A different count than the checkpoint's replaces its
      classifier (N(0, 0.01) weights, zero bias) for fine-tuning.
    seed: PRNG seed of a random initialization or a new classifier. Random
      weights are drawn on the host by NumPy from each parameter's own
      initializer (`models.host_init`: same distributions as `net.init`,
      other values, nothing compiled).
    features_only: the model returns its backbone's feature maps, a list
      of NHWC arrays (`Model.feature_info`: channels, reduction, timm's
      module name), instead of logits; the weights are the same.
    out_indices: with `features_only`, which maps (as timm's: indices into
      the full list, negative ones from its end); None: all. They come in
      network order, each once.
    **model_kwargs: constructor arguments overriding the name's (e.g. a
      custom `variant=`).

  Returns:
    The `Model` (callable on normalized NHWC images).

  Raises:
    ValueError: an unknown name, a checkpoint that names no model and no
      `name`, (`ParamsMismatchError`) params that do not fit the model,
      listing every differing name and shape, `out_indices` without
      `features_only` or out of range, or `features_only` for a family
      without feature maps.
  """
  if out_indices is not None and not features_only:
    raise ValueError(f"out_indices={out_indices!r} selects feature maps; "
                     "it needs features_only=True")
  if pretrained is True:
    raise ValueError("create_model(pretrained=True): nothing is downloaded; "
                     "pass the path of a checkpoint you have (official "
                     "F*_haiku.npz, timm .safetensors/.pth, .npz, workdir)")
  random_weights = pretrained is None or pretrained is False
  if random_weights or isinstance(pretrained, Checkpoint):
    ckpt = None if random_weights else pretrained
  else:
    ckpt = load_checkpoint(pretrained)
  if name is not None:
    spec = registry.get_spec(name)
    if (ckpt is not None and ckpt.spec is not None
        and ckpt.spec.name == registry.TIMM_PREFIX + spec.name):
      spec = ckpt.spec  # timm's definition of the name.
  elif ckpt is not None and ckpt.spec is not None:
    spec = ckpt.spec
  else:
    where = "" if ckpt is None else (
        f" ({ckpt.path}: {ckpt.spec_error or 'params of no known model'})")
    raise ValueError(f"create_model: no model name given and none can be "
                     f"inferred{where}; pass one of nfnets_jax.list_models()")
  kwargs = {**spec.kwargs, **model_kwargs}
  families.check_family(spec.family, kwargs)
  indices = (feature_indices(families.feature_info(spec.family, kwargs),
                             out_indices, spec.name)
             if features_only else None)
  head = stats.classifier_names(spec.family, kwargs)
  have = None if ckpt is None else checks.checkpoint_classes(ckpt.params,
                                                             head)
  base_classes = have or spec.num_classes
  classes = base_classes if num_classes is None else int(num_classes)
  if classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  net = families.make_network(spec.family, kwargs, classes)
  target = f"model {spec.name!r} ({spec.family}, {kwargs}"
  if ckpt is None:
    if pretrained is None:
      warnings.warn(
          f"create_model({spec.name!r}) without pretrained=: the weights are "
          f"random (seed={seed}); pass pretrained=PATH for trained weights, "
          "or pretrained=False to ask for random ones", stacklevel=2)
    drawn = host_init.draw(stats.traced(spec.family, kwargs).initializers,
                           *stats.param_shapes(spec.family, kwargs, classes),
                           seed=seed)
    if drawn is None:  # An initializer NumPy does not draw: JAX's init.
      size = stats.TRACE_SIZE
      images = jnp.zeros((1, size, size, 3), jnp.float32)
      drawn = compiler.run_once(lambda x: net.init(
          jax.random.PRNGKey(seed), x, is_training=True), images)
    params, state = drawn
    label_names = resolve_label_names(None, classes)
  else:
    want, want_state = stats.param_shapes(spec.family, kwargs, base_classes)
    checks.compare_shapes(
        ckpt.params, want, source=f"checkpoint {ckpt.path}",
        target=f"{target}, num_classes={base_classes})")
    if want_state:
      checks.compare_shapes(
          ckpt.state, want_state, source=f"checkpoint {ckpt.path} (state)",
          target=f"{target}, num_classes={base_classes})")
    params, state = ckpt.params, ckpt.state
    label_names = resolve_label_names(ckpt.label_names, classes)
    if classes != base_classes:
      params = checks.replace_classifier(params, spec.family, kwargs, classes,
                                         seed=seed)
      label_names = None  # A new head: its classes have no names yet.
  # `jax.device_put`, not `jnp.asarray`: that compiled a copy for each new
  # shape (36 programs, 0.8 s for F0's weights).
  return Model(name=spec.name, net=net, params=jax.device_put(params),
               state=jax.device_put(state), num_classes=classes,
               data_config=spec.data, family=spec.family,
               model_kwargs=kwargs, label_names=label_names,
               feature_indices=indices)
