"""A model's eval forward and weights as one serialized `jax.export` file.

    nj.export(model, "f0.nfx")              # batch size left symbolic
    predict = nj.load_exported("f0.nfx")    # no model code needed
    logits = predict(images)                # [N, S, S, 3] -> [N, classes]

The file is `MAGIC`, an 8-byte little-endian header length, a UTF-8 JSON
header (model name, class count, input size, batch size, data config, label
names), then `jax.export.Exported.serialize()` of the jitted forward with
the params and state closed over as constants and the weights standardized
once (`Model.kernels`): the artifact does no weight standardization. Any JAX
program can run the artifact without this package: skip the header and call
`jax.export.deserialize(blob).call(images)`.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.pretrained import registry

MAGIC = b"NFNETS_JAX_EXPORT\n"
FORMAT_VERSION = 1
PathLike = str | os.PathLike


class Exportable(Protocol):
  """What `export` needs of a model (`pretrained.create.Model` has it)."""
  name: str
  params: Any
  state: Any
  num_classes: int
  data_config: registry.DataConfig
  label_names: Sequence[str] | None

  def forward(self, params: Any, state: Any, images: jax.Array,
              kernels: Any = None) -> Any:
    ...

  def kernels(self) -> Any:
    ...


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A loaded artifact: `model(images)` -> logits, plus what it was.

  Attributes:
    name, num_classes, data_config, label_names: as the exported model's.
    batch_size: the fixed batch size, or None (any batch size).
    exported: the `jax.export.Exported`.
  """
  name: str
  num_classes: int
  data_config: registry.DataConfig
  label_names: tuple[str, ...] | None
  batch_size: int | None
  exported: jax.export.Exported

  def __call__(self, images: Any) -> Any:
    """Logits `[N, num_classes]` of normalized `[N, S, S, 3]` images (a
    `features_only` model's list of feature maps)."""
    return self.exported.call(jnp.asarray(images, jnp.float32))

  def preprocess(self, image: np.ndarray | str | os.PathLike) -> np.ndarray:
    """One `[H, W, 3]` 0-255 RGB image, or an image file's path, -> the
    model's eval input (`DataConfig.preprocess`)."""
    return self.data_config.preprocess(image)


def export(model: Exportable, path: PathLike, batch_size: int | None = None,
           *, platforms: Sequence[str] | None = None) -> str:
  """Writes `model`'s eval-mode forward with its weights to `path`.

  Args:
    model: a `Model` of `nfnets_jax.create_model`.
    path: the output file.
    batch_size: a fixed batch size, or None for a symbolic one (any N).
    platforms: lowering platforms, e.g. ('cpu', 'cuda'); default: the
      current backend.

  Returns:
    The path written.

  Raises:
    ValueError: batch_size < 1.
  """
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1 (or None)")
  size = model.data_config.test_size
  params, state, kernels = model.params, model.state, model.kernels()
  batch = (jax.export.symbolic_shape("b")[0] if batch_size is None
           else batch_size)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  exported = jax.export.export(
      jax.jit(lambda x: model.forward(params, state, x, kernels)),
      platforms=platforms)(images)
  header = json.dumps({
      "format_version": FORMAT_VERSION, "name": model.name,
      "num_classes": model.num_classes, "image_size": size,
      "batch_size": batch_size,
      "data_config": model.data_config.to_dict(),
      "label_names": (None if model.label_names is None
                      else list(model.label_names)),
      "jax_version": jax.__version__,
  }).encode()
  path = os.fspath(path)
  with open(path, "wb") as f:
    f.write(MAGIC + len(header).to_bytes(8, "little") + header)
    f.write(exported.serialize())
  return path


def is_exported(path: PathLike) -> bool:
  """Whether `path` is a file that starts with `MAGIC`."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(len(MAGIC)) == MAGIC


def load_exported(path: PathLike) -> ExportedModel:
  """Reads an artifact of `export`.

  Raises:
    ValueError: not an export of this package, or of a newer format.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(MAGIC):
    raise ValueError(f"{path}: not an nfnets_jax export (does not start "
                     f"with {MAGIC!r})")
  start = len(MAGIC) + 8
  length = int.from_bytes(data[len(MAGIC):start], "little")
  try:
    header = json.loads(data[start:start + length])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt export header: {e}") from e
  if header.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: export format {header.get('format_version')}"
                     f" is not {FORMAT_VERSION}")
  labels = header["label_names"]
  return ExportedModel(
      name=header["name"], num_classes=int(header["num_classes"]),
      data_config=registry.DataConfig.from_dict(header["data_config"]),
      label_names=None if labels is None else tuple(labels),
      batch_size=header["batch_size"],
      exported=jax.export.deserialize(bytearray(data[start + length:])))
