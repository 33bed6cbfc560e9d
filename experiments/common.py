"""What every experiment script shares: arguments, progress, tables.

Each script takes `--quick` (a small, fast run: what the tests use) and
`--out` (default `results/`), and writes its tables as Markdown and CSV whose
first line records the command that made them.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
import csv
import dataclasses
import pathlib
import sys
from typing import Any, TypeVar

import tqdm

from nfnets_jax.cli import compile_cache
from nfnets_jax.cli import errors

RESULTS_DIR = pathlib.Path("results")
MISSING = "—"  # Printed where a reference gives no number.

T = TypeVar("T")


def make_parser(module: str, description: str) -> argparse.ArgumentParser:
  """An argument parser with the shared `--quick` and `--out` flags.

  Args:
    module: the script's module name (`experiments.model_table`), shown in
      the usage line.
    description: the script's docstring.
  """
  parser = argparse.ArgumentParser(
      prog=f"python -m {module}", description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="small fast run (what the tests use)")
  parser.add_argument("--out", type=out_dir, default=RESULTS_DIR,
                      help="output directory (default: results/)")
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error (or set "
                      f"{errors.VERBOSE_ENV}=1)")
  return parser


def out_dir(value: str) -> pathlib.Path:
  """`--out`: checked before the run, which may take minutes."""
  path = pathlib.Path(value)
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(
        f"{value!r} is a file; allowed: a directory, or a path to create one")
  return path


def positive(kind: Callable[[str], T]) -> Callable[[str], T]:
  """An argparse type: `kind(value)` > 0, else a message naming the value."""
  def parse(value: str) -> T:
    try:
      number = kind(value)
    except ValueError:
      number = None
    if number is None or not number > 0:
      raise argparse.ArgumentTypeError(
          f"{value!r} is invalid; allowed: a positive {kind.__name__}")
    return number
  parse.__name__ = f"positive {kind.__name__}"
  return parse


def run_command(module: str, main: Callable[[], Any]) -> None:
  """Runs a script's `main()` as a command and exits.

  Bad input (arguments, files, data) ends with one `python -m MODULE:
  error: ...` line and exit status 2 (`nfnets_jax.cli.errors.guard`). JAX's
  persistent compilation cache is on, as for the package's commands
  (`nfnets_jax.cli.compile_cache`; `NFNETS_JAX_COMPILE_CACHE=0` turns it
  off).
  """
  compile_cache.enable()

  def command() -> int:
    main()
    return 0
  sys.exit(errors.guard(f"python -m {module}", command))


def command(module: str, argv: Sequence[str] | None) -> str:
  """The command line that runs `module` with `argv` (default: sys.argv)."""
  args = list(sys.argv[1:] if argv is None else argv)
  return " ".join(["python", "-m", module, *args])


def progress(items: Iterable[T], desc: str, total: int | None = None
             ) -> Iterable[T]:
  """A tqdm progress bar on stderr."""
  return tqdm.tqdm(items, desc=desc, total=total, file=sys.stderr,
                   dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class Column:
  """One table column.

  Attributes:
    key: the row dict's key.
    header: the Markdown header.
    fmt: formats a value for Markdown (CSV gets the raw value); `None`
      values print as `MISSING` in both.
  """
  key: str
  header: str
  fmt: Callable[[Any], str] = str


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
  return MISSING if value is None else fmt(value)


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[Column]) -> str:
  """Rows as a GitHub Markdown table (numbers right-aligned)."""
  def align(col):
    values = [r.get(col.key) for r in rows]
    numeric = all(v is None or isinstance(v, (int, float)) for v in values)
    return "---:" if numeric else ":---"
  lines = ["| " + " | ".join(c.header for c in columns) + " |",
           "|" + "|".join(align(c) for c in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c.key), c.fmt)
                                   for c in columns) + " |")
  return "\n".join(lines)


def write_csv(path: pathlib.Path, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[Column]) -> None:
  """Rows as CSV with the columns' keys as header; None as empty."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([c.key for c in columns])
    for row in rows:
      writer.writerow(["" if row.get(c.key) is None else row[c.key]
                       for c in columns])


def write_markdown(path: pathlib.Path, title: str, cmd: str,
                   sections: Sequence[str]) -> None:
  """A Markdown file: title, the command that made it, then `sections`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  text = [f"# {title}", "", f"Generated by `{cmd}`.", ""]
  for section in sections:
    text += [section.rstrip("\n"), ""]
  path.write_text("\n".join(text))


def fmt_int(v: int) -> str:
  return f"{v:,}"


def fmt_pct(v: float) -> str:
  return f"{v:+.2f}%"


def fmt_float(digits: int) -> Callable[[float], str]:
  return lambda v: f"{v:.{digits}f}"


def rel_diff_pct(ours: float, ref: float | None) -> float | None:
  """100 (ours - ref) / ref, or None without a reference."""
  return None if ref is None else 100.0 * (ours - ref) / ref
