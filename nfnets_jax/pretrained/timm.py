"""timm's `dm_nfnet_*` weights as NFNet params, and the two forwards.

timm's PyTorch port, `timm.create_model('dm_nfnet_f0' ... 'dm_nfnet_f6')`:
`from_timm_state_dict` renames and transposes its state dict;
`load_timm_file` reads one from a `.safetensors` or torch `.pth` file.

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

from collections.abc import Iterable, Mapping
import re
from typing import Any

import numpy as np

from nfnets_jax.pretrained import checks

Params = checks.Params
PREFIX = checks.PREFIX

# Keyword arguments of `nfnet.NFNet` whose forward equals timm's dm_nfnet_*.
TIMM_NFNET_KWARGS: dict[str, Any] = {
    "activation": "gelu_exact", "ws_eps": 1e-5, "ws_eps_mode": "add"}
# ... and those of the official release (the `nfnet.NFNet` defaults).
OFFICIAL_NFNET_KWARGS: dict[str, Any] = {
    "activation": "gelu", "ws_eps": 1e-4, "ws_eps_mode": "clamp"}

# The file suffixes of torch state dicts (safetensors is told by its header).
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _torch_state_dict(path: str, map_location: str) -> Mapping[str, Any]:
  """A torch file's state dict, unwrapped from a checkpoint dict."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = torch.load(path, map_location=map_location, weights_only=True)
  for key in ("state_dict", "model", "state_dict_ema"):
    if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
      return sd[key]
  return sd


def load_timm_file(path: str) -> Mapping[str, Any]:
  """A timm state dict from `.safetensors`, or a `.pth`/`.bin` torch file.

  Torch files are read with `weights_only=True` (no code runs); a checkpoint
  dict wrapping the weights under `state_dict`, `model` or `state_dict_ema`
  is unwrapped.
  """
  if path.endswith(".safetensors"):
    # pylint: disable-next=g-import-not-at-top
    from safetensors.numpy import load_file
    return load_file(path)
  return _torch_state_dict(path, "cpu")


def read_timm_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """The keys and shapes of `load_timm_file(path)`, without its weights.

  A `.safetensors` file's header; a torch file loaded onto PyTorch's 'meta'
  device (`weights_only=True`), which reads no tensor data.
  """
  if path.endswith(".safetensors"):
    # pylint: disable-next=g-import-not-at-top
    from safetensors import safe_open
    with safe_open(path, "np") as f:
      return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  return {k: tuple(v.shape)
          for k, v in _torch_state_dict(path, "meta").items()}

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
        f"model (timm's other NF models, nfnet_*, eca_nfnet_*, ..., are "
        f"NormFreeNets: pretrained.timm_normfree): "
        f"{unknown[:10]}")
  return names


def to_numpy(value: Any, key: str) -> np.ndarray:
  """A state-dict value (np.ndarray or torch.Tensor, any device) as NumPy;
  floating torch tensors become float32.

  Raises:
    ValueError: a non-numeric value, named by its `key`.
  """
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if value.dtype.kind not in "biuf":
    raise ValueError(f"state dict {key!r}: dtype {value.dtype} is not numeric")
  return value


def c_order_copy(x: np.ndarray, block: int = 64) -> np.ndarray:
  """A new C-order array equal to `x` (often a transposed view), copied in
  slices of `block` along the last axis: NumPy's whole-array copy of a
  transposed view strides through memory, and converting dm_nfnet_f0's
  OIHW kernels to HWIO took 0.27 s that way, 0.11 s in slices of 64."""
  if x.ndim == 0:
    return np.array(x)
  out = np.empty(x.shape, x.dtype)
  for start in range(0, x.shape[-1], block):
    out[..., start:start + block] = x[..., start:start + block]
  return out


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
    x = to_numpy(state_dict[key], key)
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
    params.setdefault(module, {})[name] = c_order_copy(x)
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
    checks.check_params(params, variant, source="timm state dict")
  return params, {}
