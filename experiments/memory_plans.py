"""Memory per device of the NFNet-F0 ... F7 recipe at 4096 images.

For each variant (its recipe: train resolution, bfloat16, SGD + AGC, EMA,
SAM for F6) the train step is compiled for one device's share of the
global batch over 256 and 64 devices (16 and 64 images per device)
(`experiment.memory_plan.step_memory`, as `nfnets-plan` does; with
`--remat`, also with remat), and XLA's peak bytes per device are read. The 8-device row (512
images per device) is the line through those two points: buffers grow
linearly with the batch under one schedule. F0's 8-device step is compiled
too, to check that line. Every compile is appended to a cache file, so an
interrupted run resumes where it stopped.

The compiler is this machine's (XLA:CPU unless an accelerator is attached):
a guide for GPUs and TPUs, not their measurement.

Usage:
  python -m experiments.memory_plans --out docs   # docs/memory_plans.md
  python -m experiments.memory_plans --variants F0,F1 --remat
  python -m experiments.memory_plans --quick      # the smoke model
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import pathlib
import sys
from typing import Any

if __package__ in (None, ""):  # Run as `python experiments/memory_plans.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments import common  # noqa: E402
from nfnets_jax import NFNET_VARIANTS  # noqa: E402
from nfnets_jax.experiment import memory_plan  # noqa: E402
from nfnets_jax.experiment import recipes  # noqa: E402

MODULE = "experiments.memory_plans"
FILE = "memory_plans.md"
CACHE = "memory_plans.jsonl"
GLOBAL_BATCH = 4096
COMPILED_DEVICES = (256, 64)  # 16 and 64 images per device.
EXTRAPOLATED_DEVICES = 8  # 512 images per device.
CHECKED_VARIANT = "F0"  # Its 8-device step is compiled too.
QUICK_BATCHES = (2, 8, 32)  # The smoke model: 32 from 2 and 8.
DEVICE_SIZES_GIB = (16, 24, 32, 40, 80, 141)  # V100/TPUv3 ... H200.
NUM_CLASSES = 1000
VARIANTS = tuple(f"F{i}" for i in range(8))  # The paper's (no F*+ widths).


def _config(variant: str, quick: bool) -> Any:
  return recipes.nfnet_imagenet("F0", "smoke") if quick else (
      recipes.nfnet_imagenet(variant))


def _key(variant: str, batch: int, remat: bool, quick: bool) -> str:
  return f"{'smoke' if quick else variant}/{batch}/{remat}"


def _load_cache(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines()
             if line.strip()]
  return {r["key"]: r for r in records}


def _compiled(variant: str, batch: int, remat: bool, quick: bool,
              cache: dict[str, dict[str, Any]], path: pathlib.Path
              ) -> dict[str, Any]:
  """The step's memory record, compiled once (cached in `path`)."""
  key = _key(variant, batch, remat, quick)
  if key not in cache:
    config = _config(variant, quick)
    step = memory_plan.step_memory(
        config, per_device_batch=batch, accumulation_steps=1, remat=remat,
        num_classes=NUM_CLASSES)
    cache[key] = {"key": key, **dataclasses.asdict(step),
                  "peak_bytes": step.peak_bytes}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
      f.write(json.dumps(cache[key]) + "\n")
  return cache[key]


def _line(small: dict[str, Any], large: dict[str, Any], batch: int) -> int:
  """Peak bytes at `batch` on the line through two compiled steps."""
  slope = ((large["peak_bytes"] - small["peak_bytes"])
           / (large["micro_batch"] - small["micro_batch"]))
  return int(small["peak_bytes"] + slope * (batch - small["micro_batch"]))


def _fits(peak: int) -> str | None:
  sizes = [s for s in DEVICE_SIZES_GIB if peak <= s * memory_plan.GIB]
  return f"{sizes[0]} GiB" if sizes else None


def rows_for(variant: str, quick: bool, with_remat: bool,
             cache: dict[str, dict[str, Any]], path: pathlib.Path
             ) -> list[dict[str, Any]]:
  """The variant's rows: compiled batches, then the extrapolated one."""
  if quick:
    small_batch, large_batch, far_batch = QUICK_BATCHES
    devices = {b: b for b in QUICK_BATCHES}  # A global batch of b x b.
  else:
    small_batch, large_batch = (GLOBAL_BATCH // d for d in COMPILED_DEVICES)
    far_batch = GLOBAL_BATCH // EXTRAPOLATED_DEVICES
    devices = {GLOBAL_BATCH // d: d for d in
               (*COMPILED_DEVICES, EXTRAPOLATED_DEVICES)}
  config = _config(variant, quick)
  rows = []
  for batch in (small_batch, large_batch, far_batch):
    row = {"variant": "smoke" if quick else variant,
           "train_px": config.train.image_size, "devices": devices[batch],
           "per_device": batch}
    for remat in (False, True) if with_remat else (False,):
      small = _compiled(variant, small_batch, remat, quick, cache, path)
      large = _compiled(variant, large_batch, remat, quick, cache, path)
      name = "remat" if remat else "plain"
      if batch == far_batch:
        row[f"{name}_gib"] = _line(small, large, batch) / memory_plan.GIB
        row["how"] = "line through the two above"
      else:
        record = small if batch == small_batch else large
        row[f"{name}_gib"] = record["peak_bytes"] / memory_plan.GIB
        row["how"] = "compiled"
        if not remat:
          row["tflops"] = record["flops"] / 1e12
    for name in ("plain", "remat")[:2 if with_remat else 1]:
      row[f"fits_{name}"] = _fits(int(row[f"{name}_gib"] * memory_plan.GIB))
    rows.append(row)
  if quick or variant == CHECKED_VARIANT:
    exact = _compiled(variant, far_batch, False, quick, cache, path)
    rows[-1]["compiled_gib"] = exact["peak_bytes"] / memory_plan.GIB
  return rows


def _gib(v: float) -> str:
  return f"{v:.2f}"


def columns(with_remat: bool) -> list[common.Column]:
  """The table's columns (remat's only when measured)."""
  remat = [common.Column("remat_gib", "Peak GiB, remat", _gib),
           common.Column("fits_remat", "Fits, remat")] if with_remat else []
  return [
      common.Column("variant", "Variant"),
      common.Column("train_px", "Train px"),
      common.Column("devices", "Devices"),
      common.Column("per_device", "Images / device"),
      common.Column("plain_gib", "Peak GiB", _gib),
      common.Column("fits_plain", "Fits"),
      *remat,
      common.Column("tflops", "Step TFLOPs / device", _gib),
      common.Column("how", "Peak from"),
      common.Column("compiled_gib", "Compiled GiB", _gib),
  ]

NOTES = f"""\
**How.** Each variant's recipe (`configs/nfnet.py:F*`: train resolution,
bfloat16 compute, SGD + Nesterov with AGC, EMA; F6 with SAM) at a global
batch of {GLOBAL_BATCH}, one device's train step compiled by
`experiment.memory_plan.step_memory` (what `nfnets-plan` runs) for its
share of the batch, with no gradient accumulation and no remat. *Peak
GiB*: XLA's buffer assignment of the compiled step, arguments + outputs not
written in place + temporaries. *Fits*: the smallest of
{", ".join(f"{s}" for s in DEVICE_SIZES_GIB)} GiB that holds it
(`{common.MISSING}`: none; use gradient accumulation: `nfnets-plan
--device-memory GIB` finds the steps). *Step TFLOPs*: XLA's count for the
compiled step (multiplies and adds apart). *Peak from*: the
{EXTRAPOLATED_DEVICES}-device row is the line through the two compiled rows
above it (buffers grow linearly with the batch); *Compiled GiB* checks that
line where the {GLOBAL_BATCH // EXTRAPOLATED_DEVICES}-image step was
compiled as well.

**Which compiler.** These are XLA:CPU's figures (`backend` below): GPU and
TPU compilers fuse, pad and schedule differently, and their runtimes add
workspace (cuDNN) and collective buffers, so read them as a guide to an
accelerator, not its measurement. No accelerator was available to compare.
"""


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Writes `memory_plans.md` under `--out` (compiles cached beside it)."""
  parser = common.make_parser(MODULE, __doc__)
  parser.add_argument("--remat", action="store_true",
                      help="also compile each step with remat")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated NFNet variants (default: "
                      f"{','.join(VARIANTS)})")
  args = parser.parse_args(argv)
  variants = ["smoke"] if args.quick else args.variants.split(",")
  unknown = [v for v in variants if v not in NFNET_VARIANTS and v != "smoke"]
  if unknown:
    raise ValueError(f"--variants={args.variants!r}: unknown {unknown}; "
                     f"allowed: {', '.join(NFNET_VARIANTS)}")
  cache_path = args.out / CACHE
  cache = _load_cache(cache_path)
  rows = []
  for variant in common.progress(variants, "variants"):
    rows += rows_for(variant, args.quick, args.remat, cache, cache_path)
  common.write_markdown(
      args.out / FILE, "Memory per device of the NFNet recipes",
      common.command(MODULE, argv),
      [common.markdown_table(rows, columns(args.remat)), NOTES,
       f"backend {jax.default_backend()}, jax {jax.__version__}"])
  print(f"wrote {args.out / FILE}")
  return rows


if __name__ == "__main__":
  common.run_command(MODULE, main)
