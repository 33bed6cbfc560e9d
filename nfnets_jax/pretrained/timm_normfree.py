"""timm's other NF models' state dicts as `NormFreeNet` params, and which.

timm's `NormFreeNet`s (`eca_nfnet_l*`, `nfnet_l0`, `nf_resnet*`,
`nf_seresnet*`, `nf_ecaresnet*`, `nf_regnet_b*`, `nfnet_f*`; see
`models.normfree`) have one key layout: `from_timm_state_dict` renames and
transposes it to `NormFreeNet` params. `identify` tells which registry model
params are from their names and shapes alone, with no model traced: each
candidate's `Layout` (stem, depths, widths, head, attention, extra conv,
skip gain) is computed from its `NormFreeConfig`; the params' is read from
their shapes. timm's `dm_nfnet_*` files (the only ones with `skipinit_gain`,
`is_dm_nfnet`) are the official `NFNet` layout: `pretrained.timm` converts
them.

Key mapping: `stem.conv*` -> `NormFreeNet/~/stem_conv*`, `stages.S.B.*` ->
`NormFreeNet/~/stages_S_B/~/*` (`downsample.conv` -> `downsample_conv`,
`attn[_last].fc1/fc2` -> `attn[_last]/~/linear(_1)`, an ECA's
`attn[_last].conv.weight` -> `attn[_last]/w`, `skipinit_gain` ->
`skip_gain`), `final_conv`, `head.fc` -> `linear`. Conv kernels OIHW ->
HWIO, gains `[out, 1, 1, 1]` -> `[out]`, linear weights (1x1 convs in SE)
-> `[in, out]`, ECA's `[1, 1, k]` -> `[k]`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import re
from typing import Any

import numpy as np

from nfnets_jax.models import normfree
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import registry
from nfnets_jax.pretrained import timm

Params = checks.Params
Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]
PREFIX = "NormFreeNet"  # `normfree.NormFreeNet`'s module name.

_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_CONVS = ("conv1", "conv2", "conv2b", "conv3", "downsample.conv")
_CONV_PARAMS = {"weight": "w", "gain": "gain", "bias": "bias"}
_LINEAR_PARAMS = {"weight": "w", "bias": "b"}
# Haiku ranks of the leaves (biases and gains: 1).
_RANKS = {("conv", "w"): 4, ("linear", "w"): 2, ("eca", "w"): 1,
          ("scalar", "skip_gain"): 0}


def is_dm_nfnet(keys: Iterable[str]) -> bool:
  """Whether timm state-dict keys are a `dm_nfnet_*` model's: blocks with
  `skipinit_gain` (timm's only `skipinit=True` configs)."""
  return any(k.endswith(".skipinit_gain") for k in keys)


def is_normfree(params: Mapping[str, Any]) -> bool:
  """Whether Haiku params are a `NormFreeNet`'s (by their module names)."""
  return any(m.startswith(f"{PREFIX}/~/") for m in params)


def _target(key: str) -> tuple[str, str, str] | None:
  """`(module, param, kind)` of a timm key; kind: conv, linear, eca, scalar."""
  head, _, param = key.rpartition(".")
  if m := re.fullmatch(r"stem\.(conv\d?)", head):
    module, kind = f"{PREFIX}/~/stem_{m.group(1)}", "conv"
  elif head == "final_conv":
    module, kind = f"{PREFIX}/~/final_conv", "conv"
  elif head == "head.fc":
    module, kind = f"{PREFIX}/~/linear", "linear"
  elif m := _BLOCK_RE.match(key):
    block = f"{PREFIX}/~/stages_{m.group(1)}_{m.group(2)}"
    rest = m.group(3)
    if rest == "skipinit_gain":
      return block, "skip_gain", "scalar"
    sub = rest.rpartition(".")[0]
    attn, _, layer = sub.partition(".")
    if sub in _CONVS:
      module, kind = f"{block}/~/{sub.replace('.', '_')}", "conv"
    elif attn in ("attn", "attn_last") and layer in ("fc1", "fc2"):
      module = f"{block}/~/{attn}/~/linear" + ("_1" if layer == "fc2" else "")
      kind = "linear"
    elif attn in ("attn", "attn_last") and layer == "conv":
      return (f"{block}/~/{attn}", "w", "eca") if param == "weight" else None
    else:
      return None
  else:
    return None
  names = _CONV_PARAMS if kind == "conv" else _LINEAR_PARAMS
  return (module, names[param], kind) if param in names else None


def _convert(key: str, kind: str, name: str, x: np.ndarray) -> np.ndarray:
  """One timm array in Haiku's layout (a view where NumPy can make one)."""
  want = _RANKS.get((kind, name), 1)
  if kind == "scalar" and x.size == 1:
    x = x.reshape(())
  elif kind == "eca" and x.ndim == 3 and x.shape[:2] == (1, 1):
    x = x.reshape(x.shape[2])
  elif name == "gain" and x.ndim == 4 and x.shape[1:] == (1, 1, 1):
    x = x.reshape(x.shape[0])
  elif kind == "linear" and name == "w" and x.ndim in (2, 4):
    x = x.reshape(x.shape[:2]) if x.shape[2:] == (1, 1) else x
    x = x.T if x.ndim == 2 else x
  elif kind == "conv" and name == "w" and x.ndim == 4:
    x = x.transpose(2, 3, 1, 0)
  if x.ndim != want:
    raise ValueError(f"state dict {key!r}: shape {x.shape} cannot be a "
                     f"{kind} '{name}' (rank {want})")
  return x


def param_names(keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
  """timm `NormFreeNet` keys -> `(module, param, kind)` (see module doc).

  Raises:
    ValueError: listing keys no timm `NormFreeNet` has.
  """
  names, unknown = {}, []
  for key in keys:
    target = _target(key)
    if target is None:
      unknown.append(key)
    else:
      names[key] = target
  if unknown:
    raise ValueError(f"{len(unknown)} state-dict keys are not part of a "
                     f"timm NormFreeNet (nfnet.py) model: {unknown[:10]}")
  return names


def from_timm_state_dict(state_dict: Mapping[str, Any]) -> Params:
  """Converts a timm `NormFreeNet` state dict to `normfree.NormFreeNet`
  params (new arrays, not views of the tensors).

  Args:
    state_dict: `model.state_dict()` of a timm NF model but `dm_nfnet_*`
      (key -> np.ndarray or torch.Tensor).

  Raises:
    ValueError: keys of no timm NormFreeNet, or an unexpected array rank.
  """
  params: Params = {}
  for key, (module, name, kind) in param_names(state_dict).items():
    x = _convert(key, kind, name, timm.to_numpy(state_dict[key], key))
    params.setdefault(module, {})[name] = timm.c_order_copy(x)
  return params


def param_shapes(shapes: Mapping[str, Sequence[int]]) -> Shapes:
  """The `NormFreeNet` params' shapes of timm keys' shapes (nothing read:
  e.g. a `.safetensors` header)."""
  out: dict[str, dict[str, tuple[int, ...]]] = {}
  for key, (module, name, kind) in param_names(shapes).items():
    fake = np.broadcast_to(np.float32(0), tuple(shapes[key]))
    out.setdefault(module, {})[name] = _convert(key, kind, name, fake).shape
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a `NormFreeNet`'s param shapes show of its config.

  Attributes:
    stem: the stem convs' names and kernel size, e.g. (('conv', 7),).
    stem_channels: the stem's output channels.
    depths: blocks per stage.
    channels: each stage's output channels.
    final_channels: `final_conv`'s output channels (0: none).
    attention: 'se', 'eca' or None, and where ('attn' after the 3x3 convs,
      'attn_last' after the last 1x1), e.g. ('eca', 'attn_last').
    extra_conv: blocks have a second 3x3 conv.
    skipinit: blocks have a scalar skip gain.
  """
  stem: tuple[tuple[str, int], ...]
  stem_channels: int
  depths: tuple[int, ...]
  channels: tuple[int, ...]
  final_channels: int
  attention: tuple[str, str] | None
  extra_conv: bool
  skipinit: bool


def config_layout(cfg: normfree.NormFreeConfig) -> Layout:
  """The `Layout` of a `NormFreeConfig` (no model built)."""
  if "quad" in cfg.stem_type:
    stem = tuple((f"conv{i}", 3) for i in range(1, 5))
  elif "deep" in cfg.stem_type:
    stem = tuple((f"conv{i}", 3) for i in range(1, 4))
  else:
    stem = (("conv", 7 if "7x7" in cfg.stem_type else 3),)
  return Layout(
      stem=stem, stem_channels=cfg.stem_channels, depths=tuple(cfg.depths),
      channels=cfg.stage_channels,
      final_channels=cfg.final_channels if cfg.num_features else 0,
      attention=(None if cfg.attn_layer is None else
                 (cfg.attn_layer, "attn" if cfg.reg else "attn_last")),
      extra_conv=cfg.extra_conv, skipinit=cfg.skipinit)


_PARAM_BLOCK_RE = re.compile(rf"^{PREFIX}/~/stages_(\d+)_(\d+)(?:/~/(.+))?$")


def params_layout(shapes: Shapes) -> Layout:
  """The `Layout` of `NormFreeNet` params (`{module: {param: shape}}`).

  Raises:
    ValueError: no `NormFreeNet/~/stem_conv*` or `stages_*` modules, or
      non-contiguous stage/block indices.
  """
  stem = sorted((m.rsplit("/~/stem_", 1)[1], int(leaves["w"][0]))
                for m, leaves in shapes.items()
                if re.fullmatch(rf"{PREFIX}/~/stem_conv\d?", m)
                and "w" in leaves)
  blocks: dict[tuple[int, int], dict[str, Any]] = {}
  for m, leaves in shapes.items():
    if match := _PARAM_BLOCK_RE.match(m):
      sb = (int(match.group(1)), int(match.group(2)))
      sub = match.group(3) or ""
      blocks.setdefault(sb, {})[sub] = leaves
  if not stem or not blocks:
    raise ValueError(f"not NormFreeNet params: no '{PREFIX}/~/stem_conv*' or "
                     f"'{PREFIX}/~/stages_*' modules (first names: "
                     f"{sorted(shapes)[:3]})")
  stages = sorted({s for s, _ in blocks})
  depths = tuple(sum(1 for t, _ in blocks if t == s) for s in stages)
  if stages != list(range(len(stages))) or any(
      sorted(b for t, b in blocks if t == s) != list(range(d))
      for s, d in zip(stages, depths)):
    raise ValueError(f"NormFreeNet params: stage/block indices are not "
                     f"contiguous: {sorted(blocks)}")
  first = [blocks[(s, 0)] for s in stages]
  subs = {sub for b in blocks.values() for sub in b}
  attention = None
  for place in ("attn", "attn_last"):
    if f"{place}/~/linear" in subs:
      attention = ("se", place)
    elif place in subs:
      attention = ("eca", place)
  final = shapes.get(f"{PREFIX}/~/final_conv", {}).get("w")
  stem_w = shapes[f"{PREFIX}/~/stem_{stem[-1][0]}"]["w"]
  return Layout(
      stem=tuple(stem), stem_channels=int(stem_w[-1]), depths=depths,
      channels=tuple(int(b.get("conv3", {}).get("w", (0,))[-1])
                     for b in first),
      final_channels=int(final[-1]) if final is not None else 0,
      attention=attention, extra_conv="conv2b" in subs,
      skipinit=any("skip_gain" in b.get("", {}) for b in blocks.values()))


def candidates() -> dict[str, normfree.NormFreeConfig]:
  """The registry's `NormFreeNet` models: name -> config."""
  return {s.name: normfree.get_config(s.kwargs["variant"])
          for s in registry.REGISTRY.values() if s.family == "NormFreeNet"}


def identify(shapes: Shapes) -> str:
  """The registry name of the `NormFreeNet` whose layout params have.

  Only the `Layout` is compared (names and shapes, no model traced);
  `create_model` then checks every shape against the model.

  Args:
    shapes: `{module: {param: shape}}` of `NormFreeNet` params
      (`models.stats.as_shapes` of the params, or `param_shapes`).

  Raises:
    ValueError: params of no registered model (naming the three closest
      and how they differ), or not `NormFreeNet` params.
  """
  got = params_layout(shapes)
  layouts = {name: config_layout(cfg) for name, cfg in candidates().items()}
  matches = sorted(n for n, layout in layouts.items() if layout == got)
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise ValueError(f"NormFreeNet params fit several models: {matches}; "
                     "pass the name")
  fields = [f.name for f in dataclasses.fields(Layout)]

  def differs(layout: Layout) -> list[str]:
    return [f for f in fields if getattr(layout, f) != getattr(got, f)]

  def distance(name: str) -> tuple[int, int, str]:
    """Fields that differ, then per-stage entries that do (depths, ...)."""
    layout = layouts[name]
    entries = sum(
        sum(a != b for a, b in zip(getattr(layout, f), getattr(got, f)))
        + abs(len(getattr(layout, f)) - len(getattr(got, f)))
        for f in ("depths", "channels") if f in differs(layout))
    return len(differs(layout)), entries, name

  closest = sorted(layouts, key=distance)[:3]
  hints = "; ".join(
      f"{n} (" + ", ".join(f"{f}: {getattr(layouts[n], f)}, params have "
                           f"{getattr(got, f)}" for f in differs(layouts[n]))
      + ")" for n in closest)
  raise ValueError(f"NormFreeNet params of no registered model; the closest: "
                   f"{hints}")
