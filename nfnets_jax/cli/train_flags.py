"""`nfnets-train`'s (and `nfnets-plan`'s) command line: `--help`, the
`--config` flag with its `--config.<field>` overrides, and flag checks.

Every mistake in the flags becomes one `errors.UsageError` (exit status 2)
naming the flag, the value and what is allowed, before JAX compiles
anything: a missing `--config` / `--workdir`, a config file that does not
exist or fails to load, an unknown `--config.<field>` (with the closest
field names), a value of the wrong type, an unknown flag.

The config files listed by `--help` are those of `configs/` in the current
directory and of the directory of `--config`: installed code does not know
where the repository is.
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
import difflib
import importlib.util
import os
import re
import sys
import textwrap

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from nfnets_jax.cli import errors

PROG = "nfnets-train"
HELP_ARGS = ("-h", "--help", "-help", "-?")
CONFIGS_DIR = "configs"

# (field, what it sets): the overrides most runs change. Every field is
# documented in configs/default.py.
COMMON_OVERRIDES = (
    ("train.global_batch_size", "images per step over all devices"),
    ("train.num_steps", "run length in steps (wins over num_epochs)"),
    ("train.num_epochs", "run length in epochs"),
    ("optimizer.lr.base_lr", "peak lr = base_lr x batch / base_batch_size"),
    ("dataset.name", "'digits', 'image_folder' or a TFDS dataset"),
    ("dataset.data_dir", "TFDS data directory, or the image folder"),
    ("model.kwargs.variant", "model variant, e.g. 'F1' for NFNet"),
    ("train.image_size", "training resolution in pixels"),
    ("pretrained.path", "fine-tune from this checkpoint file"),
    ("seed", "the one seed (init, data order, augmenting)"),
)

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally "
    "followed by ':<arg>' passed to its get_config (e.g. ':smoke').",
    lock_config=True)
# Flags each program requires: (name, what it is).
TRAIN_REQUIRED = (("config", "a config file such as configs/default.py"),
                  ("workdir", "a directory for the run's outputs"))
TRAIN_TAKES = ("--config, --workdir, --config.FIELD=VALUE, --reevaluate, "
               "--allow_config_change and --verbose")

_TYPE_WORDS = {bool: "true or false", int: "an int", float: "a number",
               str: "a string", tuple: "a tuple, e.g. '(1, 2)'"}


def _args_before_dashes(args: Sequence[str]) -> list[str]:
  args = list(args)
  return args[:args.index("--")] if "--" in args else args


def wants_help(args: Sequence[str]) -> bool:
  """True when `args` (without the program name) ask for `--help`."""
  return any(a in HELP_ARGS for a in _args_before_dashes(args))


def flag_value(args: Sequence[str], name: str) -> str | None:
  """The last value of `--name=V` or `--name V` in `args`, or None."""
  args = _args_before_dashes(args)
  value = None
  for i, arg in enumerate(args):
    for dashes in ("--", "-"):
      if arg.startswith(f"{dashes}{name}="):
        value = arg[len(dashes) + len(name) + 1:]
      elif arg == f"{dashes}{name}" and i + 1 < len(args):
        value = args[i + 1]
  return value


def config_docs(directory: str) -> list[tuple[str, str]]:
  """`(file name, first docstring line)` of each config in `directory`.

  The docstring is read with `ast` (the file is not run).
  """
  found = []
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    try:
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    except (OSError, SyntaxError, ValueError) as err:
      doc = f"(unreadable: {type(err).__name__})"
    lines = (doc or "").strip().splitlines()
    found.append((name, lines[0] if lines else "(no docstring)"))
  return found


def config_listing(args: Sequence[str]) -> list[str]:
  """Help lines listing the configs next to `--config` and in ./configs."""
  places = []
  spec = flag_value(args, "config")
  if spec:
    places.append((os.path.dirname(spec.partition(":")[0]) or os.curdir,
                   "next to --config"))
  places.append((CONFIGS_DIR, "in the current directory"))
  lines, seen = [], set()
  for directory, where in places:
    if not os.path.isdir(directory) or os.path.realpath(directory) in seen:
      continue
    seen.add(os.path.realpath(directory))
    docs = config_docs(directory)
    if not docs:
      continue
    lines.append(f"configs in {os.path.join(directory, '')} ({where}):")
    width = max(len(name) for name, _ in docs) + 2
    for name, doc in docs:
      lines += textwrap.wrap(doc, 78, initial_indent=f"  {name:<{width}}",
                             subsequent_indent=" " * (width + 2))
  if not lines:
    lines = textwrap.wrap(
        f"configs: none found (no {CONFIGS_DIR}/ in the current directory); "
        "run from the repository root, whose configs/ holds the shipped "
        "ones, or pass --config PATH.", 78)
  return lines


def help_text(args: Sequence[str]) -> str:
  """The `--help` text (`args`: the command line, to find `--config`)."""
  overrides = []
  for field, what in COMMON_OVERRIDES:
    overrides += textwrap.wrap(
        what, 79, initial_indent=f"  --config.{field:<25}",
        subsequent_indent=" " * 36)
  return "\n".join([
      f"usage: {PROG} --config CONFIG[:ARG] --workdir DIR",
      "                    [--config.FIELD=VALUE ...] [--reevaluate]",
      "                    [--allow_config_change=FIELD,...] [--verbose]",
      "",
      "Trains and evaluates an NFNet experiment described by a config file,",
      "then evaluates the raw and EMA weights. Running again with the same",
      "--workdir resumes from its newest checkpoint.",
      "",
      "examples:",
      f"  {PROG} --config configs/default.py --workdir /tmp/digits",
      f"  {PROG} --config configs/default.py:smoke --workdir /tmp/smoke \\",
      "      --config.train.num_steps=2",
      f"  {PROG} --config configs/nfnet.py:F3 --workdir DIR \\",
      "      --config.dataset.data_dir=/path/to/tfds",
      "",
      "flags:",
      "  --config CONFIG[:ARG]  a config file (configs/*.py); ':ARG' goes to",
      "                         its get_config (':F3', ':smoke': one tiny",
      "                         step); configs/nfnet_f3.py means",
      "                         configs/nfnet.py:f3",
      "  --workdir DIR          checkpoints, metrics.jsonl, TensorBoard "
      "events,",
      "                         config.json; an existing run is resumed",
      "  --config.FIELD=VALUE   set one config field (the config is locked:",
      "                         a misspelt field is an error)",
      "  --reevaluate           on a finished workdir, evaluate again (else",
      "                         its recorded result is printed)",
      "  --allow_config_change=FIELD,...",
      "                         resume although these fields changed (model,",
      "                         recipe, data...: refused otherwise); recorded",
      "                         in the workdir's config_changes.jsonl",
      f"  --verbose              show the traceback of an error (or "
      f"{errors.VERBOSE_ENV}=1)",
      "  --helpfull             every flag, absl's included",
      "",
      "common overrides (every field: the docstring of configs/default.py):",
      *overrides,
      "",
      *config_listing(args),
      "",
      "exit status: 0 done; 2 invalid input (flags, config, files, data), a",
      "workdir in use, a resume whose config changed, a checkpoint that",
      "cannot be written; 3 non-finite loss; 130 interrupted (the message",
      "says what was saved). Every case: docs/training.md#when-a-run-stops",
  ])


def resolve_config(spec: str) -> str:
  """`spec` ('path[:arg]'), or what an older per-variant name now means.

  A missing `DIR/<name>_<variant>.py` whose `DIR/<name>.py` exists is that
  file with the variant as its argument, before any `:arg` given:
  `configs/nfnet_f3.py:smoke` -> `configs/nfnet.py:f3,smoke` (the
  per-variant files became one parameterized config).
  """
  path, colon, arg = spec.partition(":")
  if os.path.isfile(path) or not path.endswith(".py"):
    return spec
  directory, name = os.path.split(path[:-len(".py")])
  parts = name.split("_")
  for i in range(len(parts) - 1, 0, -1):
    base = os.path.join(directory, "_".join(parts[:i]) + ".py")
    if os.path.isfile(base):
      return f"{base}:{'_'.join(parts[i:])}" + (f",{arg}" if colon else "")
  return spec


def _with_config(argv: Sequence[str], spec: str) -> list[str]:
  """`argv` with every `--config` value replaced by `spec`."""
  out, skip = [], False
  for i, arg in enumerate(argv):
    if arg == "--":
      return out + list(argv[i:])
    if skip:
      skip = False
      continue
    if i and arg in ("--config", "-config") and i + 1 < len(argv):
      out += [arg, spec]
      skip = True
    elif i and arg.startswith(("--config=", "-config=")):
      out.append(f"{arg.split('=', 1)[0]}={spec}")
    else:
      out.append(arg)
  return out


def load_config(spec: str) -> config_dict.ConfigDict:
  """Runs `get_config` of the file in `spec` ('path[:arg]'); locks it.

  Raises:
    errors.UsageError: no such file, or the file fails to load (it is the
      user's code: any exception in it is reported, traceback on --verbose).
  """
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    found = {d: [name for name, _ in config_docs(d)]
             for d in (os.path.dirname(path) or os.curdir, CONFIGS_DIR)
             if os.path.isdir(d)}
    hint = "; ".join(f"in {os.path.join(d, '')}: {', '.join(names)}"
                     for d, names in found.items() if names)
    raise errors.UsageError(f"--config={spec}: no such config file {path!r} "
                         f"(allowed: a config file{'; ' if hint else ''}"
                         f"{hint or ''})")
  module_spec = importlib.util.spec_from_file_location(
      "nfnets_train_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if colon else module.get_config()
  except Exception as err:  # pylint: disable=broad-except
    raise errors.UsageError(f"--config={spec}: loading {path} failed: "
                         f"{type(err).__name__}: {err}") from err
  if not isinstance(config, config_dict.ConfigDict):
    raise errors.UsageError(f"--config={spec}: get_config() of {path} returned "
                         f"{type(config).__name__}, not a ConfigDict")
  config.lock()
  return config


def field_paths(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every field and group of fields of `config`."""
  paths = []
  for key in sorted(config.keys()):
    paths.append(prefix + key)
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      paths += field_paths(value, f"{prefix}{key}.")
  return paths


def overrides(args: Sequence[str]) -> list[tuple[str, str]]:
  """`(field path, flag)` of each `--config.<field>` in `args`."""
  found = []
  for arg in _args_before_dashes(args):
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      found.append((m.group(1), arg.split("=", 1)[0]))
  return found


def _exists(path: str, config: config_dict.ConfigDict,
            paths: set[str]) -> bool:
  if path in paths:
    return True
  if "[" not in path:  # Only indexed paths (a.b[0]) need a lookup.
    return False
  try:
    config_path.get_value(path, config)
  except (KeyError, AttributeError, IndexError, TypeError, ValueError):
    return False
  return True


def unknown_field_line(path: str, flag: str, config: config_dict.ConfigDict,
                       paths: Sequence[str], source: str) -> str:
  """The problem line of an override of a field the config lacks."""
  node, known = config, []
  for part in path.split(".")[:-1]:
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      break
    node, known = node[part], known + [part]
  where = ".".join(["config", *known])
  if isinstance(node, config_dict.ConfigDict):
    has = f"{where} has: {', '.join(sorted(node.keys())) or 'no fields'}"
  else:
    kind = type(node).__name__
    has = (f"{where} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
           "group of fields")
  close = [p for p in paths if p.endswith("." + path)]
  close += [p for p in difflib.get_close_matches(path, paths, n=3,
                                                 cutoff=0.7)
            if p not in close]
  guess = ("; did you mean " + " or ".join(f"--config.{p}" for p in close[:3])
           + "?" if close else "")
  return f"{flag}: {source} has no field config.{path}{guess} ({has})"


def check_overrides(args: Sequence[str], config: config_dict.ConfigDict,
                    source: str) -> None:
  """Raises `errors.UsageError` listing each override of an unknown field.

  Args:
    args: the command line without the program name.
    config: the loaded config.
    source: the config file, for the message.
  """
  paths = field_paths(config)
  known = set(paths)
  lines = [unknown_field_line(path, flag, config, paths, source)
           for path, flag in overrides(args)
           if not _exists(path, config, known)]
  if len(lines) == 1:
    raise errors.UsageError(lines[0])
  if lines:
    raise errors.UsageError("unknown config fields:\n  " + "\n  ".join(lines))


def _allowed(path: str, config: config_dict.ConfigDict) -> str:
  try:
    kind = config_path.get_type(path, config)
    current = config_path.get_value(path, config)
  except (KeyError, AttributeError, IndexError, TypeError, ValueError):
    return ""
  if isinstance(current, config_dict.ConfigDict):
    current = current.to_dict()
    word = (f"a dict literal such as \"{{'key': 1}}\", or one field at a "
            f"time: --config.{path}.FIELD=VALUE")
  else:
    word = _TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind)))
  return f"; allowed: {word} (the config has {current!r})"


def flag_error_line(err: flags.Error,
                    config: config_dict.ConfigDict | None, *,
                    prog: str = PROG, takes: str = TRAIN_TAKES) -> str:
  """One line for an absl flag-parsing error, naming what is allowed."""
  text = str(err)
  m = re.match(r"flag --config\.([^=\s]+)=(.*?): (.*)$", text, re.S)
  if m and config is not None:
    path, value, reason = m.groups()
    if "Non-boolean argument" in reason:  # absl's text is a tuple's repr.
      reason = "not a boolean"
    elif "as a ConfigDict" in reason:  # ml_collections': an AST node's repr.
      reason = "not a dict literal"
    return (f"--config.{path}={value!r} is invalid: {reason}"
            f"{_allowed(path, config)}")
  if isinstance(err, flags.UnrecognizedFlagError):
    return f"{text}; {prog} takes {takes} (see --help)"
  return f"{text} (see --help)"


def _forget_parsed_flags() -> None:
  """Resets the flags a previous command in this process parsed.

  The config flag defines one `config.<field>` flag per override it parses:
  those go, so the next command line can name them again.
  """
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):
    if name.startswith(f"{CONFIG.name}."):
      delattr(flags.FLAGS, name)


def parse_flags(argv: Sequence[str], *,
                required: Sequence[tuple[str, str]] = TRAIN_REQUIRED,
                prog: str = PROG, takes: str = TRAIN_TAKES) -> list[str]:
  """Checks and parses the command line `argv` into absl's FLAGS.

  Args:
    argv: the command line, the program name first.
    required: `(flag, what it is)` of the flags that must be given.
    prog: the program, for messages.
    takes: the flags it takes, for the unknown-flag message.

  Returns:
    The arguments left after the flags (the program name first).

  Raises:
    errors.UsageError: any bad flag (see the module docstring).
  """
  _forget_parsed_flags()
  args = list(argv[1:])
  for name, what in required:
    if not flag_value(args, name):
      raise errors.UsageError(f"--{name} is required: {what} (see --help)")
  spec = resolve_config(flag_value(args, "config"))
  config = load_config(spec)
  check_overrides(args, config, spec.partition(":")[0])
  argv = _with_config(argv, spec)
  # ml_collections' config flag reads its `--config.*` overrides from
  # sys.argv, not from the list given to FLAGS: make them the same.
  saved, sys.argv = sys.argv, argv
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    raise errors.UsageError(
        flag_error_line(err, config, prog=prog, takes=takes)) from err
  finally:
    sys.argv = saved
