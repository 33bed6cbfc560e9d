r"""`nfnets-plan`: a config's memory and compute per device, before a run.

    nfnets-plan --config configs/nfnet.py:F0 --devices 8 --device-memory 80
    nfnets-plan --config configs/nfnet.py:F3 --devices 64 --device-memory 40 \
        --config.model.remat=True

Compiles the config's train step for one device's share of the global batch
(`experiment.memory_plan`: no data, no weights, nothing run) and prints the
parameters, FLOPs per image, per-device batch and micro-batch, XLA's peak
memory per device and, given the device memory, whether it fits and which
accumulation steps and/or remat would. The figures are those of the backend
that compiled the step (XLA:CPU on a machine without an accelerator).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys
from typing import Any

from nfnets_jax.cli import compile_cache
from nfnets_jax.cli import errors
from nfnets_jax.cli import train_flags

PROG = "nfnets-plan"
EXIT_DOES_NOT_FIT = 1
TAKES = ("--config, --config.FIELD=VALUE, --devices, --device-memory, --json "
         "and --verbose")
DESCRIPTION = f"""\
Compile an experiment config's train step for one device, without data or
training, and print what it needs: parameters, FLOPs per image, the
per-device batch and micro-batch, XLA's estimate of peak memory per device,
and whether it fits --device-memory; when it does not, the fewest
accumulation steps that fit, without and with remat (estimated from two
more compiles, then compiled). The figures are the compiling backend's
(XLA:CPU unless an accelerator is attached); GPU and TPU compilers fuse and
schedule differently (docs/training.md#plan-a-runs-memory-nfnets-plan).

Exit status: 0 fits (or no memory to check against); 1 does not fit;
2 bad input.

--config and --config.FIELD=VALUE are read as by nfnets-train (the model,
optimizer and train fields shape the step; the dataset gives the classes
from its metadata, no data is read).

examples:
  {PROG} --config configs/nfnet.py:F0 --devices 8 --device-memory 80
  {PROG} --config configs/nfnet.py:F3 --devices 64 --device-memory 40 \\
      --config.model.remat=True
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description=DESCRIPTION, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
      "--config", metavar="CONFIG[:ARG]", help="an experiment config file, "
      "e.g. configs/nfnet.py:F0 (required)")
  parser.add_argument(
      "--devices", type=int, default=None, metavar="N",
      help="data-parallel devices over all hosts (default: the devices "
      "this process sees)")
  parser.add_argument(
      "--device-memory", "--device_memory", dest="device_memory", type=float,
      default=None, metavar="GIB", help="memory of one device in GiB "
      "(default: what the attached accelerator reports; none on CPU)")
  parser.add_argument("--json", action="store_true",
                      help="print the plan as one JSON object")
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error")
  return parser


def _device_memory_gib() -> float | None:
  """The first local accelerator's memory in GiB (None on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return None
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return None if limit is None else limit / 2**30


def _size(n: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: float, unit: str = "") -> str:
  """`n` with a G, M or k prefix."""
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if n >= scale:
      return f"{n / scale:.2f} {prefix}{unit}"
  return f"{n:.0f} {unit}".rstrip()


def plan_dict(result: Any, config: Any, spec: str) -> dict[str, Any]:
  """The plan as JSON-able data (what `--json` prints)."""
  step = result.step
  return {
      "config": spec, "backend": step.backend,
      "model": config.model.name, "model_kwargs": config.model.kwargs.to_dict(),
      "params": result.num_params, "macs_per_image": result.macs_per_image,
      "image_size": config.train.image_size,
      "global_batch_size": config.train.global_batch_size,
      "devices": result.num_devices,
      "per_device_batch": result.per_device_batch,
      "accumulation_steps": step.accumulation_steps,
      "micro_batch": step.micro_batch, "remat": step.remat,
      "compute_dtype": config.train.compute_dtype,
      "peak_bytes": step.peak_bytes, "argument_bytes": step.argument_bytes,
      "output_bytes": step.output_bytes, "alias_bytes": step.alias_bytes,
      "temp_bytes": step.temp_bytes, "step_flops": step.flops,
      "compile_s": round(step.compile_s, 2),
      "device_memory_bytes": result.device_memory_bytes, "fits": result.fits,
      "suggestions": [
          {"accumulation_steps": s.accumulation_steps, "remat": s.remat,
           "micro_batch": s.micro_batch, "peak_bytes": s.peak_bytes}
          for s in result.suggestions],
  }


def plan_text(result: Any, config: Any, spec: str) -> str:
  """The plan as the lines `nfnets-plan` prints."""
  step, t = result.step, config.train
  backend = {"cpu": "XLA:CPU", "gpu": "XLA:GPU", "tpu": "XLA:TPU"}.get(
      step.backend, step.backend)
  lines = [
      f"{spec}: {config.model.name} {config.model.kwargs.to_dict()}",
      f"  parameters         {_count(result.num_params)}",
      f"  FLOPs per image    {_count(result.macs_per_image)} "
      f"multiply-accumulates, forward at {t.image_size} px",
      f"  batch              {t.global_batch_size} = {result.num_devices} "
      f"device{'s' if result.num_devices > 1 else ''} x "
      f"{result.per_device_batch}; accumulation_steps="
      f"{step.accumulation_steps} -> micro-batch {step.micro_batch}; "
      f"remat={step.remat}; {t.compute_dtype}",
      f"  peak memory        {_size(step.peak_bytes)} per device (arguments "
      f"{_size(step.argument_bytes)}, outputs not written in place "
      f"{_size(step.output_bytes - step.alias_bytes)}, temporaries "
      f"{_size(step.temp_bytes)})",
      f"  step FLOPs         {_count(step.flops)} per device "
      f"(XLA's count, multiplies and adds apart)" if step.flops >= 0 else
      "  step FLOPs         not reported by this backend",
      f"  compiled by        {backend} in {step.compile_s:.1f} s; GPU/TPU "
      "compilers fuse and schedule differently: a guide, not a measurement",
  ]
  if result.device_memory_bytes is None:
    lines.append("  fits               not checked (give --device-memory GIB)")
  elif result.fits:
    lines.append(f"  fits               yes: {_size(step.peak_bytes)} <= "
                 f"{_size(result.device_memory_bytes)}")
  else:
    lines.append(f"  fits               no: {_size(step.peak_bytes)} > "
                 f"{_size(result.device_memory_bytes)}")
    if not result.suggestions:
      lines.append("  to fit             nothing found among the accumulation "
                   "steps and remat tried: use more devices or less memory "
                   "per image (smaller images, bfloat16)")
    for i, s in enumerate(result.suggestions):
      lines.append(
          f"  {'to fit' if i == 0 else '':<18} {s.flags()} (micro-batch "
          f"{s.micro_batch}): {_size(s.peak_bytes)}, compiled")
  return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
  """The command on `argv` (program name first); returns the exit status.

  Bad input raises `errors.UsageError` or a `ConfigError` (a ValueError),
  which `errors.guard` reports with exit status 2.
  """
  args, rest = _parser().parse_known_args(list(argv[1:]))
  config_args = [a for a in rest if a.startswith(("--config", "-config"))]
  others = [a for a in rest if a not in config_args]
  if others:
    raise errors.UsageError(f"unrecognized arguments {others}; {PROG} takes "
                            f"{TAKES} (see --help)")
  # Positional arguments are among `others`: absl sees only --config ones.
  train_flags.parse_flags(
      [argv[0], *([f"--config={args.config}"] if args.config else []),
       *config_args],
      required=(("config", "a config file such as configs/nfnet.py:F0"),),
      prog=PROG, takes=TAKES)
  # pylint: disable=g-import-not-at-top
  import jax
  from nfnets_jax import data as data_lib
  from nfnets_jax.experiment import memory_plan
  # pylint: enable=g-import-not-at-top
  config = train_flags.CONFIG.value
  spec = train_flags.resolve_config(args.config)
  devices = jax.device_count() if args.devices is None else args.devices
  memory = (_device_memory_gib() if args.device_memory is None
            else args.device_memory)
  if memory is not None and memory <= 0:
    raise errors.UsageError(f"--device-memory={memory!r} is invalid; "
                            "allowed: a positive number of GiB")
  progress = None if args.json else (
      lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
  result = memory_plan.plan(
      config, num_devices=devices, device_memory_gib=memory,
      num_classes=data_lib.num_classes(config.dataset.name,
                                       config.dataset.data_dir),
      progress=progress)
  if args.json:
    print(json.dumps(plan_dict(result, config, spec)))
  else:
    print(plan_text(result, config, spec))
  return EXIT_DOES_NOT_FIT if result.fits is False else 0


def main() -> None:
  """Console entry point `nfnets-plan`."""
  compile_cache.enable()  # NFNETS_JAX_COMPILE_CACHE=0 turns it off.
  sys.exit(errors.guard(PROG, lambda: run(sys.argv)))


if __name__ == "__main__":
  main()
