"""Top-1 / top-5 of a pretrained NFNet at the paper's test resolution and crop.

Evaluates one checkpoint on a split with the paper's single-crop protocol
(Brock et al. 2021, Appendix A.1): bicubic resize of the whole image to
`test_imsize + 32` px, central `test_imsize` crop (F0: 288 -> 256, F1: 352 ->
320, ... from `nfnets_jax.models.nfnet.NFNET_VARIANTS`), ImageNet mean/std
normalization; no test-time augmentation. Reports top-1, top-5 and the
softmax cross-entropy, beside the published ImageNet accuracy of the official
checkpoints when the split is ImageNet validation, and writes
`pretrained_eval.md` / `.csv` under `--out`.

Checkpoints are read by `nfnets_jax.pretrained.create`, which tells them
apart by their content (`--source`, default `auto`, only insists on a kind):
  official  DeepMind's `F0_haiku.npz` ... `F6_haiku.npz` (read by a
            restricted unpickler) or a safe `.npz` (`nfnets-convert`); the
            official forward (the registry's `nfnet_f*`).
  timm      a `dm_nfnet_f*` state dict (`.pth`, `.safetensors`); timm's
            forward (`dm_nfnet_f*`: eps added to the weight variance, exact
            GELU), at the paper's crop too (timm's own F0 default resizes to
            284 px: `--crop_padding 28`). A timm checkpoint converted to
            `.npz` needs `--forward timm`.
  workdir   an `nfnets-train` workdir: the model, dataset, evaluation size
            and crop of its `config.json`, the raw and EMA params of its
            newest (or `--step`) checkpoint; the run's own final evaluation
            from `metrics.jsonl` is shown beside ours.
A file's NFNet variant is inferred from its params (`--variant` overrides: a
name or a JSON mapping of `NFNetVariant` fields); every param name and shape
is checked against the network before anything runs. Convolutions are
lowered as `$NFNETS_JAX_CONV` says (default `auto`).

ImageNet validation (TFDS `imagenet2012` 'validation', 50,000 images, is the
split `test` of `nfnets_jax.data.Split`; prepare it once with `tfds build
imagenet2012 --data_dir=DIR --file_format=array_record` and the manual
download in DIR/downloads/manual):

  python -m experiments.pretrained_eval --checkpoint F0_haiku.npz \\
      --dataset imagenet2012 --split test --data_dir DIR --batch_size 100
  python -m experiments.pretrained_eval --checkpoint dm_nfnet_f0.pth \\
      --dataset imagenet2012 --split test --data_dir DIR

The committed result (nothing to download; ~15 s after a ~2-4 min training):

  nfnets-train --config configs/default.py --workdir /tmp/pe_digits
  python -m experiments.pretrained_eval --checkpoint /tmp/pe_digits

`--quick` caps the evaluation at 64 examples (what the tests use).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

if __package__ in (None, ""):  # Run as `python experiments/pretrained_eval.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from nfnets_jax import data  # noqa: E402
from nfnets_jax.experiment import evaluation  # noqa: E402
from nfnets_jax.experiment import logging as run_logging  # noqa: E402
from nfnets_jax.experiment import parallel  # noqa: E402
from nfnets_jax.experiment import run_identity  # noqa: E402
from nfnets_jax.models import families  # noqa: E402
from nfnets_jax.models import nfnet  # noqa: E402
from nfnets_jax.models import stats  # noqa: E402
from nfnets_jax.pretrained import checks  # noqa: E402
from nfnets_jax.pretrained import create  # noqa: E402
from nfnets_jax.pretrained import registry  # noqa: E402
from nfnets_jax.pretrained import timm  # noqa: E402

MODULE = "experiments.pretrained_eval"
SOURCES = ("auto", "official", "timm", "workdir")
FORWARDS = {"official": timm.OFFICIAL_NFNET_KWARGS,
            "timm": timm.TIMM_NFNET_KWARGS}
PAPER_CROP_PADDING = registry.PAPER_CROP_PADDING
QUICK_MAX_EXAMPLES = 64

# ImageNet validation (top-1, top-5) in % of the released checkpoints: the
# official README's table (google-deepmind/deepmind-research,
# nfnets/README.md). The paper gives the same numbers in its ImageNet
# comparison, Table 3 of arXiv:2102.06171 (F0-F5 there are means over three
# seeds; F0-F3 top-1 also in Table 2's full-recipe row "+ CutMix"). F6 is the
# F6+SAM checkpoint; no F7 or `+` checkpoint was released.
PAPER: dict[str, tuple[float, float]] = {
    "F0": (83.6, 96.8), "F1": (84.7, 97.1), "F2": (85.1, 97.3),
    "F3": (85.7, 97.5), "F4": (85.9, 97.6), "F5": (86.0, 97.6),
    "F6": (86.5, 97.9),
}
PAPER_DATASET = "imagenet2012"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Params to evaluate and the network they fit.

  Attributes:
    label: 'params' (a file), 'raw' or 'ema' (a workdir).
    checkpoint: as `create.load_checkpoint` read it.
    spec: the network (`family`, `kwargs`) and its evaluation geometry.
    num_classes: the checkpoint's classifier outputs.
    forward: 'official', 'timm' or 'run config'.
    loss: the eval loss, 'softmax' or 'sigmoid'.
    run_metrics: a workdir run's own final `{'top1', 'top5', 'loss'}`.
  """
  label: str
  checkpoint: create.Checkpoint
  spec: registry.ModelSpec
  num_classes: int
  forward: str
  loss: str = "softmax"
  run_metrics: Mapping[str, float] | None = None

  @property
  def variant(self) -> str:
    """'F0', 'custom (widths ..., depths ...)', or the family's variant."""
    variant = self.spec.kwargs.get("variant", self.spec.family)
    if self.spec.family == "NFNet":
      return variant_label(variant)
    return str(variant)


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def resolve_source(path: str, source: str) -> str:
  """The kind of checkpoint `path` holds (by its content), if it is `source`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `source` is neither 'auto' nor that kind.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint={path!r} does not exist")
  found = create.detect_format(path)
  found = found if found in ("timm", "workdir") else "official"
  if source not in ("auto", found):
    raise ValueError(f"--source={source!r} does not fit --checkpoint={path!r}"
                     f" ({found} by its content); use --source={found} or "
                     "auto")
  return found


def parse_variant(value: str | None) -> str | nfnet.NFNetVariant | None:
  """`--variant`: a name ('F0', 'f0', 'dm_nfnet_f0') or a JSON mapping.

  Raises:
    ValueError: naming the value and the allowed ones.
  """
  if value is None:
    return None
  if value.lstrip().startswith("{"):
    try:
      return nfnet.get_variant(json.loads(value))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
      raise ValueError(f"--variant={value!r} is not a valid variant mapping: "
                       f"{e}") from e
  name = value.strip()
  match = re.fullmatch(r"(?:dm_nfnet_)?([fF]\d\+?)", name)
  if match:
    name = match.group(1).upper()
  try:
    nfnet.get_variant(name)
  except ValueError as e:
    raise ValueError(f"--variant={value!r}: {e}") from e
  return name


def variant_label(variant: Any) -> str:
  """'F0' for a named variant; widths and depths for a custom one."""
  if isinstance(variant, str):
    return variant
  v = nfnet.get_variant(variant)
  return (f"custom (widths {'-'.join(map(str, v.width))}, depths "
          f"{'-'.join(map(str, v.depth))})")


def fitted(label: str, ckpt: create.Checkpoint, spec: registry.ModelSpec,
           where: str, **fields: Any) -> LoadedModel:
  """The checkpoint as `spec`'s network, with its classifier's class count.

  Args:
    label, ckpt, spec: as `LoadedModel`'s.
    where: the params' origin, for errors.
    **fields: the other fields of `LoadedModel`.

  Raises:
    ValueError: params without the network's classifier.
    checks.ParamsMismatchError: params of another network, every differing
      name and shape listed.
  """
  head = stats.classifier_names(spec.family, spec.kwargs)
  num_classes = checks.checkpoint_classes(ckpt.params, head)
  if num_classes is None:
    raise ValueError(f"{where}: no classifier {head} in the params; not a "
                     f"{spec.family} checkpoint")
  want, _ = stats.param_shapes(spec.family, spec.kwargs, num_classes)
  kwargs = "".join(f"{k}={v!r}, " for k, v in spec.kwargs.items())
  checks.compare_shapes(
      ckpt.params, want, source=where,
      target=f"{spec.family}({kwargs}num_classes={num_classes})")
  return LoadedModel(label, ckpt, spec, num_classes, **fields)


def load_file(path: str, source: str, *, variant: str | None = None,
              forward: str | None = None) -> LoadedModel:
  """An official/`.npz` or timm checkpoint as an NFNet, at the paper's crop.

  Args:
    path: the checkpoint file.
    source: 'official' or 'timm' (`resolve_source`).
    variant: `--variant` (None: the params' own, `Checkpoint.spec`).
    forward: 'official' or 'timm' model definition (None: the source's).

  Raises:
    ValueError: an unreadable file, an unknown variant, or (as
      `checks.ParamsMismatchError`) names/shapes that do not fit it.
    UnsafeCheckpointError: a pickle asking for code (nothing ran).
  """
  variant = parse_variant(variant)
  ckpt = create.load_checkpoint(path)
  if variant is None and ckpt.spec is not None:
    variant = ckpt.spec.kwargs["variant"]
  elif variant is None:
    try:
      variant = checks.infer_variant(ckpt.params)
    except ValueError as e:
      raise ValueError(f"{path}: cannot infer the NFNet variant ({e}); pass "
                       "--variant") from e
  forward = forward or source
  v = nfnet.get_variant(variant)
  name = (registry.name_for_nfnet(variant, timm=forward == "timm")
          if isinstance(variant, str) else variant_label(variant))
  spec = registry.ModelSpec(
      name, "NFNet", {"variant": variant, **FORWARDS[forward]},
      registry.DataConfig(v.train_imsize, v.test_imsize, PAPER_CROP_PADDING))
  return fitted("params", ckpt, spec, f"--checkpoint={path!r}",
                forward=forward)


def _run_final_eval(workdir: str, step: int, label: str
                    ) -> dict[str, float] | None:
  """The run's last `eval` metrics of `step` and these params, if any."""
  prefix = "" if label == "raw" else "ema_"
  try:
    records = [r for r in run_logging.read_metrics(workdir, "eval")
               if r.get("step") == step and f"{prefix}top1" in r]
  except OSError:
    return None
  return ({k: records[-1][prefix + k] for k in ("top1", "top5", "loss")}
          if records else None)


def load_workdir(workdir: str, *, step: int | None = None,
                 which: Sequence[str] = ("raw", "ema"),
                 loss: str = "softmax") -> list[LoadedModel]:
  """The raw and/or EMA params of an `nfnets-train` workdir, as its model.

  Args:
    workdir: the run's --workdir.
    step: a checkpoint step (None: the newest).
    which: 'raw' and/or 'ema' (EMA is skipped when the run kept none).
    loss: the run's `train.loss`.

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: an unknown step or `which`, or params that do not fit.
  """
  if not which or any(w not in ("raw", "ema") for w in which):
    raise ValueError(f"--params={','.join(which)!r}: allowed 'raw', 'ema' "
                     "or 'raw,ema'")
  models = []
  for label in which:
    ckpt = create.load_workdir(workdir, step=step, use_ema=label == "ema")
    if ckpt.ema != (label == "ema"):
      if "raw" in which:
        continue  # The run kept no EMA: evaluate the raw params only.
      raise ValueError(f"{workdir!r} step {ckpt.step} has no {label} params")
    models.append(fitted(
        label, ckpt, ckpt.spec, f"--checkpoint={workdir!r} ({label} params)",
        forward="run config", loss=loss,
        run_metrics=_run_final_eval(workdir, ckpt.step, label)))
  return models


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The data (as `nfnets_jax.data.load` reads it) and how much of it.

  Attributes:
    dataset, split, data_dir: the data; `info` its `data.dataset_info`.
    batch_size: images per batch (a multiple of the local device count).
    num_examples: evaluate the first N examples of the split.
    image_size, crop_padding: the crop, and the resize margin before it.
  """
  dataset: str
  split: data.Split
  data_dir: str | None
  info: Any
  batch_size: int
  num_examples: int
  image_size: int
  crop_padding: int


def first_examples(batches: Iterable[dict[str, np.ndarray]],
                   num_examples: int, batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """The batches holding the first `num_examples` of an ordered eval pass.

  Examples past `num_examples` get mask 0 (they count for nothing).
  """
  num_batches = math.ceil(num_examples / batch_size)
  for b, batch in enumerate(itertools.islice(batches, num_batches)):
    index = b * batch_size + np.arange(len(batch["mask"]))
    yield {**batch, "mask": np.where(index < num_examples, batch["mask"],
                                     0.0).astype(np.float32)}


def evaluate_model(model: LoadedModel, d: EvalData,
                   eval_step: evaluation.EvalStep) -> dict[str, Any]:
  """Top-1, top-5 and loss of `model` on the first examples of a split.

  Data-parallel over the local devices; eval-mode batches of `data.load`
  (resize, center crop, normalize; padding masked).

  Args:
    model: what to evaluate.
    d: on what.
    eval_step: `evaluation.make_eval_step` of the model's network and loss.

  Returns:
    `{'top1', 'top5', 'loss', 'count', 'seconds'}` (top-k as fractions).
  """
  mesh = parallel.local_mesh()
  params = parallel.replicate(model.checkpoint.params, mesh)
  model_state = parallel.replicate(model.checkpoint.state, mesh)
  batches = data.load(d.split, dataset=d.dataset, batch_size=d.batch_size,
                      image_size=d.image_size, is_training=False, seed=0,
                      eval_crop_padding=d.crop_padding, data_dir=d.data_dir)
  batches = common.progress(
      first_examples(batches, d.num_examples, d.batch_size),
      f"{model.variant} {model.label}",
      total=math.ceil(d.num_examples / d.batch_size))
  start = time.time()
  metrics = evaluation.evaluate(eval_step, params, model_state, batches, mesh)
  metrics["seconds"] = time.time() - start
  if metrics["count"] != d.num_examples:
    raise RuntimeError(f"evaluated {metrics['count']} examples, expected "
                       f"{d.num_examples}")
  return metrics


def paper_reference(variant: str, dataset: str, split: data.Split,
                    num_classes: int) -> tuple[float, float] | None:
  """Published ImageNet-validation (top-1, top-5) % of an official variant."""
  short = dataset.split(":")[0]
  if short != PAPER_DATASET or split != data.Split.TEST or num_classes != 1000:
    return None
  return PAPER.get(variant)


def result_row(model: LoadedModel, metrics: Mapping[str, Any], d: EvalData,
               *, checkpoint: str, source: str) -> dict[str, Any]:
  """One table row: what was evaluated, how, and the numbers."""
  top1, top5 = 100.0 * metrics["top1"], 100.0 * metrics["top5"]
  ref = paper_reference(model.variant, d.dataset, d.split, model.num_classes)
  run = model.run_metrics
  # The run's own numbers are comparable on its whole split at its geometry.
  same_protocol = (run is not None
                   and (d.image_size, d.crop_padding) == (
                       model.spec.data.test_size, model.spec.data.crop_padding)
                   and d.num_examples == d.info.splits[d.split].num_examples)
  return {
      "checkpoint": os.path.basename(os.path.normpath(checkpoint)),
      "source": source, "params": model.label,
      "step": model.checkpoint.step,
      "num_params": stats.count_params(model.checkpoint.params),
      "variant": model.variant, "forward": model.forward,
      "classes": model.num_classes, "dataset": d.dataset,
      "split": d.split.name.lower(),
      "tfds_split": d.info.splits[d.split].spec,
      "examples": metrics["count"],
      "resize_px": d.image_size + d.crop_padding, "crop_px": d.image_size,
      "top1": top1, "top5": top5, "loss": metrics["loss"],
      "paper_top1": None if ref is None else ref[0],
      "paper_top5": None if ref is None else ref[1],
      "top1_minus_paper": None if ref is None else top1 - ref[0],
      "run_top1": 100.0 * run["top1"] if same_protocol else None,
      "run_top5": 100.0 * run["top5"] if same_protocol else None,
      "run_loss": run["loss"] if same_protocol else None,
      "seconds": metrics["seconds"],
  }


# ----------------------------------------------------------------------------
# Tables and the command line.
# ----------------------------------------------------------------------------


def _pct(v: float) -> str:
  return f"{v:.2f}"


def _pp(v: float) -> str:
  return f"{v:+.2f}"


COLUMNS = [
    common.Column("checkpoint", "Checkpoint", lambda v: f"`{v}`"),
    common.Column("params", "Params"),
    common.Column("step", "Step"),
    common.Column("variant", "Variant"),
    common.Column("forward", "Forward"),
    common.Column("dataset", "Dataset"),
    common.Column("tfds_split", "Split"),
    common.Column("examples", "Images", common.fmt_int),
    common.Column("resize_px", "Resize px"),
    common.Column("crop_px", "Crop px"),
    common.Column("top1", "Top-1 %", _pct),
    common.Column("top5", "Top-5 %", _pct),
    common.Column("loss", "Loss", common.fmt_float(5)),
    common.Column("paper_top1", "Paper top-1 %", lambda v: f"{v:.1f}"),
    common.Column("paper_top5", "Paper top-5 %", lambda v: f"{v:.1f}"),
    common.Column("top1_minus_paper", "Δ top-1 (pp)", _pp),
    common.Column("run_top1", "Run's own top-1 %", _pct),
    common.Column("run_loss", "Run's own loss", common.fmt_float(5)),
]
CSV_COLUMNS = [
    *COLUMNS[:5], common.Column("source", "Source"),
    common.Column("num_params", "Parameters"),
    common.Column("classes", "Classes"), common.Column("split", "Split"),
    *COLUMNS[5:], common.Column("run_top5", "Run's own top-5 %"),
    common.Column("seconds", "Seconds"),
]


def paper_table() -> str:
  """The published numbers, for every official checkpoint."""
  rows = [{"variant": v, "test_px": nfnet.NFNET_VARIANTS[v].test_imsize,
           "resize_px": nfnet.NFNET_VARIANTS[v].test_imsize
           + PAPER_CROP_PADDING, "top1": t1, "top5": t5,
           "file": f"{v}_haiku.npz", "timm": f"dm_nfnet_{v.lower()}"}
          for v, (t1, t5) in PAPER.items()]
  columns = [common.Column("variant", "Variant"),
             common.Column("file", "Official file", lambda v: f"`{v}`"),
             common.Column("timm", "timm model", lambda v: f"`{v}`"),
             common.Column("resize_px", "Resize px"),
             common.Column("test_px", "Crop px"),
             common.Column("top1", "Top-1 %", lambda v: f"{v:.1f}"),
             common.Column("top5", "Top-5 %", lambda v: f"{v:.1f}")]
  return common.markdown_table(rows, columns)


NOTES = f"""\
**Protocol.** Each image is resized (bicubic, TF's half-pixel kernel without
antialiasing, aspect not kept) to *Resize px* = test size + crop padding,
center-cropped to *Crop px*, and normalized with the ImageNet mean and
standard deviation (`nfnets_jax.data`, eval mode); one crop, no test-time
augmentation. For the official checkpoints the test size is the variant's
`test_imsize` and the padding 32, as in the paper (Appendix A.1). For an
`nfnets-train` workdir both come from the run's config (`eval.image_size`,
`eval.crop_padding`): the digits config evaluates at 16 px without padding
(the 8x8 digits, upsampled once to 16 px by the data source, fill the whole
frame, so a crop would cut strokes). *Loss* is the mean cross-entropy against
the true label. *Run's own* columns are the final evaluation the training run
logged in `metrics.jsonl` for the same checkpoint (shown only when the split,
size and crop are the run's and every example was evaluated): the same
pipeline and params, so the numbers must agree (the loss up to float32
summation order, as the batch sizes may differ).

**Forward.** `official`: `NFNet` defaults (`OFFICIAL_NFNET_KWARGS`); `timm`:
`TIMM_NFNET_KWARGS` (weight-standardization eps added to the variance, exact
GELU), which reproduces timm's `dm_nfnet_*` logits; `run config`: the model
kwargs of the training run.

**ImageNet.** The numbers above are for whatever was evaluated; ImageNet
numbers need the downloaded checkpoints
(`https://storage.googleapis.com/dm-nfnets/F{{0..6}}_haiku.npz`, or timm's
`dm_nfnet_f0`...`f6`) and a prepared TFDS `imagenet2012` (nothing here can
download either), then:

    python -m {MODULE} --checkpoint F0_haiku.npz --dataset imagenet2012 \\
        --split test --data_dir DIR --batch_size 100

(`test` is TFDS `validation`, 50,000 images, in `nfnets_jax.data.Split`'s
convention.) Published top-1/top-5 of the released checkpoints, which the
table shows beside ours for that split: the official README of
google-deepmind/deepmind-research `nfnets/`, the same numbers as the paper's
ImageNet comparison (Table 3 of arXiv:2102.06171, where F0-F5 are means over
three seeds; F0-F3 top-1 also in Table 2's "+ CutMix" row); F6 is F6+SAM.

"""


def describe(checkpoint: str, source: str, rows: Sequence[Mapping[str, Any]],
             model: LoadedModel) -> str:
  """A sentence on what was evaluated, for the Markdown file."""
  what = (f"{model.spec.family} {model.variant}, {model.num_classes} "
          f"classes, {rows[0]['num_params']:,} parameters")
  if source == "workdir":
    return (f"Checkpoint: the `nfnets-train` workdir `{checkpoint}`, step "
            f"{rows[0]['step']} ({', '.join(r['params'] for r in rows)} "
            f"params; {what}; model, data and evaluation size from its "
            "config.json).")
  return (f"Checkpoint: `{checkpoint}` ({model.checkpoint.format} format, "
          f"{model.forward} forward; {what}).")


def _parse_params_arg(value: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in value.split(",") if p.strip())


def make_parser() -> Any:
  """The command line (see the module docstring)."""
  parser = common.make_parser(MODULE, __doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="official/.npz or timm file, or nfnets-train "
                      "workdir")
  parser.add_argument("--source", default="auto", choices=SOURCES,
                      help="checkpoint kind (default: from its content)")
  parser.add_argument("--variant", default=None,
                      help="NFNet variant name (F0...) or JSON mapping of "
                      "NFNetVariant fields (default: inferred)")
  parser.add_argument("--forward", default=None, choices=sorted(FORWARDS),
                      help="model definition (default: the source's)")
  parser.add_argument("--dataset", default=None,
                      help="'digits' or a prepared TFDS dataset (default: "
                      "imagenet2012; a workdir's own)")
  parser.add_argument("--split", default=None,
                      help="train, train_and_valid, valid or test (default: "
                      "test; a workdir's eval split)")
  parser.add_argument("--data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="images per batch, a multiple of the local device "
                      "count")
  parser.add_argument("--max_examples", type=int, default=None,
                      help="evaluate only the first N examples of the split")
  parser.add_argument("--image_size", type=int, default=None,
                      help="crop size (default: the variant's test_imsize; "
                      "a workdir's eval.image_size)")
  parser.add_argument("--crop_padding", type=int, default=None,
                      help="resize to image_size + this before the center "
                      "crop (default 32; a workdir's eval.crop_padding)")
  parser.add_argument("--params", default="raw,ema", type=_parse_params_arg,
                      help="workdir params to evaluate: raw, ema or raw,ema")
  parser.add_argument("--step", type=int, default=None,
                      help="workdir checkpoint step (default: the newest)")
  return parser


def _check_flags(args: Any) -> None:
  """Raises ValueError naming a flag whose number is out of range."""
  for name, minimum in (("batch_size", 1), ("max_examples", 1),
                        ("image_size", 1), ("crop_padding", 0)):
    value = getattr(args, name)
    if value is not None and value < minimum:
      raise ValueError(f"--{name}={value} must be >= {minimum}")
  devices = jax.local_device_count()
  if args.batch_size % devices:
    raise ValueError(f"--batch_size={args.batch_size} does not split over "
                     f"the {devices} local devices; use a multiple of "
                     f"{devices}")


def load(args: Any, source: str) -> tuple[list[LoadedModel], EvalData]:
  """The params to evaluate and the data, from the flags.

  A file is read first (it needs no data); a workdir's data flags default
  to its config's, and its checkpoint is read once the data is known to be
  there.
  """
  if source == "workdir":
    if args.variant is not None or args.forward is not None:
      raise ValueError("--variant and --forward are read from the workdir's "
                       "config.json; leave them unset with --source=workdir")
    create.workdir_spec(args.checkpoint)  # Says why it is not a workdir.
    config = run_identity.workdir_config(args.checkpoint)
    dataset = args.dataset or config["dataset"]["name"]
    split_name = args.split or config["dataset"]["eval_split"]
    data_dir = args.data_dir or config["dataset"].get("data_dir")
  else:
    models = [load_file(args.checkpoint, source, variant=args.variant,
                        forward=args.forward)]
    dataset, split_name = args.dataset or PAPER_DATASET, args.split or "test"
    data_dir = args.data_dir
  try:
    split = data.Split.from_string(split_name)
  except ValueError as e:
    raise ValueError(f"--split={split_name!r}: {e}") from e
  try:
    info = data.dataset_info(dataset, data_dir)
  except ValueError as e:
    raise ValueError(f"--dataset={dataset!r}: {e}") from e
  if source == "workdir":
    models = load_workdir(args.checkpoint, step=args.step, which=args.params,
                          loss=config["train"]["loss"])
  if models[0].num_classes != info.num_classes:
    raise ValueError(
        f"--checkpoint={args.checkpoint!r} has {models[0].num_classes} "
        f"classes but --dataset={dataset!r} has {info.num_classes}; evaluate"
        " it on a dataset with its label set")
  num_examples = info.splits[split].num_examples
  max_examples = args.max_examples or (QUICK_MAX_EXAMPLES if args.quick
                                       else num_examples)
  geometry = models[0].spec.data
  return models, EvalData(
      dataset=dataset, split=split, data_dir=data_dir, info=info,
      batch_size=args.batch_size,
      num_examples=min(num_examples, max_examples),
      image_size=args.image_size or geometry.test_size,
      crop_padding=(geometry.crop_padding if args.crop_padding is None
                    else args.crop_padding))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Evaluates `--checkpoint`; writes `pretrained_eval.md` / `.csv`.

  Returns:
    The table rows (one per evaluated params set).

  Raises:
    FileNotFoundError: a missing checkpoint.
    ValueError: naming the bad flag and value (unknown source, variant,
      split or dataset; params that do not fit the variant; a class count
      that is not the dataset's; a batch size that does not split over the
      devices).
  """
  args = make_parser().parse_args(argv)
  cmd = common.command(MODULE, argv)
  _check_flags(args)
  source = resolve_source(args.checkpoint, args.source)
  models, eval_data = load(args, source)
  # A workdir's raw and EMA params share their network: one compilation.
  model = models[0]
  eval_step = evaluation.make_eval_step(families.make_network(
      model.spec.family, model.spec.kwargs, model.num_classes), model.loss)
  rows = []
  for model in models:
    metrics = evaluate_model(model, eval_data, eval_step)
    row = result_row(model, metrics, eval_data, checkpoint=args.checkpoint,
                     source=source)
    rows.append(row)
    print(f"{row['checkpoint']} {model.label}: top-1 {row['top1']:.2f}%  "
          f"top-5 {row['top5']:.2f}%  loss {row['loss']:.4f}  "
          f"({row['examples']} images, {row['resize_px']} -> "
          f"{row['crop_px']} px)")

  sections = [describe(args.checkpoint, source, rows, models[0]),
              common.markdown_table(rows, COLUMNS), NOTES + paper_table(),
              f"jax {jax.__version__}, {jax.local_device_count()} "
              f"{jax.default_backend()} device(s); "
              f"{sum(r['seconds'] for r in rows):.1f} s of evaluation "
              "(compilation included)."]
  common.write_markdown(args.out / "pretrained_eval.md",
                        "Pretrained evaluation: top-1/top-5 at the test "
                        "resolution", cmd, sections)
  common.write_csv(args.out / "pretrained_eval.csv", rows, CSV_COLUMNS)
  print(f"wrote {args.out / 'pretrained_eval.md'} and .csv")
  return rows


if __name__ == "__main__":
  common.run_command(MODULE, main)
