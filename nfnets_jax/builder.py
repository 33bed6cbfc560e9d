"""`create_model`: a named model with weights from any checkpoint, callable.

    import nfnets_jax as nj
    model = nj.create_model("dm_nfnet_f0", pretrained="dm_nfnet_f0.safetensors")
    logits = model(images)   # [N, 256, 256, 3] normalized -> [N, 1000]

`pretrained` is told apart by its content (`detect_format`):
  official  DeepMind's `F0_haiku.npz` ... (a dill pickle, read by the
            restricted unpickler of `nfnets_jax.pretrained`: no code runs);
  npz       a safe `.npz` of flat `module/param` names (`save_npz`);
  timm      a timm `dm_nfnet_*` state dict, `.safetensors` or torch `.pth`
            (`nfnets_jax.timm_weights`);
  workdir   an `nfnets-train` workdir: the model of its `config.json`, the
            newest checkpoint's EMA params when the run kept them (else the
            raw ones), the class names of `class_names.json` when present;
  exported  an `nfnets_jax.export()` artifact: not loadable here (no
            params tree; use `nfnets_jax.load_exported`).
Without a name the model is inferred: an NFNet's variant from its params
(`nfnet_*` for official and npz files, `dm_nfnet_*` for timm's), a
workdir's from its config. Params that do not fit the model are refused
with every differing name and shape.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import importlib.util
import json
import os
from typing import Any
import zipfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import exporting
from nfnets_jax import fast_compile
from nfnets_jax import models
from nfnets_jax import param_checks
from nfnets_jax import pretrained as pretrained_lib
from nfnets_jax import registry
from nfnets_jax import timm_weights

PathLike = str | os.PathLike
FORMATS = ("official", "npz", "timm", "workdir", "exported")
# What an nfnets-train run that fine-tuned on an image folder writes: a JSON
# list of class names, index = label.
CLASS_NAMES_FILE = "class_names.json"
_ZIP_MAGIC = b"PK\x03\x04"
_CLASSIFIER_STDDEV = 0.01  # As every family's default `fc_init`.
# Input side for tracing and initializing: no family's params depend on it.
_TRACE_SIZE = 64


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
  """
  path: str
  format: str
  params: dict[str, dict[str, np.ndarray]]
  state: dict[str, dict[str, np.ndarray]]
  spec: registry.ModelSpec | None
  label_names: tuple[str, ...] | None = None
  step: int | None = None
  ema: bool = False


@dataclasses.dataclass(eq=False)
class Model:
  """A network and its weights: `model(images)` gives eval-mode logits.

  Attributes:
    name: the registry name (or the workdir's model, for a workdir).
    net: `hk.transform_with_state` of `forward(images, is_training)` ->
      outputs dict (`logits`, `pool`), the form `nfnets-train` trains.
    params, state: the weights (device arrays).
    num_classes: classifier outputs.
    data_config: the input geometry (`preprocess` and the pipelines use it).
    family, model_kwargs: the `nfnets_jax.models.MODELS` class and its
      constructor arguments.
    label_names: class names by index, or None.
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
  _jitted: Any = dataclasses.field(default=None, init=False, repr=False)

  def logits(self, params: hk.Params, state: hk.State,
             images: jax.Array) -> jax.Array:
    """The pure eval-mode forward: `[N, H, W, 3]` -> `[N, num_classes]`."""
    outputs, _ = self.net.apply(params, state, None, images,
                                is_training=False)
    return outputs["logits"]

  def __call__(self, images: Any) -> jax.Array:
    """Logits `[N, num_classes]` of normalized NHWC float images.

    Compiled on the first call (and again for each new input shape).
    """
    if self._jitted is None:
      self._jitted = jax.jit(self.logits)
    return self._jitted(self.params, self.state, jnp.asarray(images))

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """One `[H, W, 3]` 0-255 RGB image -> the model's eval input."""
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


# ----------------------------------------------------------------------------
# Reading checkpoints.
# ----------------------------------------------------------------------------


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
    head = f.read(max(16, len(exporting.MAGIC)))
  if head.startswith(exporting.MAGIC):
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
  if path.lower().endswith(timm_weights.TORCH_SUFFIXES):
    return "timm"  # A legacy (non-zip) torch pickle.
  return "official"


def _nfnet_spec(params: Mapping[str, Any], timm: bool
                ) -> registry.ModelSpec | None:
  """The registry entry of NFNet params (by their variant), if any."""
  try:
    variant = param_checks.infer_variant(params)
  except ValueError:
    return None
  return registry.REGISTRY.get(registry.name_for_nfnet(variant, timm=timm))


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
  """The model and eval geometry of an `nfnets-train` workdir's config.json.

  Raises:
    FileNotFoundError: no config.json (not a workdir).
    ValueError: a config.json without the model / train / eval fields.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r} is a directory without "
                            "config.json; not an nfnets-train workdir")
  config = _read_json(path)
  run = os.path.basename(os.path.normpath(workdir))
  try:
    return registry.ModelSpec(
        name=f"{config['model']['name']} ({run})",
        family=config["model"]["name"],
        kwargs=dict(config["model"].get("kwargs") or {}),
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
  # Imported here: orbax is only needed for workdirs.
  # pylint: disable-next=g-import-not-at-top
  from nfnets_jax.experiment import checkpointing
  spec = workdir_spec(workdir)
  step = workdir_step(workdir, step)
  saved = checkpointing.read_state(os.path.join(workdir, "checkpoints"), step)
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
  # pylint: disable-next=g-import-not-at-top
  from nfnets_jax.experiment import checkpointing
  workdir = os.fspath(workdir)
  steps = checkpointing.checkpoint_steps(os.path.join(workdir, "checkpoints"))
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
    params, state = timm_weights.from_timm_state_dict(
        timm_weights.load_timm_file(path))
  else:
    params, state = pretrained_lib.load_pretrained(path)
  return Checkpoint(path=path, format=kind, params=params, state=state,
                    spec=_nfnet_spec(params, timm=kind == "timm"))


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------


def make_network(family: str, kwargs: Mapping[str, Any], num_classes: int
                 ) -> hk.TransformedWithState:
  """`hk.transform_with_state` of `forward(images, is_training)` -> outputs.

  The same form as `nfnets-train`'s network (`train_state.make_network`).
  """
  kwargs = dict(kwargs)

  def forward(images: jax.Array, is_training: bool) -> dict[str, jax.Array]:
    return models.build_model(family, num_classes, **kwargs)(
        images, is_training=is_training)

  return hk.transform_with_state(forward)


_SHAPES_CACHE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


def model_shapes(family: str, kwargs: Mapping[str, Any], num_classes: int,
                 size: int = _TRACE_SIZE
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Param and state shapes `{module: {name: shape}}` of a model.

  Traced with `jax.eval_shape` (nothing runs) and cached.
  """
  key = repr((family, sorted(kwargs.items()), num_classes, size))
  if key not in _SHAPES_CACHE:
    net = make_network(family, kwargs, num_classes)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    # Training mode: BatchNorm creates its moving averages only there.
    params, state = jax.eval_shape(
        lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True),
        images)
    as_shapes = lambda tree: {
        m: {n: tuple(v.shape) for n, v in leaves.items()}
        for m, leaves in tree.items()}
    _SHAPES_CACHE[key] = as_shapes(params), as_shapes(state)
  return _SHAPES_CACHE[key]


def classifier_names(family: str, kwargs: Mapping[str, Any],
                     size: int = _TRACE_SIZE) -> list[tuple[str, str]]:
  """The `(module, param)` names whose shapes depend on `num_classes`."""
  one, _ = model_shapes(family, kwargs, 1, size)
  two, _ = model_shapes(family, kwargs, 2, size)
  return sorted((m, n) for m, leaves in one.items() for n, s in leaves.items()
                if two.get(m, {}).get(n) != s)


def checkpoint_classes(params: Mapping[str, Mapping[str, Any]],
                       head: Sequence[tuple[str, str]]) -> int | None:
  """The class count of params: the last axis of their classifier weights."""
  for m, n in head:
    w = params.get(m, {}).get(n)
    if w is not None and np.ndim(w) == 2:
      return int(np.shape(w)[-1])
  return None


def replace_classifier(params: Mapping[str, Mapping[str, Any]], family: str,
                       kwargs: Mapping[str, Any], num_classes: int, *,
                       seed: int = 0, size: int = _TRACE_SIZE
                       ) -> dict[str, dict[str, Any]]:
  """Params with a new classifier for `num_classes`, for fine-tuning.

  The classifier is every leaf whose shape depends on the class count
  (`classifier_names`): weights N(0, 0.01) (the families' default
  `fc_init`), biases zero; every other leaf is shared, not copied.

  Args:
    params: `{module: {param: array}}` of `family(**kwargs)`.
    family, kwargs: the model (a `models.MODELS` key and its arguments).
    num_classes: the new class count.
    seed: PRNG seed of the new weights.
    size: input side for tracing the model's shapes.

  Raises:
    ValueError: num_classes < 1.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  head = classifier_names(family, kwargs, size)
  want, _ = model_shapes(family, kwargs, num_classes, size)
  new = {m: dict(leaves) for m, leaves in params.items()}
  rng = jax.random.PRNGKey(seed)
  for k, (m, n) in enumerate(head):
    shape = want[m][n]
    new.setdefault(m, {})[n] = (
        np.asarray(jax.random.normal(jax.random.fold_in(rng, k), shape))
        * _CLASSIFIER_STDDEV if len(shape) >= 2
        else np.zeros(shape, np.float32))
  return new


def create_model(name: str | None = None, *,
                 pretrained: PathLike | None = None,
                 num_classes: int | None = None, seed: int = 0,
                 **model_kwargs: Any) -> Model:
  """Builds a named model, with weights from `pretrained` if given.

  Args:
    name: a registry name (`list_models()`); None: inferred from
      `pretrained` (an NFNet's variant, a workdir's config).
    pretrained: a checkpoint in any format of `detect_format` but
      'exported'; None: random initialization from `seed`.
    num_classes: classifier outputs. Default: the checkpoint's, else the
      name's (1000). A different count than the checkpoint's replaces its
      classifier (N(0, 0.01) weights, zero bias) for fine-tuning.
    seed: PRNG seed of a random initialization or a new classifier.
    **model_kwargs: constructor arguments overriding the name's (e.g.
      `conv_impl='split'`, or a custom `variant=`).

  Returns:
    The `Model` (callable on normalized NHWC images).

  Raises:
    ValueError: an unknown name, a checkpoint that names no model and no
      `name`, or (`ParamsMismatchError`) params that do not fit the model,
      listing every differing name and shape.
  """
  ckpt = None if pretrained is None else load_checkpoint(pretrained)
  if name is not None:
    spec = registry.get_spec(name)
  elif ckpt is not None and ckpt.spec is not None:
    spec = ckpt.spec
  else:
    where = "" if ckpt is None else f" ({ckpt.path}: params of no known model)"
    raise ValueError(f"create_model: no model name given and none can be "
                     f"inferred{where}; pass one of nfnets_jax.list_models()")
  kwargs = {**spec.kwargs, **model_kwargs}
  size = _TRACE_SIZE
  head = classifier_names(spec.family, kwargs, size)
  have = None if ckpt is None else checkpoint_classes(ckpt.params, head)
  base_classes = have or spec.num_classes
  classes = base_classes if num_classes is None else int(num_classes)
  if classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  net = make_network(spec.family, kwargs, classes)
  target = f"model {spec.name!r} ({spec.family}, {kwargs}"
  if ckpt is None:
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params, state = fast_compile.run_once(lambda x: net.init(
        jax.random.PRNGKey(seed), x, is_training=True), images)
    label_names = imagenet_label_names() if classes == 1000 else None
  else:
    want, want_state = model_shapes(spec.family, kwargs, base_classes, size)
    param_checks.compare_shapes(
        ckpt.params, want, source=f"checkpoint {ckpt.path}",
        target=f"{target}, num_classes={base_classes})")
    if want_state:
      param_checks.compare_shapes(
          ckpt.state, want_state, source=f"checkpoint {ckpt.path} (state)",
          target=f"{target}, num_classes={base_classes})")
    params, state = ckpt.params, ckpt.state
    label_names = ckpt.label_names
    if classes != base_classes:
      params = replace_classifier(params, spec.family, kwargs, classes,
                                  seed=seed, size=size)
      label_names = None
    elif label_names is None and classes == 1000:
      label_names = imagenet_label_names()
  if label_names is not None and len(label_names) != classes:
    label_names = None
  to_device = lambda tree: jax.tree.map(jnp.asarray, tree)
  return Model(name=spec.name, net=net, params=to_device(params),
               state=to_device(state), num_classes=classes,
               data_config=spec.data, family=spec.family,
               model_kwargs=kwargs, label_names=label_names)
