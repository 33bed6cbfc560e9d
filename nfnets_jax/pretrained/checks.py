"""Params against a model: names and shapes, NFNet variant, classifier.

Used by every loader (`pretrained.official`, `pretrained.timm`,
`pretrained.create`, the experiment loop): `compare_shapes` lists every
missing, unexpected and mis-shaped `module/param` name (`check_params` for
NFNets); `infer_variant` names the NFNet variant of a params tree;
`replace_classifier` gives any model's params a new classifier. Shapes come
from `models.stats`, the one place that traces a model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any

import jax
import numpy as np

from nfnets_jax.models import nfnet
from nfnets_jax.models import stats

Params = dict[str, dict[str, np.ndarray]]
Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]

# The NFNet's top module name in official checkpoints and in `nfnet.NFNet`.
PREFIX = "NFNet"
CLASSIFIER_STDDEV = 0.01  # As every family's default `fc_init`.


class ParamsMismatchError(ValueError):
  """Params do not have the names/shapes of the requested model."""


def shapes_of(tree: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple]:
  """`{module: {param: array}}` -> `{"module/param": shape}`."""
  return {f"{m}/{n}": tuple(np.shape(v)) for m, leaves in tree.items()
          for n, v in leaves.items()}


def compare_shapes(got: Mapping[str, Mapping[str, Any]], want: Shapes, *,
                   source: str, target: str) -> None:
  """Raises `ParamsMismatchError` unless `got` has exactly `want`'s shapes.

  Args:
    got: the loaded params `{module: {param: array}}`.
    want: the model's `{module: {param: shape}}`.
    source: what to name as the params' origin (a file path).
    target: what to name as the model (e.g. "NFNet variant='F0'").

  Raises:
    ParamsMismatchError: listing missing, unexpected and mis-shaped
      `module/param` names (with both shapes), at most 12 of each.
  """
  have = shapes_of(got)
  need = {f"{m}/{n}": tuple(s) for m, leaves in want.items()
          for n, s in leaves.items()}
  missing = sorted(set(need) - set(have))
  unexpected = sorted(set(have) - set(need))
  misshaped = sorted(k for k in set(need) & set(have) if need[k] != have[k])
  if not (missing or unexpected or misshaped):
    return

  def listing(title: str, names: list[str],
              fmt: Callable[[str], str] = str, limit: int = 12) -> list[str]:
    if not names:
      return []
    more = ([f"    ... and {len(names) - limit} more"]
            if len(names) > limit else [])
    return ([f"  {title} ({len(names)}):"]
            + [f"    {fmt(k)}" for k in names[:limit]] + more)

  lines = (listing("missing", missing)
           + listing("unexpected", unexpected)
           + listing("mis-shaped", misshaped,
                     lambda k: f"{k}: got {have[k]}, expected {need[k]}"))
  raise ParamsMismatchError(f"{source} does not match {target}:\n"
                            + "\n".join(lines))


def _canonical_variant(variant: str) -> str:
  """'dm_nfnet_f0' (timm) -> 'F0'; other names unchanged."""
  match = re.fullmatch(r"dm_nfnet_(f\d)", variant)
  return match.group(1).upper() if match else variant


def expected_param_shapes(
    variant: str | nfnet.NFNetVariant | Mapping[str, Any],
    num_classes: int = 1000, **model_kwargs: Any
) -> dict[str, dict[str, tuple[int, ...]]]:
  """Param names and shapes of `nfnet.NFNet(num_classes, variant, ...)`.

  Traced by `models.stats.param_shapes` (nothing is allocated) and cached.

  Args:
    variant: as `nfnet.NFNet` takes it, or timm's 'dm_nfnet_f0' ....
    num_classes: classifier outputs.
    **model_kwargs: other `nfnet.NFNet` arguments.

  Returns:
    `{module: {param: shape}}`.
  """
  if isinstance(variant, str):
    variant = _canonical_variant(variant)
  variant = nfnet.get_variant(variant)
  shapes, _ = stats.param_shapes(
      "NFNet", {"variant": variant, **model_kwargs}, num_classes)
  return shapes


def checkpoint_classes(params: Mapping[str, Mapping[str, Any]],
                       head: Sequence[tuple[str, str]]) -> int | None:
  """The class count of params: the last axis of their classifier weight.

  Args:
    params: `{module: {param: array}}`.
    head: the model's classifier leaves (`stats.classifier_names`).
  """
  for m, n in head:
    w = params.get(m, {}).get(n)
    if w is not None and np.ndim(w) == 2:
      return int(np.shape(w)[-1])
  return None


def head_classes(params: Mapping[str, Mapping[str, Any]]) -> int | None:
  """The class count of NFNet params (`NFNet/~/linear/w`), if any."""
  return checkpoint_classes(params, [(f"{PREFIX}/~/linear", "w")])


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
  compare_shapes(
      params, expected, source=source,
      target=f"NFNet variant={variant!r}, num_classes={num_classes}"
      + (f", {model_kwargs}" if model_kwargs else ""))


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


def replace_classifier(params: Mapping[str, Mapping[str, Any]], family: str,
                       kwargs: Mapping[str, Any], num_classes: int, *,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
  """Params with a new classifier for `num_classes`, for fine-tuning.

  The classifier is every leaf whose shape depends on the class count
  (`stats.classifier_names`): weights N(0, 0.01) (every family's default
  `fc_init`), biases zero; every other leaf is shared, not copied.

  Args:
    params: `{module: {param: array}}` of `family(**kwargs)`.
    family, kwargs: the model (a `models.families.MODELS` key and its
      arguments).
    num_classes: the new class count.
    seed: PRNG seed of the new weights.

  Raises:
    ValueError: num_classes < 1.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  head = stats.classifier_names(family, kwargs)
  want, _ = stats.param_shapes(family, kwargs, num_classes)
  new = {m: dict(leaves) for m, leaves in params.items()}
  rng = jax.random.key(seed)
  for k, (m, n) in enumerate(head):
    shape = want[m][n]
    new.setdefault(m, {})[n] = (
        np.asarray(jax.random.normal(jax.random.fold_in(rng, k), shape))
        * CLASSIFIER_STDDEV if len(shape) >= 2
        else np.zeros(shape, np.float32))
  return new
