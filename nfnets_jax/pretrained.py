"""Pretrained NFNet weights: DeepMind's official files and timm's `dm_nfnet_*`.

Two sources of ImageNet weights map 1:1 onto `nfnets_jax.NFNet` parameters:

* The official release, `F0_haiku.npz` ... `F5_haiku.npz` and `F6_haiku.npz`
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

      python -m nfnets_jax.convert_checkpoint convert F0_haiku.npz F0.npz

* timm's PyTorch port, `timm.create_model('dm_nfnet_f0' ... 'dm_nfnet_f6')`:
  `from_timm_state_dict` renames and transposes its state dict.

timm's forward differs from the official one in two places, both inside
operations whose parameters are shared, so the same weights give slightly
different logits under the two definitions:

* Weight standardization: timm (`ScaledStdConv2dSame`, `NfCfg.std_conv_eps =
  1e-5`, not overridden for `dm_nfnet_*`) computes
  `(W - mean) * rsqrt(var + 1e-5) / sqrt(fan_in)`; the official release
  `(W - mean) * rsqrt(max(var * fan_in, 1e-4))`. The official floor is
  inactive for any sane kernel (var * fan_in ~ 1), timm's additive eps is not:
  for a 1536-fan-in 1x1 conv, var ~ 1 / 1536 and 1e-5 shifts the scale by
  ~0.8%.
* GELU: timm's `gelu` is PyTorch's exact (erf) GELU; the official release
  uses JAX's default tanh approximation. gamma (1.7015...) is the same.

`TIMM_NFNET_KWARGS` builds an `NFNet` whose forward equals timm's; on a
randomly initialised, perturbed `dm_nfnet_f0` (2 images, 64 and 66 px) the
logits differ by max |diff| = 1.1e-6 and 1.4e-6 of the largest logit.
`OFFICIAL_NFNET_KWARGS` (the `NFNet` defaults) is the official forward; on
the same weights it is 3.6e-2 of the largest logit away from timm's (the
eps accounts for 3.6e-2, the GELU form alone for 4e-4; the predicted class
agrees). How far apart the two are for the released weights depends on
their kernel variances and was not measured here (nothing can be
downloaded).

Everything else agrees: timm's TF-style dynamic SAME padding of stride-2
convs equals XLA's 'SAME', and its `AvgPool2d(2, 2, ceil_mode=True,
count_include_pad=False)` shortcut pool equals Haiku's SAME `avg_pool` (which
also excludes padding), for even and odd sizes alike (the 66 px test runs
33 -> 17 -> 9 -> 5 -> 3 px maps); gamma sits inside the activation as in the
official model (`gamma_in_act=True`); timm's SE width
`make_divisible(0.5 * ch, 8)` equals the official `int(0.5 * ch)` for every
`dm_nfnet_*` stage width.

Reference: [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale
Image Recognition Without Normalization (ICML).
"""
from __future__ import annotations

import _compat_pickle
from collections.abc import Iterable, Mapping
import functools
import io
import os
import pickle
import re
from typing import Any, BinaryIO

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import nfnet

Params = dict[str, dict[str, np.ndarray]]
PathLike = str | os.PathLike

# The NFNet's top module name in official checkpoints and in `nfnet.NFNet`.
PREFIX = "NFNet"

# Keyword arguments of `nfnet.NFNet` whose forward equals timm's dm_nfnet_*.
TIMM_NFNET_KWARGS: dict[str, Any] = {
    "activation": "gelu_exact", "ws_eps": 1e-5, "ws_eps_mode": "add"}
# ... and those of the official release (the `nfnet.NFNet` defaults).
OFFICIAL_NFNET_KWARGS: dict[str, Any] = {
    "activation": "gelu", "ws_eps": 1e-4, "ws_eps_mode": "clamp"}

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


class ParamsMismatchError(ValueError):
  """Params do not have the names/shapes of the requested NFNet."""


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
      `python -m nfnets_jax.convert_checkpoint convert`), read with
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
    check_params(params, variant, num_classes=num_classes, source=path)
  return params, {}


# ----------------------------------------------------------------------------
# Checking against the model, inferring the variant, fine-tuning heads.
# ----------------------------------------------------------------------------


def _canonical_variant(variant: str) -> str:
  """'dm_nfnet_f0' (timm) -> 'F0'; other names unchanged."""
  match = re.fullmatch(r"dm_nfnet_(f\d)", variant)
  return match.group(1).upper() if match else variant


@functools.lru_cache(maxsize=16)
def _expected_shapes(variant: nfnet.NFNetVariant, num_classes: int,
                     model_kwargs: tuple[tuple[str, Any], ...]
                     ) -> dict[str, dict[str, tuple[int, ...]]]:
  def forward(x):
    return nfnet.NFNet(num_classes, variant, **dict(model_kwargs))(
        x, is_training=False)
  init = hk.transform(forward).init
  shapes = jax.eval_shape(init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return {m: {n: tuple(s.shape) for n, s in leaves.items()}
          for m, leaves in shapes.items()}


def expected_param_shapes(
    variant: str | nfnet.NFNetVariant | Mapping[str, Any],
    num_classes: int = 1000, **model_kwargs: Any
) -> dict[str, dict[str, tuple[int, ...]]]:
  """Param names and shapes of `nfnet.NFNet(num_classes, variant, ...)`.

  Computed with `jax.eval_shape` (nothing is allocated) and cached.

  Args:
    variant: as `nfnet.NFNet` takes it, or timm's 'dm_nfnet_f0' ....
    num_classes: classifier outputs.
    **model_kwargs: other `nfnet.NFNet` arguments.

  Returns:
    `{module: {param: shape}}`.
  """
  if isinstance(variant, str):
    variant = _canonical_variant(variant)
  return _expected_shapes(nfnet.get_variant(variant), num_classes,
                          tuple(sorted(model_kwargs.items())))


def head_classes(params: Mapping[str, Mapping[str, Any]]) -> int | None:
  head = params.get(f"{PREFIX}/~/linear", {})
  w = head.get("w")
  return None if w is None or np.ndim(w) != 2 else int(np.shape(w)[1])


def check_params(params: Mapping[str, Mapping[str, Any]],
                 variant: str | nfnet.NFNetVariant | Mapping[str, Any], *,
                 num_classes: int | None = None, source: str = "params",
                 **model_kwargs: Any) -> None:
  """Checks params have exactly the names and shapes of an NFNet.

  Args:
    params: `{module: {param: array}}`.
    variant: NFNet variant ('F0' ... 'F7+', 'dm_nfnet_f0' ..., or a custom
      `nfnet.NFNetVariant` / mapping).
    num_classes: classifier outputs; default: from `NFNet/~/linear/w`, else
      1000.
    source: what to name in the error (a file path).
    **model_kwargs: other shape-changing `nfnet.NFNet` arguments (`width`,
      `se_ratio`, `group_size`, `final_conv_mult`, `use_two_convs`).

  Raises:
    ParamsMismatchError: listing missing, unexpected and mis-shaped
      `module/param` names (with both shapes).
  """
  if num_classes is None:
    num_classes = head_classes(params) or 1000
  expected = expected_param_shapes(variant, num_classes, **model_kwargs)
  got = {f"{m}/{n}": tuple(np.shape(v)) for m, leaves in params.items()
         for n, v in leaves.items()}
  want = {f"{m}/{n}": s for m, leaves in expected.items()
          for n, s in leaves.items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if not (missing or unexpected or misshaped):
    return

  def listing(title, names, fmt=str, limit=12):
    if not names:
      return []
    more = ([f"    ... and {len(names) - limit} more"]
            if len(names) > limit else [])
    return ([f"  {title} ({len(names)}):"]
            + [f"    {fmt(k)}" for k in names[:limit]] + more)

  lines = (listing("missing", missing)
           + listing("unexpected", unexpected)
           + listing("mis-shaped", misshaped,
                     lambda k: f"{k}: got {got[k]}, expected {want[k]}"))
  raise ParamsMismatchError(
      f"{source} does not match NFNet variant={variant!r}, "
      f"num_classes={num_classes}"
      + (f", {model_kwargs}" if model_kwargs else "") + ":\n"
      + "\n".join(lines))


_BLOCK_RE = re.compile(rf"^{PREFIX}/~/nf_block(?:_(\d+))?$")


def infer_variant(params: Mapping[str, Mapping[str, Any]]) -> str:
  """Names the NFNet variant whose depths and widths the params have.

  Blocks are counted from `NFNet/~/nf_block[_k]`; a stage starts at each block
  with a `conv_shortcut`; its width is that block's `conv2` output width.
  F6 and F6+SAM share an architecture ('F6').

  Raises:
    ValueError: no blocks, non-contiguous block indices, or depths/widths of
      no known variant (both are given in the message).
  """
  indices = sorted(int(m.group(1) or 0) for m in map(_BLOCK_RE.match, params)
                   if m)
  if not indices:
    raise ValueError(f"no '{PREFIX}/~/nf_block*' modules in params; first "
                     f"names: {sorted(params)[:5]}")
  if indices != list(range(len(indices))):
    raise ValueError(f"NFNet block indices are not contiguous: {indices}")
  block = lambda k: f"{PREFIX}/~/nf_block" + (f"_{k}" if k else "")
  starts = [k for k in indices if f"{block(k)}/~/conv_shortcut" in params]
  if not starts or starts[0] != 0:
    raise ValueError("the first NFNet block has no conv_shortcut; cannot find "
                     "stage boundaries")
  depth = tuple(np.diff(starts + [len(indices)]).tolist())
  try:
    width = tuple(int(np.shape(params[f"{block(k)}/~/conv2"]["w"])[-1])
                  for k in starts)
  except KeyError as e:
    raise ValueError(f"params lack a block's conv2/w: {e}") from None
  for name, v in nfnet.NFNET_VARIANTS.items():
    if v.depth == depth and v.width == width:
      return name
  raise ValueError(f"params have stage depths {depth} and widths {width}, "
                   f"which match no NFNet variant of "
                   f"{', '.join(nfnet.NFNET_VARIANTS)} (see "
                   "nfnet.NFNET_VARIANTS)")


def replace_head(params: Mapping[str, Mapping[str, Any]], num_classes: int,
                 rng: jax.Array, *, stddev: float = 0.01) -> Params:
  """Re-initializes the classifier `NFNet/~/linear` for `num_classes` outputs.

  For fine-tuning a pretrained NFNet on a new label set. The new weights are
  N(0, stddev) as `NFNet`'s default `fc_init` (stddev=0 gives zeros), the
  bias zeros; every other module is shared, not copied.

  Args:
    params: `{module: {param: array}}` with `NFNet/~/linear/w` `[in, C]`.
    num_classes: new class count.
    rng: a JAX PRNG key.
    stddev: weight init standard deviation.

  Returns:
    New params with `NFNet/~/linear` = `{'w': [in, num_classes], 'b':
    [num_classes]}` (float32).
  """
  head = f"{PREFIX}/~/linear"
  if head not in params or "w" not in params[head]:
    raise ValueError(f"params have no '{head}/w' to replace; modules: "
                     f"{sorted(params)[-3:]}")
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  in_features = int(np.shape(params[head]["w"])[0])
  w = jax.random.normal(rng, (in_features, num_classes), jnp.float32) * stddev
  new = {m: leaves for m, leaves in params.items()}
  new[head] = {"w": np.asarray(w),
               "b": np.zeros((num_classes,), np.float32)}
  return new


# ----------------------------------------------------------------------------
# timm's dm_nfnet_* state dicts.
# ----------------------------------------------------------------------------

_TIMM_CONVS = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b",
               "conv3": "conv2", "downsample.conv": "conv_shortcut"}
_TIMM_SE = {"attn_last.fc1": "squeeze_excite/~/linear",
            "attn_last.fc2": "squeeze_excite/~/linear_1"}
_TIMM_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")


def timm_param_names(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
  """Maps timm `dm_nfnet_*` state-dict keys to Haiku `(module, param)` names.

  `stem.conv1..4` -> `stem_conv0..3`; `stages.S.B.*` -> the B-th block of
  stage S, whose global index k (blocks counted over all stages in order)
  names the module `nf_block` (k = 0) or `nf_block_k`, with `conv1, conv2,
  conv2b, conv3, downsample.conv` -> `conv0, conv1, conv1b, conv2,
  conv_shortcut`, `attn_last.fc1/fc2` -> `squeeze_excite/~/linear(_1)` and
  `skipinit_gain` -> `skip_gain`; `final_conv`, `head.fc` -> `linear`.
  Conv params `weight, gain, bias` -> `w, gain, bias`; linear `weight, bias`
  -> `w, b`.

  Raises:
    ValueError: listing keys that are not part of a `dm_nfnet_*` model, or
      non-contiguous stage/block indices.
  """
  keys = list(keys)
  blocks = sorted({(int(m.group(1)), int(m.group(2)))
                   for m in map(_TIMM_BLOCK_RE.match, keys) if m})
  stages = sorted({s for s, _ in blocks})
  if stages != list(range(len(stages))):
    raise ValueError(f"timm state dict has stages {stages}; expected 0..N-1")
  for s in stages:
    got = [b for t, b in blocks if t == s]
    if got != list(range(len(got))):
      raise ValueError(f"timm state dict stage {s} has blocks {got}; "
                       "expected 0..N-1")
  global_index = {sb: k for k, sb in enumerate(blocks)}

  def conv(module, param):
    return {"weight": (module, "w"), "gain": (module, "gain"),
            "bias": (module, "bias")}.get(param)

  def linear(module, param):
    return {"weight": (module, "w"), "bias": (module, "b")}.get(param)

  names, unknown = {}, []
  for key in keys:
    target = None
    head, _, param = key.rpartition(".")
    if m := re.fullmatch(r"stem\.conv([1-4])", head):
      target = conv(f"{PREFIX}/~/stem_conv{int(m.group(1)) - 1}", param)
    elif head == "final_conv":
      target = conv(f"{PREFIX}/~/final_conv", param)
    elif head == "head.fc":
      target = linear(f"{PREFIX}/~/linear", param)
    elif m := _TIMM_BLOCK_RE.match(key):
      k = global_index[(int(m.group(1)), int(m.group(2)))]
      block = f"{PREFIX}/~/nf_block" + (f"_{k}" if k else "")
      rest = m.group(3)
      sub, _, param = rest.rpartition(".")
      if rest == "skipinit_gain":
        target = (block, "skip_gain")
      elif sub in _TIMM_CONVS:
        target = conv(f"{block}/~/{_TIMM_CONVS[sub]}", param)
      elif sub in _TIMM_SE:
        target = linear(f"{block}/~/{_TIMM_SE[sub]}", param)
    if target is None:
      unknown.append(key)
    else:
      names[key] = target
  if unknown:
    raise ValueError(
        f"{len(unknown)} state-dict keys are not part of a timm dm_nfnet_* "
        f"model (timm's own nfnet_*/eca_nfnet_* are different networks): "
        f"{unknown[:10]}")
  return names


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if value.dtype.kind not in "biuf":
    raise ValueError(f"state dict {key!r}: dtype {value.dtype} is not numeric")
  return value


def from_timm_state_dict(state_dict: Mapping[str, Any],
                         variant: str | None = None
                         ) -> tuple[Params, dict[str, Any]]:
  """Converts timm `dm_nfnet_f0` ... `dm_nfnet_f6` weights to NFNet params.

  Build the model with `nfnet.NFNet(num_classes, variant,
  **TIMM_NFNET_KWARGS)` to reproduce timm's logits (its weight
  standardization eps and exact GELU; see the module docstring); the
  official settings give logits within a few % of those.

  Args:
    state_dict: `model.state_dict()` of a timm `dm_nfnet_*` model: key ->
      np.ndarray or torch.Tensor (any device; floats become float32).
    variant: 'F0' ... 'F6' (or 'dm_nfnet_f0' ...): if given, names and shapes
      are checked against `nfnet.NFNet` (`ParamsMismatchError`). Stage/block
      structure is read from the keys either way.

  Returns:
    `(params, {})`: params `{module: {param: np.ndarray}}` with conv kernels
    OIHW -> HWIO, gains `[out, 1, 1, 1]` -> `[out]`, SE 1x1 convs
    `[out, in, 1, 1]` and the head `[out, in]` -> `[in, out]`; new arrays,
    not views of the tensors.

  Raises:
    ValueError: keys of no `dm_nfnet_*` model, blocks without `skipinit_gain`
      (timm's `nfnet_*` models), or an unexpected array rank.
  """
  names = timm_param_names(state_dict)
  params: Params = {}
  for key, (module, name) in names.items():
    x = _to_numpy(state_dict[key], key)
    if name in ("gain", "bias", "b", "skip_gain"):
      if name == "gain" and x.ndim == 4 and x.shape[1:] == (1, 1, 1):
        x = x.reshape(x.shape[0])
      elif name == "skip_gain" and x.size == 1:
        x = x.reshape(())
      if x.ndim != (0 if name == "skip_gain" else 1):
        raise ValueError(f"state dict {key!r}: shape {x.shape} cannot be "
                         f"{module}/{name}")
    elif "squeeze_excite" in module or module.endswith("/~/linear"):
      if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x.reshape(x.shape[:2])
      if x.ndim != 2:
        raise ValueError(f"state dict {key!r}: shape {x.shape} is not a "
                         "linear [out, in] weight")
      x = x.T
    else:
      if x.ndim != 4:
        raise ValueError(f"state dict {key!r}: shape {x.shape} is not an OIHW "
                         "conv kernel")
      x = x.transpose(2, 3, 1, 0)
    params.setdefault(module, {})[name] = np.array(x, order="C", copy=True)
  block_names = {m.rsplit("/~/", 1)[0] for m in params
                 if re.fullmatch(rf"{PREFIX}/~/nf_block(_\d+)?/~/conv0", m)}
  no_skip = sorted(b for b in block_names
                   if "skip_gain" not in params.get(b, {}))
  if no_skip:
    raise ValueError(
        f"{len(no_skip)} blocks have no skipinit_gain (e.g. {no_skip[0]}): "
        "this is not a dm_nfnet_* state dict (timm's nfnet_* use "
        "skipinit=False and gamma in the conv)")
  if variant is not None:
    check_params(params, variant, source="timm state dict")
  return params, {}
