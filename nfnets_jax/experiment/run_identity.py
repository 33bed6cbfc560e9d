"""A run's identity: what a resume may not change without saying so.

A workdir's `config.json` is written once, by the run that starts it, and
never overwritten. A run that resumes from the workdir's checkpoints must
train the network and recipe they were trained with: every config field is
part of that identity (model name and kwargs, dataset, image sizes,
optimizer and schedule, augmentation, dtype, seed, run length) except
`FREE_FIELDS`, which cannot change the trained state (where files are,
rematerialization, how often to log, evaluate or save, how the processes find each other, the
pretrained start that only a fresh run reads).

A resume that changes an identity field is refused (`ConfigChangedError`,
each field with its recorded and new value) unless the field is named in
`allowed` (`nfnets-train --allow_config_change=FIELD,...`; a name covers
the fields under it). Allowed changes are appended to
`config_changes.jsonl` beside `config.json`; `workdir_config` gives the
config the newest checkpoint was trained with (config.json plus them).
"""
from __future__ import annotations

from collections.abc import Sequence
import json
import os
import time
from typing import Any

from nfnets_jax.experiment import config_schema

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
# Fields (and the fields under them) that may change on a resume.
FREE_FIELDS = (
    "workdir", "model.remat", "dataset.data_dir", "dataset.num_workers",
    "train.log_every_steps", "train.prefetch", "train.debug_nan_at_step",
    "eval", "checkpoint", "distributed", "pretrained", "logging")

_ABSENT = "(not set)"  # A field one of the two configs does not have.


def _show(value: Any) -> str:
  return _ABSENT if value == _ABSENT else repr(value)


class ConfigChangedError(config_schema.ConfigError):
  """A resume's config differs from the run's in fields that shape what is
  trained; the message lists each with both values and what to do."""

  def __init__(self, workdir: str, changes: dict[str, tuple[Any, Any]]):
    self.changes = changes
    self.lines = [f"config.{field}: recorded {_show(old)}, now {_show(new)}"
                  for field, (old, new) in changes.items()]
    names = ",".join(changes)
    ValueError.__init__(
        self,
        f"the config differs from the one the checkpoints in {workdir} were "
        "trained with (its config.json):\n  " + "\n  ".join(self.lines)
        + "\nUse a new --workdir to start afresh, or resume with the change "
        f"on purpose: --allow_config_change={names} (recorded in "
        f"{os.path.join(workdir, CHANGES_FILE)}).")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}`; an empty dict stays a leaf."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _covers(names: Sequence[str], field: str) -> bool:
  return any(field == n or field.startswith(n + ".") for n in names)


def as_json(config: Any) -> dict[str, Any]:
  """A ConfigDict as the plain JSON values `config.json` holds."""
  return json.loads(config.to_json_best_effort())


def identity_changes(recorded: dict[str, Any], config: dict[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
  """`{field: (recorded, now)}` of the identity fields that differ (an empty
  dict, such as no model kwargs, counts as not set)."""
  def leaves(tree):
    return {k: v for k, v in flatten(tree).items() if v != {}}
  old, new = leaves(recorded), leaves(config)
  return {field: (old.get(field, _ABSENT), new.get(field, _ABSENT))
          for field in sorted(old.keys() | new.keys())
          if not _covers(FREE_FIELDS, field)
          and old.get(field, _ABSENT) != new.get(field, _ABSENT)}


def workdir_config(workdir: str) -> dict[str, Any]:
  """The config the workdir's newest checkpoint was trained with.

  Raises:
    FileNotFoundError: the workdir has no config.json.
  """
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    config = flatten(json.load(f))
  changes_path = os.path.join(workdir, CHANGES_FILE)
  if os.path.exists(changes_path):
    with open(changes_path) as f:
      for line in f:
        for field, (_, new) in json.loads(line)["changes"].items():
          if new == _ABSENT:
            config.pop(field, None)
          else:
            config[field] = new
  return unflatten(config)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def check_resume(workdir: str, config: Any, allowed: Sequence[str] = ()
                 ) -> dict[str, tuple[Any, Any]]:
  """The allowed identity changes of a resume (empty if none).

  Args:
    workdir: the run's workdir (its checkpoints exist).
    config: the resume's config.
    allowed: field names (dotted, without `config.`) that may change.

  Raises:
    ConfigChangedError: other identity fields changed.
    config_schema.ConfigError: an allowed name is not a config field.
  """
  current = as_json(config)
  fields = flatten(current)
  unknown = [n for n in allowed
             if not any(_covers((n,), f) for f in fields)]
  if unknown:
    raise config_schema.ConfigError([
        f"--allow_config_change={n!r} is invalid; allowed: names of config "
        "fields, e.g. model.kwargs.activation or train.num_steps"
        for n in unknown])
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):  # A workdir from before config.json.
    return {}
  changes = identity_changes(workdir_config(workdir), current)
  refused = {f: v for f, v in changes.items() if not _covers(allowed, f)}
  if refused:
    raise ConfigChangedError(workdir, refused)
  return changes


def write_config(workdir: str, config: Any) -> None:
  """Writes a new run's config.json (a resume never rewrites it)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def record_changes(workdir: str, step: int,
                   changes: dict[str, tuple[Any, Any]],
                   allowed: Sequence[str]) -> None:
  """Appends one resume's allowed changes to config_changes.jsonl."""
  record = {"step": step, "time": time.time(), "allowed": list(allowed),
            "changes": {f: [old, new] for f, (old, new) in changes.items()}}
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps(record) + "\n")
