"""`nfnets-predict`'s cache of traced forwards, beside JAX's compilation cache.

JAX's persistent cache spares a new process the compiling, not the tracing:
each `nfnets-predict` traced its model for the parameter shapes it checks
the checkpoint against, then the forward and the weight standardization
(dm_nfnet_f0: 0.45 s and about 0.6 s of a 4.2 s run). This cache keeps
what a successful `create_model` found (name, class count, input geometry)
and its forward for each batch size run, serialized by `jax.export` with
the weights as arguments (standardized inside; a concrete batch size: a
symbolic one cost 0.37 s of shape refinement per run), under a key of
everything these follow from:

  - the checkpoint's format, its model (`Checkpoint.spec`) and its layout:
    every array's name, shape and dtype, not the values;
  - `--model`;
  - the convolution lowering, JAX's version and backend, and the package's
    source (a hash of its `.py` files).

A run whose key is cached loads the forward instead of tracing anything
(its compiled program then comes from the compilation cache); any other
run builds the model with `create_model`, which checks the checkpoint, and
adds the entry. Class names are read afresh each run. Entries are written
whole (a temporary file, then a rename); one that cannot be read is built
again.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from nfnets_jax.cpu import compiler
from nfnets_jax.cpu import lowering
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import registry

SUBFOLDER = "nfnets_jax_forwards"  # Inside the compilation cache's folder.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
  """SHA-256 of the package's `.py` files (relative paths and contents)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(_PACKAGE):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _layout(tree: dict[str, dict[str, Any]]) -> list[list[Any]]:
  return [[module, name, list(x.shape), str(x.dtype)]
          for module in sorted(tree)
          for name, x in sorted(tree[module].items())]


def entry_key(ckpt: create.Checkpoint, model_name: str | None,
              conv_impl: str) -> str:
  """The cache key of a checkpoint's forward (see the module docstring)."""
  payload = json.dumps({
      "format": ckpt.format, "spec": repr(ckpt.spec), "model": model_name,
      "params": _layout(ckpt.params), "state": _layout(ckpt.state),
      "conv_impl": conv_impl, "backend": jax.default_backend(),
      "jax": jax.__version__, "source": source_fingerprint()})
  return hashlib.sha256(payload.encode()).hexdigest()


def export_forward(model: create.Model, batch: int) -> jax.export.Exported:
  """`model`'s eval forward of `(params, state, images)`, weights
  standardized inside, for `[batch, S, S, 3]` float32 images."""
  size = model.data_config.test_size
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)

  def forward(params: Any, state: Any, images: jax.Array) -> Any:
    return model.forward(params, state, images,
                         model.standardize(params, state))

  return jax.export.export(jax.jit(forward))(
      jax.tree.map(spec, model.params), jax.tree.map(spec, model.state),
      jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))


def _read(path: str, load: Callable[[bytes], Any]) -> Any:
  """`load` of a cache file's bytes, or None: missing or unreadable."""
  try:
    with open(path, "rb") as f:
      return load(f.read())
  except Exception:  # pylint: disable=broad-except
    return None  # Built again.


def _write(path: str, data: bytes) -> None:
  """Writes a cache file whole (a temporary file, then a rename); a cache
  that cannot be written stays empty."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
      with os.fdopen(handle, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError:
    pass


@dataclasses.dataclass(eq=False)
class CachedPredictor:
  """A checkpoint's model, forwards from the cache: `predictor(images)` ->
  logits `[N, num_classes]` of normalized `[N, S, S, 3]` images.

  Attributes:
    name, num_classes, data_config, label_names: as `create_model`'s
      `Model` of the checkpoint.
  """
  name: str
  num_classes: int
  data_config: registry.DataConfig
  label_names: tuple[str, ...] | None
  _folder: str
  _key: str
  _ckpt: create.Checkpoint
  _model_name: str | None
  _model: create.Model | None
  _programs: dict[int, Any] = dataclasses.field(default_factory=dict)
  _device_weights: tuple[Any, Any] | None = None

  def __call__(self, images: Any) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    if batch not in self._programs:
      self._programs[batch] = compiler.jit(self._exported(batch).call)
    return self._programs[batch](*self._weights(), images)

  def _weights(self) -> tuple[Any, Any]:
    """`(params, state)` on the device (the built model's, if built)."""
    if self._model is not None:
      return self._model.params, self._model.state
    if self._device_weights is None:
      self._device_weights = jax.device_put((self._ckpt.params,
                                             self._ckpt.state))
    return self._device_weights

  def _exported(self, batch: int) -> jax.export.Exported:
    """The forward for `batch` images: cached, else exported and cached."""
    path = os.path.join(self._folder, f"{self._key}.{batch}.jaxexport")
    found = _read(path, lambda b: jax.export.deserialize(bytearray(b)))
    if found is None:
      if self._model is None:
        self._model = build(self._ckpt, self._model_name)
      with lowering.conv_impl(lowering.resolved_inference_conv_impl()):
        program = export_forward(self._model, batch).serialize()
      _write(path, program)
      # What a later run reads, so that it compiles to the same program.
      found = jax.export.deserialize(program)
    return found


def build(ckpt: create.Checkpoint, model_name: str | None) -> create.Model:
  """`create_model` of a checkpoint read already (it checks the params)."""
  return create.create_model(model_name, pretrained=ckpt)


def load_predictor(folder: str, pretrained: str, model_name: str | None
                   ) -> CachedPredictor:
  """The model of checkpoint `pretrained`, with what the cache in `folder`
  knows of it (else built by `create_model` and cached).

  Raises:
    As `create.load_checkpoint` and `create.create_model`.
  """
  ckpt = create.load_checkpoint(pretrained)
  key = entry_key(ckpt, model_name, lowering.resolved_inference_conv_impl())
  path = os.path.join(folder, f"{key}.json")
  meta, model = _read(path, json.loads), None
  if meta is None:
    model = build(ckpt, model_name)
    meta = {"name": model.name, "num_classes": model.num_classes,
            "data_config": model.data_config.to_dict()}
    _write(path, json.dumps(meta).encode())
  classes = int(meta["num_classes"])
  return CachedPredictor(
      name=meta["name"], num_classes=classes,
      data_config=registry.DataConfig.from_dict(meta["data_config"]),
      label_names=create.resolve_label_names(ckpt.label_names, classes),
      _folder=folder, _key=key, _ckpt=ckpt, _model_name=model_name,
      _model=model)
