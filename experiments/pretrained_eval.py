"""Top-1 / top-5 of a pretrained NFNet at the paper's test resolution and crop.

Evaluates one checkpoint on a split with the paper's single-crop protocol
(Brock et al. 2021, Appendix A.1): bicubic resize of the whole image to
`test_imsize + 32` px, central `test_imsize` crop (F0: 288 -> 256, F1: 352 ->
320, ... from `nfnets_jax.nfnet.NFNET_VARIANTS`), ImageNet mean/std
normalization; no test-time augmentation. Reports top-1, top-5 and the
softmax cross-entropy, beside the published ImageNet accuracy of the official
checkpoints when the split is ImageNet validation, and writes
`pretrained_eval.md` / `.csv` under `--out`.

Checkpoints (`--source`, default `auto`: a directory is a workdir, `.pth`,
`.pt`, `.bin`, `.safetensors` are timm, anything else official):
  official  DeepMind's `F0_haiku.npz` ... `F6_haiku.npz` (dill pickles, read
            by `nfnets_jax.pretrained.load_pretrained`'s restricted
            unpickler) or a safe `.npz` of `save_npz` / `python -m
            nfnets_jax.convert_checkpoint`; official forward
            (`OFFICIAL_NFNET_KWARGS`).
  timm      a `dm_nfnet_f*` state dict, converted by `from_timm_state_dict`;
            timm's forward (`TIMM_NFNET_KWARGS`: eps added to the weight
            variance, exact GELU). A timm checkpoint converted to `.npz`
            needs `--forward timm`.
  workdir   an `nfnets-train` workdir: the model, dataset, evaluation size
            and crop of its `config.json`, the raw and EMA params of its
            newest (or `--step`) checkpoint; the run's own final evaluation
            from `metrics.jsonl` is shown beside ours.
The variant is inferred from the params (`--variant` overrides: a name or a
JSON mapping of `NFNetVariant` fields); names and shapes are checked against
it before anything runs.

ImageNet validation (TFDS `imagenet2012` 'validation', 50,000 images, is the
split `test` of `nfnets_jax.data.Split`; prepare it once with `tfds build
imagenet2012 --data_dir=DIR --file_format=array_record` and the manual
download in DIR/downloads/manual):

  python -m experiments.pretrained_eval --checkpoint F0_haiku.npz \\
      --dataset imagenet2012 --split test --data_dir DIR --batch_size 100
  python -m experiments.pretrained_eval --checkpoint dm_nfnet_f0.pth \\
      --source timm --dataset imagenet2012 --split test --data_dir DIR

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

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from nfnets_jax.pretrained import create as builder  # noqa: E402
from nfnets_jax import data  # noqa: E402
from nfnets_jax.models import layers  # noqa: E402
from nfnets_jax.models import nfnet  # noqa: E402
from nfnets_jax.pretrained import checks as param_checks  # noqa: E402
from nfnets_jax.pretrained import official as pretrained
from nfnets_jax.pretrained import checks  # noqa: E402
from nfnets_jax.pretrained import timm as timm_weights  # noqa: E402
from nfnets_jax.experiment import evaluation  # noqa: E402
from nfnets_jax.experiment import logging as run_logging  # noqa: E402
from nfnets_jax.experiment import parallel  # noqa: E402

MODULE = "experiments.pretrained_eval"
SOURCES = ("auto", "official", "timm", "workdir")
FORWARDS = {"official": timm_weights.OFFICIAL_NFNET_KWARGS,
            "timm": timm_weights.TIMM_NFNET_KWARGS}
TIMM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The paper's evaluation: resize to test_imsize + 32, then center crop.
PAPER_CROP_PADDING = 32
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
  """One set of params ready to evaluate, and how to build its network.

  Attributes:
    label: which params ('raw', 'ema' of a workdir; 'params' of a file).
    params, model_state: host NumPy trees.
    model_name: a key of `nfnets_jax.models.MODELS`.
    model_kwargs: its constructor arguments.
    num_classes: classifier outputs.
    variant: the NFNet variant name ('F0', ...), 'custom (widths ...,
      depths ...)', or another family's variant / name.
    forward: 'official', 'timm' or 'run config'.
    loss: 'softmax' or 'sigmoid' (the eval loss).
    image_size, crop_padding: the default evaluation geometry.
    run_metrics: the training run's own final evaluation of these params
      (workdir only): `{'top1', 'top5', 'loss', 'step'}`.
    step: the workdir checkpoint's training step (None for files).
  """
  label: str
  params: hk.Params
  model_state: hk.State
  model_name: str
  model_kwargs: Mapping[str, Any]
  num_classes: int
  variant: str
  forward: str
  loss: str
  image_size: int
  crop_padding: int
  run_metrics: Mapping[str, float] | None = None
  step: int | None = None

  @property
  def num_params(self) -> int:
    return sum(int(np.size(v)) for leaves in self.params.values()
               for v in leaves.values())

  def network(self) -> hk.TransformedWithState:
    """This model's network, in `nfnets-train`'s form."""
    return builder.make_network(self.model_name, self.model_kwargs,
                                self.num_classes)


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def resolve_source(path: str, source: str) -> str:
  """The checkpoint kind: `source`, or guessed from the path for 'auto'.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: an unknown `source`, or one that does not fit the path.
  """
  if source not in SOURCES:
    raise ValueError(f"--source={source!r} is unknown; allowed: "
                     f"{list(SOURCES)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint={path!r} does not exist")
  is_dir = os.path.isdir(path)
  if source == "auto":
    if is_dir:
      return "workdir"
    return "timm" if path.lower().endswith(TIMM_SUFFIXES) else "official"
  if is_dir != (source == "workdir"):
    kind = lambda d: "a directory" if d else "a file"
    raise ValueError(f"--source={source!r} needs {kind(source == 'workdir')}"
                     f", but --checkpoint={path!r} is {kind(is_dir)}")
  return source


def parse_variant(value: str | None) -> str | nfnet.NFNetVariant | None:
  """`--variant`: a name ('F0', 'f0', 'dm_nfnet_f0') or a JSON mapping.

  Raises:
    ValueError: naming the value and the allowed ones.
  """
  if value is None:
    return None
  if value.lstrip().startswith("{"):
    try:
      mapping = json.loads(value)
      return nfnet.get_variant(mapping)
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


def _load_params_file(path: str, source: str) -> checks.Params:
  if source == "timm":
    params, _ = timm_weights.from_timm_state_dict(
        timm_weights.load_timm_file(path))
  else:
    params, _ = pretrained.load_pretrained(path)
  return params


def load_file(path: str, source: str, *, variant: str | None = None,
              forward: str | None = None, conv_impl: str = "auto"
              ) -> LoadedModel:
  """Loads an official/`.npz` or timm checkpoint as an NFNet.

  Args:
    path: the checkpoint file.
    source: 'official' or 'timm'.
    variant: `--variant` (None: inferred from the params).
    forward: 'official' or 'timm' model definition (None: the source's).
    conv_impl: `NFNet(conv_impl=...)`.

  Raises:
    ValueError: unreadable file, unknown variant, or (as
      `checks.ParamsMismatchError`) names/shapes that do not fit it.
  """
  forward = forward or source
  if forward not in FORWARDS:
    raise ValueError(f"--forward={forward!r} is unknown; allowed: "
                     f"{sorted(FORWARDS)}")
  spec = parse_variant(variant)
  params = _load_params_file(path, source)
  if spec is None:
    try:
      spec = checks.infer_variant(params)
    except ValueError as e:
      raise ValueError(f"{path}: cannot infer the NFNet variant ({e}); pass "
                       "--variant") from e
  num_classes = checks.head_classes(params)
  if num_classes is None:
    raise ValueError(f"{path}: no classifier 'NFNet/~/linear/w' [in, classes]"
                     " in the params; not an NFNet checkpoint")
  checks.check_params(params, spec, num_classes=num_classes,
                          source=f"--checkpoint={path!r}")
  test_imsize = nfnet.get_variant(spec).test_imsize
  return LoadedModel(
      label="params", params=params, model_state={}, model_name="NFNet",
      model_kwargs={"variant": spec, **FORWARDS[forward],
                    "conv_impl": conv_impl},
      num_classes=num_classes, variant=variant_label(spec), forward=forward,
      loss="softmax", image_size=test_imsize,
      crop_padding=PAPER_CROP_PADDING)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The `config.json` an `nfnets-train` run wrote into its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"--checkpoint={workdir!r} is a directory without config.json; not "
        "an nfnets-train workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _run_final_eval(workdir: str, step: int) -> dict[str, float] | None:
  """The run's last `eval` record of `step` from metrics.jsonl, if any."""
  try:
    records = run_logging.read_metrics(workdir, "eval")
  except OSError:
    return None
  records = [r for r in records if r.get("step") == step]
  return records[-1] if records else None


def _check_shapes(model: LoadedModel, where: str) -> None:
  """Raises `ParamsMismatchError` when the params do not fit the network."""
  want, _ = builder.model_shapes(model.model_name, model.model_kwargs,
                                 model.num_classes, model.image_size)
  param_checks.compare_shapes(
      model.params, want, source=where,
      target=f"{model.model_name}({dict(model.model_kwargs)}, "
      f"num_classes={model.num_classes})")


def load_workdir(workdir: str, *, step: int | None = None,
                 which: Sequence[str] = ("raw", "ema"),
                 num_classes: int | None = None) -> list[LoadedModel]:
  """Loads the raw and/or EMA params of an `nfnets-train` workdir.

  The model and the evaluation geometry come from the run's config.json,
  the params from its orbax checkpoint (`builder.load_workdir`).

  Args:
    workdir: the run's --workdir.
    step: a checkpoint step (None: the newest).
    which: 'raw' and/or 'ema' (EMA is skipped when the run kept none).
    num_classes: classifier outputs (None: the run's dataset's).

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: an unknown step or `which`, or params that do not fit.
  """
  bad = [w for w in which if w not in ("raw", "ema")]
  if bad or not which:
    raise ValueError(f"--params={','.join(which)!r}: allowed 'raw', 'ema' "
                     "or 'raw,ema'")
  config = read_run_config(workdir)
  step = builder.workdir_step(workdir, step)
  if num_classes is None:
    num_classes = data.dataset_info(config.dataset.name,
                                    config.dataset.data_dir).num_classes
  final = _run_final_eval(workdir, step)
  models = []
  for label in which:
    prefix = "" if label == "raw" else "ema_"
    ckpt = builder.load_workdir(workdir, step=step, use_ema=label == "ema")
    if ckpt.ema != (label == "ema"):
      if label == "ema" and "raw" in which:
        continue  # The run kept no EMA: evaluate the raw params only.
      raise ValueError(f"{workdir!r} step {step} has no {label} params")
    run_metrics = None
    if final is not None and f"{prefix}top1" in final:
      run_metrics = {"top1": final[f"{prefix}top1"],
                     "top5": final[f"{prefix}top5"],
                     "loss": final[f"{prefix}loss"], "step": step}
    kwargs = config.model.kwargs.to_dict()
    model = LoadedModel(
        label=label, params=ckpt.params, model_state=ckpt.state,
        model_name=config.model.name, model_kwargs=kwargs,
        num_classes=num_classes,
        variant=(variant_label(kwargs["variant"])
                 if config.model.name == "NFNet" and "variant" in kwargs
                 else str(kwargs.get("variant", config.model.name))),
        forward="run config", loss=config.train.loss,
        image_size=config.eval.image_size,
        crop_padding=config.eval.crop_padding, run_metrics=run_metrics,
        step=step)
    _check_shapes(model, f"--checkpoint={workdir!r} ({label} params)")
    models.append(model)
  return models


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


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


def evaluate_model(model: LoadedModel, *, dataset: str, split: data.Split,
                   data_dir: str | None, batch_size: int,
                   max_examples: int | None, image_size: int,
                   crop_padding: int,
                   eval_step: evaluation.EvalStep | None = None
                   ) -> dict[str, Any]:
  """Top-1, top-5 and loss of `model` on the first examples of a split.

  Data-parallel over the local devices (`evaluation.make_eval_step`); the
  batches come from `data.load`'s eval mode (resize to `image_size +
  crop_padding`, center crop, normalize; padding masked).

  Args:
    model: what to evaluate.
    dataset, split, data_dir: the data (as `nfnets_jax.data.load`).
    batch_size: images per batch (a multiple of the local device count).
    max_examples: evaluate only the first N examples (None: all).
    image_size, crop_padding: the crop, and the resize margin before it.
    eval_step: `evaluation.make_eval_step` of this model's network and loss
      (None: made here); pass one to share its compilation between params
      sets of one network, such as a run's raw and EMA params.

  Returns:
    `{'top1', 'top5', 'loss', 'count', 'num_batches', 'seconds'}` (top-k as
    fractions).
  """
  mesh = parallel.local_mesh()
  info = data.dataset_info(dataset, data_dir)
  total = info.splits[split].num_examples
  num_examples = total if max_examples is None else min(total, max_examples)
  num_batches = math.ceil(num_examples / batch_size)
  if eval_step is None:
    eval_step = evaluation.make_eval_step(model.network(), model.loss)
  params = parallel.replicate(model.params, mesh)
  model_state = parallel.replicate(model.model_state, mesh)
  batches = data.load(split, dataset=dataset, batch_size=batch_size,
                      image_size=image_size, is_training=False, seed=0,
                      eval_crop_padding=crop_padding, data_dir=data_dir)
  batches = common.progress(first_examples(batches, num_examples, batch_size),
                            f"{model.variant} {model.label}",
                            total=num_batches)
  start = time.time()
  metrics = evaluation.evaluate(eval_step, params, model_state, batches, mesh)
  metrics["seconds"] = time.time() - start
  metrics["num_batches"] = num_batches
  if int(metrics["count"]) != num_examples:
    raise RuntimeError(f"evaluated {metrics['count']} examples, expected "
                       f"{num_examples}")
  return metrics


def paper_reference(variant: str, dataset: str, split: data.Split,
                    num_classes: int) -> tuple[float, float] | None:
  """Published ImageNet-validation (top-1, top-5) % of an official variant."""
  short = dataset.split(":")[0]
  if short != PAPER_DATASET or split != data.Split.TEST or num_classes != 1000:
    return None
  return PAPER.get(variant)


def result_row(model: LoadedModel, metrics: Mapping[str, Any], *,
               checkpoint: str, source: str, dataset: str,
               split: data.Split, data_dir: str | None, image_size: int,
               crop_padding: int) -> dict[str, Any]:
  """One table row: what was evaluated, how, and the numbers."""
  info = data.dataset_info(dataset, data_dir)
  top1, top5 = 100.0 * metrics["top1"], 100.0 * metrics["top5"]
  ref = paper_reference(model.variant, dataset, split, model.num_classes)
  run = model.run_metrics
  same_protocol = (run is not None
                   and image_size == model.image_size
                   and crop_padding == model.crop_padding
                   and int(metrics["count"]) == info.splits[split].num_examples)
  return {
      "checkpoint": os.path.basename(os.path.normpath(checkpoint)),
      "source": source, "params": model.label, "step": model.step,
      "num_params": model.num_params, "variant": model.variant,
      "forward": model.forward, "classes": model.num_classes,
      "dataset": dataset, "split": split.name.lower(),
      "tfds_split": info.splits[split].spec, "examples": int(metrics["count"]),
      "resize_px": image_size + crop_padding, "crop_px": image_size,
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


def describe(checkpoint: str, source: str,
             models: Sequence[LoadedModel]) -> str:
  """A sentence on what was evaluated, for the Markdown file."""
  model = models[0]
  what = (f"{model.model_name} {model.variant}, {model.num_classes} classes, "
          f"{model.num_params:,} parameters")
  if source == "workdir":
    return (f"Checkpoint: the `nfnets-train` workdir `{checkpoint}`, step "
            f"{model.step} ({', '.join(m.label for m in models)} params; "
            f"{what}; model, data and evaluation size from its config.json).")
  return (f"Checkpoint: `{checkpoint}` ({source} format, {model.forward} "
          f"forward; {what}).")


def _parse_params_arg(value: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in value.split(",") if p.strip())


def make_parser() -> Any:
  """The command line (see the module docstring)."""
  parser = common.make_parser(MODULE, __doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="official/.npz or timm file, or nfnets-train "
                      "workdir")
  parser.add_argument("--source", default="auto", choices=SOURCES,
                      help="checkpoint kind (default: from the path)")
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
  parser.add_argument("--conv_impl", default="auto",
                      choices=layers.CONV_IMPLS,
                      help="grouped-conv lowering of official/timm NFNets")
  parser.add_argument("--params", default="raw,ema", type=_parse_params_arg,
                      help="workdir params to evaluate: raw, ema or raw,ema")
  parser.add_argument("--step", type=int, default=None,
                      help="workdir checkpoint step (default: the newest)")
  return parser


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
  if value is not None and value < minimum:
    raise ValueError(f"--{name}={value} must be >= {minimum}")


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
  max_examples = args.max_examples
  if args.quick and max_examples is None:
    max_examples = QUICK_MAX_EXAMPLES
  _check_positive("batch_size", args.batch_size)
  _check_positive("max_examples", max_examples)
  _check_positive("image_size", args.image_size)
  _check_positive("crop_padding", args.crop_padding, 0)
  devices = jax.local_device_count()
  if args.batch_size % devices:
    raise ValueError(f"--batch_size={args.batch_size} does not split over "
                     f"the {devices} local devices; use a multiple of "
                     f"{devices}")

  source = resolve_source(args.checkpoint, args.source)
  if source == "workdir":
    if args.variant is not None or args.forward is not None:
      raise ValueError("--variant and --forward are read from the workdir's "
                       "config.json; leave them unset with --source=workdir")
    config = read_run_config(args.checkpoint)
    dataset = args.dataset or config.dataset.name
    split_name = args.split or config.dataset.eval_split
    data_dir = args.data_dir or config.dataset.data_dir
  else:
    # The checkpoint is checked first: it needs no data.
    models = [load_file(args.checkpoint, source, variant=args.variant,
                        forward=args.forward, conv_impl=args.conv_impl)]
    dataset = args.dataset or PAPER_DATASET
    split_name = args.split or "test"
    data_dir = args.data_dir
  try:
    split = data.Split.from_string(split_name)
  except ValueError as e:
    raise ValueError(f"--split={split_name!r}: {e}") from e
  try:
    info = data.dataset_info(dataset, data_dir)  # Fails early: no data.
  except ValueError as e:
    raise ValueError(f"--dataset={dataset!r}: {e}") from e
  if source == "workdir":
    models = load_workdir(args.checkpoint, step=args.step, which=args.params,
                          num_classes=info.num_classes)
  rows, eval_steps = [], {}
  for model in models:
    if model.num_classes != info.num_classes:
      raise ValueError(
          f"--checkpoint={args.checkpoint!r} has {model.num_classes} classes"
          f" but --dataset={dataset!r} has {info.num_classes}; evaluate it on"
          " a dataset with its label set")
    image_size = args.image_size or model.image_size
    crop_padding = (model.crop_padding if args.crop_padding is None
                    else args.crop_padding)
    # One compilation per network: raw and EMA params share it.
    key = repr((model.model_name, sorted(model.model_kwargs.items()),
                model.num_classes, model.loss))
    if key not in eval_steps:
      eval_steps[key] = evaluation.make_eval_step(model.network(), model.loss)
    metrics = evaluate_model(
        model, dataset=dataset, split=split, data_dir=data_dir,
        batch_size=args.batch_size, max_examples=max_examples,
        image_size=image_size, crop_padding=crop_padding,
        eval_step=eval_steps[key])
    rows.append(result_row(
        model, metrics, checkpoint=args.checkpoint, source=source,
        dataset=dataset, split=split, data_dir=data_dir,
        image_size=image_size, crop_padding=crop_padding))
    print(f"{rows[-1]['checkpoint']} {model.label}: top-1 "
          f"{rows[-1]['top1']:.2f}%  top-5 {rows[-1]['top5']:.2f}%  loss "
          f"{rows[-1]['loss']:.4f}  ({rows[-1]['examples']} images, "
          f"{rows[-1]['resize_px']} -> {rows[-1]['crop_px']} px)")

  sections = [describe(args.checkpoint, source, models),
              common.markdown_table(rows, COLUMNS), NOTES + paper_table(),
              f"jax {jax.__version__}, {devices} {jax.default_backend()} "
              f"device(s); {sum(r['seconds'] for r in rows):.1f} s of "
              "evaluation (compilation included)."]
  common.write_markdown(args.out / "pretrained_eval.md",
                        "Pretrained evaluation: top-1/top-5 at the test "
                        "resolution", cmd, sections)
  common.write_csv(args.out / "pretrained_eval.csv", rows, CSV_COLUMNS)
  print(f"wrote {args.out / 'pretrained_eval.md'} and .csv")
  return rows


if __name__ == "__main__":
  common.run_command(MODULE, main)
