"""Command line for NFNet checkpoints: convert to a safe `.npz`, inspect.

  nfnets-convert convert F0_haiku.npz F0.npz
  nfnets-convert convert-timm dm_nfnet_f0.pth F0.npz
  nfnets-convert info F0.npz

(`python -m nfnets_jax.cli.convert` is the same program.)
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import pickle
import sys
from typing import Any
import warnings

import numpy as np

from nfnets_jax.cli import errors
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import official
from nfnets_jax.pretrained import timm

PROG = "nfnets-convert"


def _parser() -> argparse.ArgumentParser:
  """The command line; `--verbose` is accepted before or after a command."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error (or set "
                      f"{errors.VERBOSE_ENV}=1)")
  parser = argparse.ArgumentParser(
      prog=PROG, parents=[common],
      description="Convert NFNet checkpoints to a safe .npz of flat names.")
  sub = parser.add_subparsers(dest="command", required=True)
  for command, help_ in [
      ("convert", "official F*_haiku.npz (pickle) or .npz -> safe .npz"),
      ("convert-timm", "timm dm_nfnet_* .pth / .safetensors -> safe .npz")]:
    p = sub.add_parser(command, help=help_, parents=[common])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--variant", default=None,
                   help="check names/shapes against this NFNet variant "
                   "(default: the inferred one)")
  p = sub.add_parser("info", help="print variant and parameter count",
                     parents=[common])
  p.add_argument("input")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """`nfnets-convert {convert,convert-timm,info} ...`.

  convert IN OUT        official (pickled) checkpoint -> safe .npz
  convert-timm IN OUT   timm dm_nfnet_* .pth/.safetensors -> safe .npz
  info IN               print the variant and parameter count

  Args:
    argv: command-line arguments (default `sys.argv[1:]`).

  Returns:
    The exit status: 0, or 2 after one `PROG: error: ...` line naming the
    file (unsafe or unreadable file, params that do not match `--variant`,
    bad arguments).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  return errors.guard(PROG, lambda: _run(_parser().parse_args(argv)),
                   argv=argv)


def _read_timm(path: str) -> Mapping[str, Any]:
  """`timm.load_timm_file`, with what torch and safetensors raise as bad input.

  torch reports a file that is not a torch archive as KeyError, RuntimeError
  or EOFError, safetensors a bad header as its SafetensorError: the file is
  the user's, so any error reading it is reported as one message.
  """
  try:
    with warnings.catch_warnings():
      # torch warns about every pickle protocol but 2 (official files: 4).
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      return timm.load_timm_file(path)
  except OSError:
    raise
  except pickle.UnpicklingError as err:
    reason = str(err).rsplit("WeightsUnpickler error:", 1)[-1].strip()
    reason = reason.split("\n")[0]
    raise errors.UsageError(
        f"{path}: refused: torch's weights-only loader found something other "
        f"than tensors ({reason}); the file may be malicious, and nothing "
        "from it was run") from err
  except Exception as err:  # pylint: disable=broad-except
    raise errors.UsageError(
        f"{path}: not a readable timm checkpoint (expected a torch .pth / "
        f".bin file or a .safetensors file): {type(err).__name__}: {err}"
    ) from err


def _run(args: argparse.Namespace) -> int:
  """Carries out one `main` command."""
  if args.command == "convert-timm":
    params, _ = timm.from_timm_state_dict(_read_timm(args.input))
  else:
    params, _ = official.load_pretrained(args.input)
  count = sum(int(np.size(v)) for leaves in params.values()
              for v in leaves.values())
  try:
    variant = checks.infer_variant(params)
  except ValueError as e:
    variant = None
    if args.command == "info" or getattr(args, "variant", None) is None:
      print(f"warning: {e}", file=sys.stderr)
  if args.command == "info":
    print(f"{args.input}: variant={variant} params={count:,} "
          f"modules={len(params)} classes={checks.head_classes(params)}")
    return 0
  check_variant = args.variant or variant
  if check_variant is not None:
    checks.check_params(params, check_variant, source=args.input)
  out = official.save_npz(params, args.output)
  print(f"wrote {out}: variant={check_variant} params={count:,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
