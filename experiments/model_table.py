"""The model family table: parameters and FLOPs of every variant vs the papers.

For NFNet-F0...F7 and F0+...F7+, NF-ResNet-50/101/152/200 and
NF-RegNet-B0...B8: parameters, and FLOPs counted as the NFNet paper does
(multiply-accumulates of the convolutions and matrix multiplies for one image
at the test resolution), beside the papers' numbers where they give one and
timm's parameter counts where timm has the model. Everything is read from
`jax.eval_shape` / `jax.make_jaxpr` (no compute), so F7+ takes seconds.

Usage:
  python -m experiments.model_table            # every variant (~1 min on CPU)
  python -m experiments.model_table --quick    # F0, NF-ResNet-50, NF-RegNet-B0
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import pathlib
import sys
from typing import Any

if __package__ in (None, ""):  # Run as `python experiments/model_table.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments import common  # noqa: E402
from nfnets_jax.models import nf_regnet  # noqa: E402
from nfnets_jax.models import nf_resnet  # noqa: E402
from nfnets_jax.models import nfnet  # noqa: E402
from nfnets_jax.models import resnet  # noqa: E402
from nfnets_jax.models import stats  # noqa: E402

MODULE = "experiments.model_table"
NUM_CLASSES = 1000

# (params, FLOPs) as published. NFNet-F0..F6: ICML 2021 Table 1 and the
# official README (F6 is F6+SAM there). NFNet-F4+: ICML 2021 Table 4
# (ImageNet after JFT-300M pre-training), as transcribed by Papers with Code.
# No other `+` variant, no F7, and no NF-ResNet/NF-RegNet size is included.
PAPER: dict[str, tuple[int, int]] = {
    "NFNet-F0": (71_500_000, 12_380_000_000),
    "NFNet-F1": (132_600_000, 35_540_000_000),
    "NFNet-F2": (193_800_000, 62_590_000_000),
    "NFNet-F3": (254_900_000, 114_760_000_000),
    "NFNet-F4": (316_100_000, 215_240_000_000),
    "NFNet-F5": (377_200_000, 289_760_000_000),
    "NFNet-F6": (438_400_000, 377_280_000_000),
    "NFNet-F4+": (527_000_000, 367_000_000_000),
}

# timm 1.0.31 parameter counts (`timm.create_model(name)` on torch's meta
# device), for the models timm has. `dm_nfnet_*` has the official layout;
# `nfnet_f7` has no skip_gain scalars (one fewer parameter per block);
# `nf_resnet*` has none either; `nf_regnet_*` also rounds channels to
# multiples of 8 (timm's `make_divisible`) where the official code truncates.
TIMM: dict[str, tuple[str, int]] = {
    "NFNet-F0": ("dm_nfnet_f0", 71_489_284),
    "NFNet-F1": ("dm_nfnet_f1", 132_634_256),
    "NFNet-F2": ("dm_nfnet_f2", 193_779_228),
    "NFNet-F3": ("dm_nfnet_f3", 254_924_200),
    "NFNet-F4": ("dm_nfnet_f4", 316_069_172),
    "NFNet-F5": ("dm_nfnet_f5", 377_214_144),
    "NFNet-F6": ("dm_nfnet_f6", 438_359_116),
    "NFNet-F7": ("nfnet_f7", 499_503_992),
    "NF-ResNet-50": ("nf_resnet50", 25_557_032),
    "NF-ResNet-101": ("nf_resnet101", 44_549_160),
    "NF-RegNet-B0": ("nf_regnet_b0", 8_764_288),
    "NF-RegNet-B1": ("nf_regnet_b1", 10_223_984),
    "NF-RegNet-B2": ("nf_regnet_b2", 14_314_608),
    "NF-RegNet-B3": ("nf_regnet_b3", 18_593_832),
    "NF-RegNet-B4": ("nf_regnet_b4", 30_210_816),
    "NF-RegNet-B5": ("nf_regnet_b5", 49_741_728),
}

# The official NF-ResNet experiment trains and evaluates at 224 px.
NF_RESNET_IMSIZE = 224
NF_RESNET_DEPTHS = (50, 101, 152, 200)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One row of the table: a model and its resolutions."""
  family: str
  name: str
  build: Callable[[], Any]  # Called inside a Haiku transform.
  train_px: int
  test_px: int
  num_blocks: int


def model_specs(quick: bool = False) -> list[ModelSpec]:
  """Every model of the table (`quick`: one per family)."""
  specs = []
  for v, var in nfnet.NFNET_VARIANTS.items():
    specs.append(ModelSpec(
        "NFNet", f"NFNet-{v}",
        lambda v=v: nfnet.NFNet(NUM_CLASSES, v),
        var.train_imsize, var.test_imsize, sum(var.depth)))
  for d in NF_RESNET_DEPTHS:
    specs.append(ModelSpec(
        "NF-ResNet", f"NF-ResNet-{d}",
        lambda d=d: nf_resnet.NFResNet(NUM_CLASSES, d),
        NF_RESNET_IMSIZE, NF_RESNET_IMSIZE, sum(resnet.get_depths(d))))
  for v, var in nf_regnet.NF_REGNET_VARIANTS.items():
    specs.append(ModelSpec(
        "NF-RegNet", f"NF-RegNet-{v}",
        lambda v=v: nf_regnet.NFRegNet(NUM_CLASSES, v),
        var.train_imsize, var.test_imsize, sum(var.depth)))
  if quick:
    keep = {"NFNet-F0", "NF-ResNet-50", "NF-RegNet-B0"}
    specs = [s for s in specs if s.name in keep]
  return specs


def measure(spec: ModelSpec) -> dict[str, Any]:
  """Parameters and MACs of one model, beside the published numbers.

  `stats` traces under the 'native' convolution lowering (one op per
  grouped convolution: the same counts as any lowering, the quickest trace).
  """
  fn = lambda x: spec.build()(x, is_training=False)
  params, _ = stats.init_shapes(fn, spec.test_px)
  n_params = stats.count_params(params)
  flops = stats.count_flops(fn, spec.test_px)
  paper_params, paper_flops = PAPER.get(spec.name, (None, None))
  timm_name, timm_params = TIMM.get(spec.name, (None, None))
  return {
      "family": spec.family, "model": spec.name, "blocks": spec.num_blocks,
      "train_px": spec.train_px, "test_px": spec.test_px,
      "params": n_params, "params_paper": paper_params,
      "params_diff_pct": common.rel_diff_pct(n_params, paper_params),
      "flops": flops, "flops_paper": paper_flops,
      "flops_diff_pct": common.rel_diff_pct(flops, paper_flops),
      "timm_model": timm_name, "params_timm": timm_params,
      "params_minus_timm": (None if timm_params is None
                            else n_params - timm_params),
  }


def _millions(v: float) -> str:
  return f"{v / 1e6:.1f}M"


def _billions(v: float) -> str:
  return f"{v / 1e9:.2f}B"


def _signed_int(v: int) -> str:
  return f"{v:+,}"


COLUMNS = [
    common.Column("model", "Model"),
    common.Column("train_px", "Train px"),
    common.Column("test_px", "Test px"),
    common.Column("params", "Params (ours)", common.fmt_int),
    common.Column("params_paper", "Params (paper)", _millions),
    common.Column("params_diff_pct", "Δ params", common.fmt_pct),
    common.Column("flops", "FLOPs (ours)", _billions),
    common.Column("flops_paper", "FLOPs (paper)", _billions),
    common.Column("flops_diff_pct", "Δ FLOPs", common.fmt_pct),
    common.Column("params_timm", "Params (timm)", common.fmt_int),
    common.Column("params_minus_timm", "ours − timm", _signed_int),
    common.Column("timm_model", "timm model", lambda v: f"`{v}`"),
]
CSV_COLUMNS = [common.Column("family", "Family"),
               common.Column("blocks", "Blocks"), *COLUMNS]

NOTES = f"""\
**Columns.** *FLOPs* are multiply-accumulates (MACs) of the convolutions and
matrix multiplies (classifier, squeeze-excite) for one image at the test
resolution, the unit the NFNet paper calls FLOPs; elementwise ops, pooling and
weight standardization are not counted
(`nfnets_jax.models.stats.count_flops` reads them from the traced program).
*Δ* is `(ours − paper) / paper`; the paper rounds parameters to 0.1M and
FLOPs to 0.01B, so |Δ| below ~0.1% is rounding. `{common.MISSING}` means the
source gives no number. All models have 1000 classes and the official layout
(one `skip_gain` scalar per block, NF-RegNet channels truncated with
`int()`).

**Sources.** Paper: NFNet-F0...F6 from Table 1 of Brock et al. (ICML 2021) and
the official README (F6 is the F6+SAM checkpoint there); NFNet-F4+ from the
paper's Table 4 (ImageNet after JFT-300M pre-training), as transcribed by
Papers with Code. F7 and the other `+` variants are defined in the official
`base.py` but the paper and README give no size for them. The ICLR 2021 paper
reports NF-ResNet accuracies, not sizes; NF-RegNet sizes are not transcribed
here. timm: parameter counts of timm 1.0.31 models, counted once on torch's
meta device and recorded in this script.

**Differences.**
- NFNet-F0...F6 match the paper (parameters within rounding, FLOPs within
  0.1%) and timm's `dm_nfnet_*` exactly.
- NFNet-F7 is timm's `nfnet_f7` plus 96 `skip_gain` scalars (one per block),
  which timm leaves out.
- NFNet-F4+: 0.4% fewer parameters and 9% fewer FLOPs than the numbers
  attributed to the paper's Table 4, with the official `base.py` widths at
  the F4 test resolution (512 px). Those two numbers come from Papers with
  Code's transcription; we could not check the table's setting (such as
  the resolution its FLOPs were counted at), and the gap is unexplained.
- NF-ResNets are timm's `nf_resnet*` plus one `skip_gain` per block.
- NF-RegNets differ from timm's `nf_regnet_*` by more than the skip gains:
  timm rounds stage, bottleneck and SE widths to multiples of 8 where the
  official code truncates; `NFRegNet(..., ch_div=8, skipinit_gain=None)`
  gives timm's layout and count exactly
  (tests/models/test_model_families.py).
- NF-ResNet resolutions are the official experiment's 224 px for training
  and evaluation.
"""


def run(quick: bool = False) -> list[dict[str, Any]]:
  """Measures every model of the table (`quick`: one per family)."""
  specs = model_specs(quick)
  return [measure(spec) for spec in common.progress(specs, "models")]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Writes `model_table.md` and `model_table.csv` under `--out`."""
  args = common.make_parser(MODULE, __doc__).parse_args(argv)
  cmd = common.command(MODULE, argv)
  rows = run(args.quick)
  sections = []
  for family in dict.fromkeys(r["family"] for r in rows):
    family_rows = [r for r in rows if r["family"] == family]
    sections.append(f"## {family}\n\n"
                    + common.markdown_table(family_rows, COLUMNS))
  sections.append(NOTES)
  sections.append(f"jax {jax.__version__}")
  common.write_markdown(args.out / "model_table.md",
                        "Model family table: parameters and FLOPs", cmd,
                        sections)
  common.write_csv(args.out / "model_table.csv", rows, CSV_COLUMNS)
  print(f"wrote {args.out / 'model_table.md'} and .csv")
  return rows


if __name__ == "__main__":
  common.run_command(MODULE, main)
