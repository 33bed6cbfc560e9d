"""The documentation runs as written: README.md and docs/*.md.

1. Snippets. Every fenced ```python block of a file runs, the file's blocks
   in order in one namespace, in a fresh temporary working directory. A
   traceback points at the Markdown file and line. Before they run, the test
   gives the snippets what a reader would have:
   - the quick start's workdir: `/tmp/nfnets_default` in a snippet (or a
     command) is replaced by the session's finished tiny training run
     (`reference_run` of tests/conftest.py: the digits config's smoke model,
     12 steps), so no test trains the 39 s default experiment;
   - timm's `dm_nfnet_f0.safetensors` (docs/pretrained.md): written into
     the working directory from `perturbed_timm_f0` of tests/conftest.py, a
     randomly initialized, perturbed timm `dm_nfnet_f0` (the real file is
     timm's download, which this test cannot make);
   - `broken.jpg` (README.md): a file that is not an image.
   Shell examples (```bash, ```console) are not run, except:
2. the README's `nfnets-predict` example: each `$ nfnets-predict ...` line of
   its ```console blocks runs in-process (`nfnets_jax.cli.predict.main`) in
   the directory where the README's snippets wrote their PNG files, on the
   tiny run. Its stderr and exit status must be the ones shown; its stdout
   the lines shown, for the same images in the same order with the same
   number of labels each (the tiny run is not the quick start's model, so
   labels and probabilities are not compared).
3. Links. Every relative Markdown link and image of those files (and of
   benchmarks/results/HISTORY.md) names an existing file or folder, and an
   anchor (`page.md#heading`) a heading of that page (GitHub's heading ids).
   Web links are not fetched.

docs/pretrained.md runs an F0-sized model (create_model from the timm file
and one forward at 256 px, ~15 s on 2 CPU cores): marked slow.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# Link-checked too (no snippets): the measurement history the docs point to.
HISTORY = REPO / "benchmarks" / "results" / "HISTORY.md"
QUICKSTART_WORKDIR = "/tmp/nfnets_default"
SLOW_PAGES = {"docs/pretrained.md"}  # An F0-sized forward.
# Files a page's snippets expect in the working directory -> how to make them.
NEEDS_TIMM_F0 = {"docs/pretrained.md"}
NEEDS_BROKEN_IMAGE = {"README.md"}
README_MAX_LINES = 200


def rel(path: pathlib.Path) -> str:
  return path.relative_to(REPO).as_posix()


@dataclasses.dataclass(frozen=True)
class Block:
  """A fenced code block: its info string's first word, first line, text."""
  lang: str
  line: int  # 1-based line of the block's first content line.
  text: str


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


def fenced_blocks(text: str) -> list[Block]:
  """The fenced code blocks of a Markdown text, in order."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, indent = m["fence"], len(m["indent"])
    lang = (m["info"].split() or [""])[0].lower()
    body, j = [], i + 1
    while j < len(lines) and not (
        lines[j].strip().startswith(fence[0] * len(fence))
        and not lines[j].strip().strip(fence[0])):
      line = lines[j]
      body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
      j += 1
    blocks.append(Block(lang, i + 2, "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def without_code(text: str, *, inline: bool = True) -> str:
  """`text` with fenced blocks (and inline code spans) blanked, lines kept."""
  out, in_fence, fence = [], False, ""
  for line in text.splitlines():
    m = _FENCE.match(line)
    if not in_fence and m:
      in_fence, fence = True, m["fence"]
      out.append("")
      continue
    if in_fence:
      stripped = line.strip()
      if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(
          fence[0]):
        in_fence = False
      out.append("")
      continue
    out.append(re.sub(r"(`+).*?\1", "", line) if inline else line)
  return "\n".join(out)


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?"
                   r"(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[tuple[int, str]]:
  """`(line, target)` of every inline link and image outside code."""
  found = []
  for n, line in enumerate(without_code(text).splitlines(), 1):
    found += [(n, m.group(1)) for m in _LINK.finditer(line)]
  return found


def heading_ids(text: str) -> set[str]:
  """GitHub's ids of a Markdown file's ATX headings (with -1, -2 repeats)."""
  ids, seen = set(), {}
  for line in without_code(text, inline=False).splitlines():
    m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    ids.add(slug if count == 0 else f"{slug}-{count}")
  return ids


def _has_snippets(page: pathlib.Path) -> bool:
  return any(b.lang in ("python", "py") for b in fenced_blocks(page.read_text()))


def _page_params():
  """The pages with python snippets (the others have nothing to run)."""
  return [pytest.param(p, id=rel(p),
                       marks=[pytest.mark.slow] if rel(p) in SLOW_PAGES else [])
          for p in PAGES if _has_snippets(p)]


def _prepare_workdir(page: pathlib.Path, request) -> None:
  """Writes the files `page`'s snippets expect into the current directory."""
  name = rel(page)
  if name in NEEDS_TIMM_F0:
    import safetensors.torch as safetensors_torch  # pylint: disable=g-import-not-at-top
    torch_model, *_ = request.getfixturevalue("perturbed_timm_f0")
    safetensors_torch.save_file(torch_model.state_dict(),
                                "dm_nfnet_f0.safetensors")
  if name in NEEDS_BROKEN_IMAGE:
    pathlib.Path("broken.jpg").write_bytes(b"not an image")


def _quickstart_workdir(text: str, request) -> str:
  """`text` with the quick start's workdir replaced by the tiny run's."""
  if QUICKSTART_WORKDIR not in text:
    return text
  return text.replace(QUICKSTART_WORKDIR,
                      str(request.getfixturevalue("reference_run")))


def run_snippets(page: pathlib.Path, request) -> dict:
  """Runs `page`'s python blocks in order in the current directory."""
  namespace = {"__name__": f"docs_snippets_{page.stem}"}
  for block in fenced_blocks(page.read_text()):
    if block.lang not in ("python", "py"):
      continue
    source = _quickstart_workdir(block.text, request)
    # Blank lines before the block: tracebacks name the Markdown line.
    code = compile("\n" * (block.line - 1) + source, str(page), "exec")
    exec(code, namespace)  # pylint: disable=exec-used
  return namespace


@pytest.fixture(scope="module")
def readme_dir(request, tmp_path_factory):
  """A directory where the README's snippets ran (and wrote their files)."""
  directory = tmp_path_factory.mktemp("readme")
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(directory)
    _prepare_workdir(README, request)
    run_snippets(README, request)
  return directory


@pytest.mark.parametrize("page", _page_params())
def test_python_snippets_run(page, request, tmp_path, monkeypatch):
  if page == README:  # Shared with the nfnets-predict test.
    request.getfixturevalue("readme_dir")
    return
  monkeypatch.chdir(tmp_path)
  _prepare_workdir(page, request)
  run_snippets(page, request)


def _console_commands(text: str, program: str
                      ) -> list[tuple[int, list[str], list[str]]]:
  """`(line, argv, shown output lines)` of each `$ program ...` line."""
  found = []
  for block in fenced_blocks(text):
    if block.lang != "console":
      continue
    lines = block.text.splitlines()
    for i, line in enumerate(lines):
      if not line.startswith(f"$ {program} "):
        continue
      shown = []
      for out in lines[i + 1:]:
        if out.startswith("$ "):
          break
        shown.append(out)
      found.append((block.line + i, shlex.split(line[2:])[1:], shown))
  return found


_PREDICT_LINE = re.compile(r"^(?P<path>[^:]+): (?P<top>.+)$")


def test_readme_predict_example(readme_dir, request, monkeypatch, capsys):
  from nfnets_jax.cli import predict  # pylint: disable=g-import-not-at-top
  commands = _console_commands(README.read_text(), predict.PROG)
  assert commands, "README.md shows no `$ nfnets-predict` example"
  monkeypatch.chdir(readme_dir)  # The PNG files the README's snippets wrote.
  capsys.readouterr()
  for line, argv, shown in commands:
    argv = shlex.split(_quickstart_workdir(shlex.join(argv), request))
    status = predict.main(argv)
    out, err = capsys.readouterr()
    shown_err = [s for s in shown if s.startswith(f"{predict.PROG}:")]
    shown_out = [s for s in shown if s not in shown_err]
    where = f"README.md:{line}: {shlex.join(argv)}"
    assert status == (predict.EXIT_UNREADABLE if shown_err else 0), (
        f"{where}: exit status {status}\n{err}")
    assert err.splitlines() == shown_err, where
    got = out.splitlines()
    assert len(got) == len(shown_out), (where, got)
    for want, have in zip(shown_out, got):
      w, h = _PREDICT_LINE.match(want), _PREDICT_LINE.match(have)
      assert w and h, (where, want, have)
      assert h["path"] == w["path"], (where, want, have)
      assert len(h["top"].split(", ")) == len(w["top"].split(", ")), (
          where, want, have)


@pytest.mark.parametrize("page", [*PAGES, HISTORY], ids=rel)
def test_relative_links_resolve(page):
  text = page.read_text()
  bad = []
  for line, target in links(text):
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      bad.append(f"{rel(page)}:{line}: {target} (no such file)")
      continue
    if anchor and dest.suffix == ".md" and anchor not in heading_ids(
        dest.read_text()):
      bad.append(f"{rel(page)}:{line}: {target} (no heading #{anchor} in "
                 f"{rel(dest)})")
  assert not bad, "\n".join(bad)


def test_readme_is_short_and_links_every_page():
  text = README.read_text()
  assert len(text.splitlines()) <= README_MAX_LINES
  linked = {(README.parent / t.partition("#")[0]).resolve()
            for _, t in links(text)}
  assert DOCS and not [rel(d) for d in DOCS if d not in linked]


def test_the_parser_finds_blocks_links_and_headings():
  text = ("# A title\n\n```python\nx = 1\n```\n\n~~~console\n$ ls\n~~~\n"
          "See [x](a.md#a-title), `[no](link.md)`, ![img](../p.png).\n"
          "```bash\n[not](a/link)\n```\n## A title\n### `code`, and: more\n")
  blocks = fenced_blocks(text)
  assert [(b.lang, b.line, b.text) for b in blocks] == [
      ("python", 4, "x = 1\n"), ("console", 8, "$ ls\n"),
      ("bash", 12, "[not](a/link)\n")]
  assert links(text) == [(10, "a.md#a-title"), (10, "../p.png")]
  assert heading_ids(text) == {"a-title", "a-title-1", "code-and-more"}
