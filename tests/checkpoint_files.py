"""Checkpoint files for tests, written as their makers wrote them.

- `old_haiku_pickle`: params pickled as Haiku 0.0.3 + dill wrote DeepMind's
  official `F*_haiku.npz` files (without importing either).
- `perturbed_timm_f0`: a randomly initialized, perturbed timm `dm_nfnet_f0`,
  its converted params, and both forwards.
- `flip_array_bytes`, `flip_in_largest_file`, `truncate_largest_file`:
  damage to an orbax checkpoint step.
"""
import io
import os
import pickle
import pickletools

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import recipes
from nfnets_jax.models import nfnet
from nfnets_jax.pretrained import timm as timm_weights


def assert_params_equal(a, b):
  assert sorted(a) == sorted(b)
  for m in a:
    assert sorted(a[m]) == sorted(b[m]), m
    for n in a[m]:
      assert type(b[m][n]) is np.ndarray
      assert a[m][n].dtype == b[m][n].dtype
      np.testing.assert_array_equal(a[m][n], b[m][n], err_msg=f"{m}/{n}")


# ---------------------------------------------------------------------------
# Writing pickles exactly as old Haiku + dill did.
# ---------------------------------------------------------------------------


def _global_as(module, name):
  """Marks a local object to be pickled as the global `module.name`."""
  def mark(obj):
    obj.pickle_as = (module, name)
    return obj
  return mark


# (Classes, since the pure-Python pickler saves functions without calling an
# overridden `save_global`.)
@_global_as("numpy.core.multiarray", "_reconstruct")
class _OldReconstruct:
  """NumPy < 2 module path of ndarray's reconstructor."""


@_global_as("dill._dill", "_create_array")
class _DillCreateArray:
  """What dill (>= 0.3) writes for every ndarray."""


@_global_as("haiku._src.data_structures", "frozendict")
class OldFrozenDict:
  """Haiku 0.0.3's params mapping: `__reduce__ = (frozendict, (storage,))`."""

  def __init__(self, storage):
    self._storage = dict(storage)

  def __reduce__(self):
    return (OldFrozenDict, (self._storage,))


@_global_as("haiku._src.data_structures", "FlatMapping")
class OldFlatMapping:
  """Later Haiku's mapping: `__reduce__ = (FlatMapping, (dict,))`."""

  def __init__(self, mapping):
    self._mapping = dict(mapping)

  def __reduce__(self):
    return (OldFlatMapping, (self._mapping,))


class OldHaikuPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes stand-ins under their old global names, arrays as NumPy 1 did."""

  # Our own table: importing dill patches the shared one's `type` entry.
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access
  dispatch[type] = lambda self, obj: self.save_global(obj)

  def __init__(self, file, protocol, dill_arrays):
    super().__init__(file, protocol=protocol)
    self.dill_arrays = dill_arrays

  def save_global(self, obj, name=None):
    target = getattr(obj, "pickle_as", None)
    if target is None:
      return super().save_global(obj, name)
    module, qualname = target
    if self.proto >= 4:
      self.save(module)
      self.save(qualname)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
    self.memoize(obj)

  def reducer_override(self, obj):
    if type(obj) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
      return NotImplemented
    _, args, state = obj.__reduce__()
    if self.dill_arrays:
      return (_DillCreateArray, (_OldReconstruct, args, state, None))
    return (_OldReconstruct, args, state)


def old_haiku_pickle(params, mapping_cls=OldFrozenDict, protocol=4,
                     dill_arrays=True):
  wrapped = mapping_cls({m: mapping_cls(leaves)
                         for m, leaves in params.items()})
  buf = io.BytesIO()
  OldHaikuPickler(buf, protocol, dill_arrays).dump(wrapped)
  return buf.getvalue()


def pickle_globals(data):
  """The `module.name` globals a pickle references."""
  out, strings, memo, last = set(), [], {}, None
  for op, arg, _ in pickletools.genops(data):
    if op.name == "GLOBAL":
      out.add(arg.replace(" ", "."))
    elif op.name == "STACK_GLOBAL":
      out.add(".".join(strings[-2:]))
    elif op.name == "MEMOIZE":
      memo[len(memo)] = last
      continue
    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
      memo[arg] = last
      continue
    elif op.name in ("BINGET", "LONG_BINGET", "GET"):
      strings.append(memo.get(arg))
    elif "UNICODE" in op.name:
      strings.append(arg)
    last = strings[-1] if strings and "UNICODE" in op.name else None
  return out


def perturbed_timm_f0():
  """A perturbed random dm_nfnet_f0, its converted params, and forwards."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  model = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
  perturb_timm(model)
  params, state = timm_weights.from_timm_state_dict(model.state_dict(), "F0")
  assert state == {}

  timm_logits = {}

  def run_timm(size):
    """Input `[2, size, size, 3]` (NHWC) and timm's logits, cached."""
    x = np.random.default_rng(size).standard_normal(
        (2, size, size, 3)).astype(np.float32)
    if size not in timm_logits:
      with torch.no_grad():
        timm_logits[size] = model(torch.from_numpy(
            x.transpose(0, 3, 1, 2))).numpy()
    return x, timm_logits[size]

  def run_ours(x_nhwc, **kwargs):
    fwd = hk.transform(lambda x: nfnet.NFNet(1000, "F0", **kwargs)(
        x, is_training=False))
    return np.asarray(jax.jit(fwd.apply)(params, None, x_nhwc)["logits"])

  return model, params, run_timm, run_ours


# Damage, as a full disk or a bad sector would do.


def state_files(step_dir: str) -> list[str]:
  """The files of an orbax checkpoint step's `state` item."""
  return sorted(os.path.join(root, f) for root, _, files in
                os.walk(os.path.join(step_dir, "state")) for f in files)


def flip_array_bytes(step_dir: str, array: np.ndarray, n: int = 4096) -> str:
  """Inverts up to `n` bytes in the middle of `array`'s stored bytes.

  Returns:
    The file changed (the array must be stored uncompressed, whole).
  """
  raw = np.ascontiguousarray(array).tobytes()
  for path in state_files(step_dir):
    with open(path, "rb") as f:
      data = bytearray(f.read())
    at = data.find(raw)
    if at < 0:
      continue
    count = min(n, len(raw) // 2)
    start = at + (len(raw) - count) // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in
                                      data[start:start + count])
    with open(path, "wb") as f:
      f.write(data)
    return path
  raise AssertionError(f"array bytes not found under {step_dir}")


def truncate_largest_file(step_dir: str) -> str:
  """Cuts the step's largest state file to half its size; returns it."""
  path = max(state_files(step_dir), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def flip_in_largest_file(step_dir: str, n: int = 4096) -> str:
  """Inverts `n` bytes in the middle of the step's largest state file."""
  path = max(state_files(step_dir), key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = max(len(data) // 2 - n // 2, 0)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    f.seek(0)
    f.write(data)
  return path


def perturb_timm(model) -> None:
  """A timm NF model's random init made to exercise every path, in place
  (with torch's current seed): skip gains and gains away from 0 and 1,
  biases and the head non-zero, weights scaled unevenly.

  A fresh model zero-initializes each residual branch (its `skipinit_gain`,
  or the last conv's gain where timm has no skip gain), so without this many
  paths would compute nothing."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("skipinit_gain"):
        p.uniform_(0.3, 1.0)
      elif name.endswith(".gain"):
        p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.1)
      elif name == "head.fc.weight":
        p.normal_(0.0, 0.05)
      else:
        p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))


def finetune_config(path, **pretrained_fields):
  """The fine-tuning recipe's smoke form on the digits from checkpoint
  `path` (locked; `pretrained_fields` set `config.pretrained.*`)."""
  config = recipes.nfnet_finetune("smoke")
  config.dataset.name = "digits"
  config.pretrained.path = str(path)
  config.pretrained.update(pretrained_fields)
  config.workdir = "/tmp/unused"
  config.lock()
  return config


def forward_problems(config):
  """The lines `config_validation` finds about the pretrained definition."""
  # pylint: disable=protected-access
  problems = config_validation._Problems()
  config_validation._check_pretrained_model(config, problems)
  return problems.lines
