"""DeepMind's official NFNet files (read safely) and the safe `.npz` format.

The official release, `F0_haiku.npz` ... `F5_haiku.npz` and `F6_haiku.npz`
(F6 trained with SAM) from `https://storage.googleapis.com/dm-nfnets/`.
Despite the suffix they are not NumPy archives: each is a `dill` pickle of
the Haiku params tree `{module_name: {param_name: ndarray}}` (no state;
NFNets have none), saved under Haiku 0.0.3. Haiku of that time pickled its
immutable mappings as `haiku._src.data_structures.frozendict(dict)`, later
versions as `FlatMapping(dict)` (both are accepted), and `dill` writes each
array as `dill._dill._create_array(numpy.core.multiarray._reconstruct,
...)`.
`load_pretrained` reads them with a restricted unpickler that resolves only
those mapping and NumPy array globals (to local, side-effect-free stand-ins)
and refuses every other global with `UnsafeCheckpointError`, so a
checkpoint can never run code. Convert once to a plain `.npz` of flat names
`"<module>/<param>"` (read with `allow_pickle=False`)::

    nfnets-convert convert F0_haiku.npz F0.npz

timm's PyTorch port (`dm_nfnet_*`) lives in `pretrained.timm`, the checks
against the model in `pretrained.checks`.

Reference: [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale
Image Recognition Without Normalization (ICML).
"""
from __future__ import annotations

import _compat_pickle
from collections.abc import Mapping
import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from nfnets_jax.models import nfnet
from nfnets_jax.pretrained import checks

Params = checks.Params
PathLike = str | os.PathLike

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A checkpoint pickle referenced a global that is not on the allowlist.

  Attributes:
    module, name: the refused global.
    path: the file (or '<bytes>').
  """

  def __init__(self, module: str, name: str, path: str = "<bytes>",
               why: str = ""):
    self.module, self.name, self.path, self.why = module, name, path, why
    super().__init__(
        f"{path}: refusing to unpickle global {module}.{name}"
        f"{' (' + why + ')' if why else ''}. A params checkpoint may only "
        "contain NumPy arrays inside plain or Haiku mappings; this file "
        "asked for something else and may be malicious. Nothing from it was "
        "called.")



# ----------------------------------------------------------------------------
# Restricted unpickling of the official files.
# ----------------------------------------------------------------------------


class _LegacyMapping(dict):
  """Local stand-in for Haiku's pickled mapping classes.

  Old Haiku pickled its immutable mappings as `frozendict(storage_dict)` or
  `FlatMapping(dict)` (REDUCE with one mapping argument); this class is
  called instead and is converted to a plain `dict` after loading.
  """

  def __setstate__(self, state: Any) -> None:
    # Only reached by hand-written pickles that build the object with NEWOBJ
    # + BUILD; accept the slot state of frozendict/FlatMapping holding a dict.
    dict_state, slots = (state if isinstance(state, tuple) and len(state) == 2
                         else (state, None))
    for part in (dict_state, slots):
      if isinstance(part, Mapping):
        for key in ("_storage", "_mapping"):
          if isinstance(part.get(key), Mapping):
            self.update(part[key])
            return
    raise pickle.UnpicklingError(
        f"unsupported pickled Haiku mapping state of type {type(state)}")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
  """`copyreg._reconstructor`, admitted only for the mapping stand-in."""
  if cls is not _LegacyMapping or base not in (dict, object):
    raise UnsafeCheckpointError("copyreg", "_reconstructor",
                                why=f"for class {cls!r}")
  obj = _LegacyMapping()
  if isinstance(state, Mapping):
    obj.update(state)
  return obj


def _create_array(f: Any, args: tuple, state: Any, npdict: Any = None
                  ) -> np.ndarray:
  """`dill._dill._create_array`, which dill uses for every ndarray."""
  if f is not _NP_RECONSTRUCT:
    raise UnsafeCheckpointError("dill._dill", "_create_array",
                                why=f"with constructor {f!r}")
  array = f(*args)
  array.__setstate__(state)
  if npdict:
    raise pickle.UnpicklingError(
        f"pickled array carries instance attributes {sorted(npdict)}; plain "
        "ndarrays have none")
  return array


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
  """`_codecs.encode`, how protocol-2 pickles store bytes (latin-1 only)."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError("_codecs", "encode",
                                why=f"with encoding {encoding!r}")
  return text.encode("latin1")


# Version-independent handles on NumPy's array/scalar reconstructors (their
# module moved from numpy.core to numpy._core in NumPy 2).
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_HAIKU_MODULES = ("haiku._src.data_structures", "haiku.data_structures")
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, n): _LegacyMapping for m in _HAIKU_MODULES
       for n in ("frozendict", "FlatMapping", "FlatMap")},
    ("collections", "OrderedDict"): _LegacyMapping,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("dill._dill", "_create_array"): _create_array,
    ("dill.dill", "_create_array"): _create_array,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _NP_RECONSTRUCT
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _NP_SCALAR
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _NP_FROMBUFFER
       for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only NumPy arrays inside plain/Haiku mappings.

  `find_class` resolves the globals in `_ALLOWED_GLOBALS` (mapping classes to
  a local dict stand-in, NumPy's array and dtype reconstructors, and guarded
  versions of the helpers dill and protocol 2 use for arrays and bytes) and
  raises `UnsafeCheckpointError` for any other, before anything is called.
  Haiku itself is never imported.
  """

  def __init__(self, file: BinaryIO, path: str = "<bytes>"):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    # Python 2 names in protocol <= 2 pickles (`__builtin__`, `copy_reg`);
    # the stock find_class does this mapping itself.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(module, name, self._path) from None

  def load(self) -> Any:
    try:
      return super().load()
    except UnsafeCheckpointError as e:
      if e.path == self._path:
        raise
      # Raised inside a guarded helper, which does not know the file.
      raise UnsafeCheckpointError(e.module, e.name, self._path, e.why
                                  ) from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(
        f"{self._path}: pickle uses persistent id {pid!r}; not a params file")


def restricted_loads(data: bytes, path: str = "<bytes>") -> Any:
  """Unpickles `data` with `RestrictedUnpickler` (see there)."""
  return RestrictedUnpickler(io.BytesIO(data), path).load()


# ----------------------------------------------------------------------------
# Params trees: validation, flattening.
# ----------------------------------------------------------------------------


def _as_leaf(value: Any, where: str) -> np.ndarray:
  if isinstance(value, np.generic):
    value = np.asarray(value)
  if not isinstance(value, np.ndarray):
    raise ValueError(f"{where}: expected a NumPy array, got "
                     f"{type(value).__name__}")
  if value.dtype.kind not in "biuf":
    raise ValueError(f"{where}: array has dtype {value.dtype}; params must be "
                     "numeric")
  return value


def _to_params(tree: Any, source: str) -> Params:
  """Checks a loaded tree is `{module: {param: array}}`; returns plain dicts.

  A flat `{"module/param": array}` mapping is unflattened.
  """
  if not isinstance(tree, Mapping):
    raise ValueError(f"{source}: expected a mapping of module names to "
                     f"parameter mappings, got {type(tree).__name__}")
  if tree and all(not isinstance(v, Mapping) for v in tree.values()):
    return unflatten_params(tree, source)
  params: Params = {}
  for module, leaves in tree.items():
    if not isinstance(module, str) or not isinstance(leaves, Mapping):
      raise ValueError(f"{source}: entry {module!r} should map a module name "
                       f"to a mapping of params, got {type(leaves).__name__}")
    params[module] = {}
    for name, value in leaves.items():
      if not isinstance(name, str):
        raise ValueError(f"{source}: {module}: parameter name {name!r} is not "
                         "a string")
      params[module][name] = _as_leaf(value, f"{source}: {module}/{name}")
  return params


def flatten_params(params: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, np.ndarray]:
  """`{module: {param: x}}` -> `{"module/param": np.ndarray}` (npz names)."""
  return {f"{m}/{n}": np.asarray(v) for m, leaves in params.items()
          for n, v in leaves.items()}


def unflatten_params(flat: Mapping[str, Any], source: str = "params"
                     ) -> Params:
  """Inverse of `flatten_params`: splits each name at its last '/'."""
  params: Params = {}
  for key, value in flat.items():
    if not isinstance(key, str) or "/" not in key:
      raise ValueError(f"{source}: flat parameter name {key!r} should be "
                       "'<module>/<param>'")
    module, name = key.rsplit("/", 1)
    params.setdefault(module, {})[name] = _as_leaf(value, f"{source}: {key}")
  return params


def save_npz(params: Mapping[str, Mapping[str, Any]], path: PathLike) -> str:
  """Saves params as an uncompressed `.npz` of flat names (the safe format).

  Args:
    params: `{module: {param: array}}`.
    path: output file; '.npz' is appended if missing (as `np.savez` does).

  Returns:
    The path written.
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    path += ".npz"
  np.savez(path, **flatten_params(params))
  return path


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def _load_npy_pickle(f: BinaryIO, path: str) -> Any:
  """An `.npy` holding an object array (`np.save(dict)`): its pickle part."""
  version = np.lib.format.read_magic(f)
  header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)(f)
  shape, _, dtype = header
  if not dtype.hasobject:
    raise ValueError(f"{path}: a single .npy array of shape {shape}, not a "
                     "params tree")
  array = RestrictedUnpickler(f, path).load()
  if not isinstance(array, np.ndarray) or array.shape != ():
    raise ValueError(f"{path}: .npy object array of shape "
                     f"{getattr(array, 'shape', None)}; expected one tree")
  return array.item()


def load_pretrained(path: PathLike,
                    variant: str | nfnet.NFNetVariant | None = None, *,
                    num_classes: int | None = None
                    ) -> tuple[Params, dict[str, Any]]:
  """Loads NFNet params from an official checkpoint or a converted `.npz`.

  Accepted formats, told apart by their first bytes:
    * the official `F{0..6}_haiku.npz` (a dill pickle of Haiku mappings;
      unpickled by `RestrictedUnpickler`, which cannot run code);
    * a real `.npz` of flat names `"<module>/<param>"` (`save_npz`, or
      `nfnets-convert convert`), read with
      `allow_pickle=False`;
    * an `.npy` object array of the tree (`np.save(path, params)`), its
      pickle part read by `RestrictedUnpickler`.

  Args:
    path: the checkpoint file.
    variant: if given ('F0', ..., 'F7+', or timm's 'dm_nfnet_f0'), check the
      names and shapes against `nfnet.NFNet(num_classes, variant)` and raise
      `ParamsMismatchError` listing every difference. None: no model check
      (params of a custom model load as they are).
    num_classes: classifier width for the check; default: read from the
      params' `NFNet/~/linear`.

  Returns:
    `(params, state)`: params `{module: {param: np.ndarray}}` in Haiku's
    layout (conv kernels HWIO, gains `[out]`, linear `[in, out]`), and
    `state = {}` (NFNets have no state).

  Raises:
    UnsafeCheckpointError: the pickle references a global outside the
      allowlist (nothing is called).
    ValueError: unreadable file or a tree that is not `{module: {param:
      array}}`; `ParamsMismatchError` on a failed `variant` check.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    magic = f.read(8)
    f.seek(0)
    if magic.startswith(_ZIP_MAGIC):
      try:
        with np.load(f, allow_pickle=False) as npz:
          flat = {k: npz[k] for k in npz.files}
      except ValueError as e:  # e.g. object arrays: refused, never unpickled
        raise ValueError(f"{path}: {e}") from e
      tree = unflatten_params(flat, path)
    elif magic.startswith(_NPY_MAGIC):
      tree = _load_npy_pickle(f, path)
    else:
      try:
        tree = RestrictedUnpickler(f, path).load()
      except UnsafeCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: neither a NumPy .npz nor a pickled params "
                         f"tree (first bytes {magic!r}): "
                         f"{type(e).__name__}: {e}") from e
  params = _to_params(tree, path)
  if variant is not None:
    checks.check_params(params, variant, num_classes=num_classes,
                        source=path)
  return params, {}

