"""The package's layout: no import cycle, model code free of CPU lowering,
no backend choice in models, configs or saved runs."""
import ast
import inspect
import json
import os
import pathlib
import re

import nfnets_jax as nj
from nfnets_jax.models import layers
import train_harness as testing

PACKAGE = pathlib.Path(nj.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
  """The package modules `path` imports, at any depth of its code.

  `from a.b import c` is module `a.b.c` if that is a module, else `a.b`;
  relative imports are resolved against the importing module.
  """
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.add(full if full in modules else base)
  return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_counting_function_local_imports():
  modules = _modules()
  graph = {name: _imports(path, name, set(modules))
           for name, path in modules.items()}
  # The top-level package re-exports everything; no module imports it.
  importers = sorted(m for m, deps in graph.items() if "nfnets_jax" in deps)
  assert not importers, importers
  graph = {m: deps - {"nfnets_jax"} for m, deps in graph.items()}
  cycle = _cycle(graph)
  assert cycle is None, " -> ".join(cycle)
  # The test sees function-local imports: the CLI's lazy ones are edges.
  assert "nfnets_jax.experiment.loop" in graph["nfnets_jax.cli.train"]


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_model_code_holds_no_lowering():
  source = inspect.getsource(layers)
  for word in ("custom_vjp", "custom_jvp", "conv_general_dilated", "onednn",
               "jax._src", "xla"):
    assert word not in source, word
  for path in (PACKAGE / "models").glob("*.py"):
    assert "custom_vjp" not in path.read_text(), path
  private = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if re.search(r"\bjax\._src\b", p.read_text())]
  assert not private, private


def test_no_backend_choice_in_models_or_configs():
  for family in [*nj.MODELS.values(), nj.WSConv2D]:
    assert "conv_impl" not in inspect.signature(family).parameters, family
  for path in pathlib.Path(testing.REPO, "configs").glob("*.py"):
    assert "conv_impl" not in path.read_text(), path


def test_a_new_runs_config_json_holds_no_backend_choice(reference_run):
  with open(os.path.join(reference_run, "config.json")) as f:
    text = f.read()
  assert "conv_impl" not in text and "onednn" not in text
  assert json.loads(text)["model"]["name"] == "NFNet"
