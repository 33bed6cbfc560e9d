"""The model zoo: every registry name, its definition, size, data and weights.

One row per `nfnets_jax.list_models()` name: the definition it builds
(official, timm's, or a baseline), parameters, FLOPs at its test size
(`nfnets_jax.count_flops`: multiply-accumulates for one image, as the NFNet
paper counts them), its data config, and the published weights whose
parameters fit it. Shapes and FLOPs are traced (`jax.eval_shape` /
`jax.make_jaxpr`: no compute).

Usage:
  python -m experiments.model_zoo --out docs    # docs/model_zoo.md, ~10 min
  python -m experiments.model_zoo --quick       # three small models
"""
from __future__ import annotations

from collections.abc import Sequence
import pathlib
import sys
from typing import Any

if __package__ in (None, ""):  # Run as `python experiments/model_zoo.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments import common  # noqa: E402
from nfnets_jax.models import families  # noqa: E402
from nfnets_jax.models import stats  # noqa: E402
from nfnets_jax.pretrained import registry  # noqa: E402
from nfnets_jax.pretrained import timm  # noqa: E402

MODULE = "experiments.model_zoo"
FILE = "model_zoo.md"
QUICK = ("nf_resnet26", "nf_seresnet26", "resnet26")

# Published ImageNet weights (nothing here downloads them): DeepMind's
# official checkpoints (`F0_haiku.npz` ... `F6_haiku.npz`, F6 trained with
# SAM) and timm's (`timm.list_pretrained('*nfnet*')`, 'nf_*' of timm
# 1.0.31), by the timm model name of their architecture.
OFFICIAL_WEIGHTS = {f"F{i}": f"DeepMind `F{i}_haiku.npz`" for i in range(7)}
TIMM_WEIGHTS = {
    **{f"dm_nfnet_f{i}": f"timm `dm_nfnet_f{i}.dm_in1k`" for i in range(7)},
    "nfnet_l0": "timm `nfnet_l0.ra2_in1k`",
    "eca_nfnet_l0": "timm `eca_nfnet_l0.ra2_in1k`",
    "eca_nfnet_l1": "timm `eca_nfnet_l1.ra2_in1k`",
    "eca_nfnet_l2": "timm `eca_nfnet_l2.ra3_in1k`",
    "nf_regnet_b1": "timm `nf_regnet_b1.ra2_in1k`",
    "nf_resnet50": "timm `nf_resnet50.ra2_in1k`",
}


def definition(spec: registry.ModelSpec) -> str:
  """'official', timm's model name, or 'baseline'."""
  if spec.family == "NormFreeNet":
    return f"timm `{spec.kwargs['variant']}`"
  if spec.family == "NFNet" and spec.kwargs.get("ws_eps_mode") == (
      timm.TIMM_NFNET_KWARGS["ws_eps_mode"]):
    return f"timm `{spec.name}`"
  if spec.family in ("NFNet", "NFResNet", "NFRegNet"):
    return "official"
  return "baseline"


def weights(spec: registry.ModelSpec) -> str | None:
  """The published weights that load into `spec`'s name, or None.

  The NFNet-F weights fit both NFNet definitions (`nfnet_f*`,
  `dm_nfnet_f*`); a timm file of a model whose timm name is the official
  one's here (`nf_resnet50`, `nf_regnet_b1`) builds timm's definition
  (`timm_*`) whichever of the two names is asked for.
  """
  if spec.family == "NFNet":
    variant = spec.kwargs["variant"]
    found = [w for w in (OFFICIAL_WEIGHTS.get(variant),
                         TIMM_WEIGHTS.get(f"dm_nfnet_{variant.lower()}"))
             if w]
    return "; ".join(found) or None
  if spec.family == "NormFreeNet":
    return TIMM_WEIGHTS.get(spec.kwargs["variant"])
  timm_definition = registry.TIMM_PREFIX + spec.name
  if spec.name in TIMM_WEIGHTS and timm_definition in registry.REGISTRY:
    return f"{TIMM_WEIGHTS[spec.name]} (builds `{timm_definition}`)"
  return None


def measure(spec: registry.ModelSpec) -> dict[str, Any]:
  """One row: the name's definition, size, FLOPs and data config."""
  # Traced in training mode, where batch norm needs no running averages:
  # dropout, stochastic depth and batch statistics multiply nothing, so the
  # MACs are the eval forward's.
  model_fn = lambda x: families.build_model(
      spec.family, spec.num_classes, **spec.kwargs)(x, is_training=True)
  params, _ = stats.init_shapes(model_fn)
  d = spec.data
  return {
      "name": spec.name, "definition": definition(spec),
      "family": spec.family,
      "params": stats.count_params(params),
      "flops": stats.count_flops(model_fn, d.test_size),
      "train_px": d.train_size, "test_px": d.test_size,
      "resize_px": d.test_size + d.crop_padding, "crop_mode": d.crop_mode,
      "weights": weights(spec),
  }


def _billions(v: float) -> str:
  return f"{v / 1e9:.2f}B"


COLUMNS = [
    common.Column("name", "Name", lambda v: f"`{v}`"),
    common.Column("definition", "Definition"),
    common.Column("family", "Family"),
    common.Column("params", "Params", common.fmt_int),
    common.Column("flops", "FLOPs (test px)", _billions),
    common.Column("train_px", "Train px"),
    common.Column("test_px", "Test px"),
    common.Column("resize_px", "Eval resize px"),
    common.Column("crop_mode", "Crop"),
    common.Column("weights", "Published weights that load"),
]

NOTES = f"""\
**Columns.** *Definition*: the official papers' code (`nfnet_f*`,
`nf_resnet*`, `nf_regnet_b*`), timm's (its model name: `dm_nfnet_f*` as
`NFNet` with timm's weight-standardization eps and exact GELU, the others as
`NormFreeNet`, timm's `NfCfg` network), or a normalized / unnormalized
baseline. *FLOPs*: multiply-accumulates of the convolutions and matrix
multiplies for one image at the test size (`nfnets_jax.count_flops`).
Evaluation resizes to *Eval resize px* (both sides for 'squash'; the shorter
side, keeping the aspect ratio, for 'center', timm's default), then crops
the central *Test px* square; all use bicubic resizing and the ImageNet
mean / std. *Published weights*: files whose parameters fit the name; none
ships with this package (`create_model(pretrained=PATH)` loads a file you
have; see [pretrained.md](pretrained.md)). `{common.MISSING}`: none
published (random weights, or your own run's workdir).
"""


def specs(quick: bool = False) -> list[registry.ModelSpec]:
  """Every registry entry (`quick`: `QUICK`), in `list_models()` order."""
  return [registry.get_spec(n) for n in registry.list_models()
          if not quick or n in QUICK]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Writes `model_zoo.md` under `--out`."""
  args = common.make_parser(MODULE, __doc__).parse_args(argv)
  rows = [measure(s) for s in common.progress(specs(args.quick), "models")]
  common.write_markdown(
      args.out / FILE, "Model zoo", common.command(MODULE, argv),
      [common.markdown_table(rows, COLUMNS), NOTES, f"jax {jax.__version__}"])
  print(f"wrote {args.out / FILE}")
  return rows


if __name__ == "__main__":
  common.run_command(MODULE, main)
