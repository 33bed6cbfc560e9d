"""Tests of nfnets-predict: top-k lines, --json, unreadable images, --help.

The models are a tiny exported NFNet and the session's tiny nfnets-train
run; the images are written by the tests.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest


import nfnets_jax as nj  # noqa: E402
from nfnets_jax.pretrained import create
from nfnets_jax.cli import forward_cache  # noqa: E402
from nfnets_jax.cli import predict  # noqa: E402
from nfnets_jax.pretrained import registry  # noqa: E402
import train_harness as testing  # noqa: E402

TINY = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
        "test_imsize": 16, "randaugment_layers": 0,
        "randaugment_magnitude": 0, "drop_rate": 0.0}
LABELS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu")
LINE = re.compile(r"^(?P<path>.+): (?P<top>.+)$")
ENTRY = re.compile(r"^(?P<label>\S+) \((?P<pct>\d+\.\d)%\)$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny 7-class NFNet (named classes) and its exported artifact."""
  model = nj.create_model("nfnet_f0", num_classes=7, variant=TINY,
                          group_size=8, seed=2)
  model = dataclasses.replace(
      model, data_config=registry.DataConfig(16, 16, crop_padding=4),
      label_names=LABELS)
  path = nj.export(model, tmp_path_factory.mktemp("export") / "tiny.nfx")
  return model, path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  """RGB, grey and RGBA images of odd sizes, and one unreadable file."""
  d = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  files = {"rgb.png": rng.integers(0, 256, (21, 30, 3), np.uint8),
           "grey.png": rng.integers(0, 256, (18, 18), np.uint8),
           "rgba.png": rng.integers(0, 256, (25, 19, 4), np.uint8),
           "photo.jpg": rng.integers(0, 256, (40, 33, 3), np.uint8)}
  paths = {}
  for name, array in files.items():
    paths[name] = str(d / name)
    Image.fromarray(array).save(paths[name])
  paths["broken.jpg"] = str(d / "broken.jpg")
  with open(paths["broken.jpg"], "wb") as f:
    f.write(b"\xff\xd8 not really a jpeg")
  return paths


def run(argv, capsys):
  status = predict.main(argv)
  out, err = capsys.readouterr()
  return status, out, err


def expected_probs(model, path):
  x = model.preprocess(predict.read_image(path))[None]
  logits = np.asarray(model(x), np.float64)[0]
  p = np.exp(logits - logits.max())
  return p / p.sum()


def test_plain_lines_are_the_models_top_k(exported, image_files, capsys):
  model, path = exported
  good = [image_files[k] for k in ("rgb.png", "grey.png", "rgba.png",
                                   "photo.jpg")]
  status, out, err = run(["--pretrained", str(path), "--top-k", "3", *good],
                         capsys)
  assert status == 0, err
  lines = out.splitlines()
  assert len(lines) == 4
  for image, line in zip(good, lines):
    m = LINE.match(line)
    assert m and m["path"] == image, line
    entries = [ENTRY.match(e) for e in m["top"].split(", ")]
    assert len(entries) == 3 and all(entries), line
    probs = expected_probs(model, image)
    order = np.argsort(-probs)[:3]
    assert [e["label"] for e in entries] == [LABELS[i] for i in order]
    for e, i in zip(entries, order):
      assert float(e["pct"]) == pytest.approx(100 * probs[i], abs=0.051)


def test_json_lines_and_an_unreadable_image(exported, image_files, capsys):
  _, path = exported
  files = [image_files["rgb.png"], image_files["broken.jpg"],
           image_files["grey.png"]]
  status, out, err = run(["--pretrained", str(path), "--json", *files],
                         capsys)
  assert status == predict.EXIT_UNREADABLE == 1
  assert err.count("\n") == 1 and "cannot read image" in err
  assert image_files["broken.jpg"] in err
  results = [json.loads(line) for line in out.splitlines()]
  assert [r["path"] for r in results] == [files[0], files[2]]
  for r in results:
    assert len(r["top"]) == 5
    probs = [t["prob"] for t in r["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    for t in r["top"]:
      assert t["label"] == LABELS[t["index"]]


def test_exported_and_in_memory_models_agree(exported, image_files, capsys):
  model, path = exported
  image = image_files["photo.jpg"]
  status, out, _ = run(["--pretrained", str(path), "--json", "--top-k", "7",
                        image], capsys)
  assert status == 0
  top = json.loads(out)["top"]
  probs = expected_probs(model, image)
  for t in top:
    assert t["prob"] == pytest.approx(probs[t["index"]], rel=1e-4)


def test_bad_checkpoint_and_arguments_exit_2(exported, image_files, capsys,
                                             tmp_path):
  _, path = exported
  image = image_files["rgb.png"]
  status, _, err = run(["--pretrained", str(tmp_path / "missing.npz"),
                        image], capsys)
  assert status == 2 and "nfnets-predict: error:" in err
  assert "missing.npz" in err
  status, _, err = run(["--pretrained", str(path), "--top-k", "0", image],
                       capsys)
  assert status == 2 and "--top-k=0" in err
  status, _, err = run(["--pretrained", str(path), "--model", "nfnet_f0",
                        image], capsys)
  assert status == 2 and "exported artifact" in err


def test_help_says_what_it_does_with_examples(capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "Classify images" in out and "examples:" in out
  assert "nfnets-predict --pretrained F0_haiku.npz cat.jpg" in out
  for flag in ("--pretrained", "--model", "--top-k", "--json",
               "--verbose"):
    assert flag in out


def test_console_script_is_declared():
  setup = open(os.path.join(testing.REPO, "setup.py")).read()
  assert '"nfnets-predict=nfnets_jax.cli.predict:main"' in setup


def test_workdir_with_class_names_in_a_subprocess(reference_run, image_files,
                                                  tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  names = [f"digit_{i}" for i in range(10)]
  (workdir / create.CLASS_NAMES_FILE).write_text(json.dumps(names))
  proc = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.cli.predict", "--pretrained",
       str(workdir), "--json", image_files["rgb.png"]],
      cwd=testing.REPO, env=testing.subprocess_env(), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (result,) = [json.loads(line) for line in proc.stdout.splitlines()]
  model = nj.create_model(pretrained=workdir)
  probs = expected_probs(model, image_files["rgb.png"])
  top = result["top"]
  for t in top:  # The subprocess compiles differently: rounding may differ.
    assert t["prob"] == pytest.approx(probs[t["index"]], rel=1e-4)
    assert t["label"] == names[t["index"]]
  others = np.delete(probs, [t["index"] for t in top])
  assert min(t["prob"] for t in top) >= others.max() - 1e-6


def test_forward_cache_classifies_alike_and_traces_once(
    reference_run, image_files, tmp_path, monkeypatch, capsys):
  """The first run builds the model and caches its forward; the next
  traces nothing and gives the same probabilities, with the class names
  read afresh; a damaged program is built again."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  builds = []
  build = forward_cache.build
  monkeypatch.setattr(forward_cache, "build",
                      lambda *args: builds.append(args) or build(*args))
  files = [image_files[k] for k in ("rgb.png", "grey.png")]
  argv = ["--pretrained", str(workdir), "--json", "--top-k", "10",
          "--batch-size", "2", *files]
  model = nj.create_model(pretrained=workdir)
  folder = tmp_path / "cache" / forward_cache.SUBFOLDER
  for names, built in (("abcdefghij", 1), ("klmnopqrst", 1)):
    (workdir / create.CLASS_NAMES_FILE).write_text(json.dumps(list(names)))
    assert predict.run(argv, str(tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    results = [json.loads(line) for line in out.splitlines()]
    assert len(builds) == built
    assert [r["path"] for r in results] == files
    for image, result in zip(files, results):
      probs = expected_probs(model, image)
      for t in result["top"]:
        assert t["prob"] == pytest.approx(probs[t["index"]], rel=1e-4)
        assert t["label"] == names[t["index"]]
  entries = sorted(name.split(".", 1)[1] for name in os.listdir(folder))
  assert entries == ["2.jaxexport", "json"]
  (program,) = folder.glob("*.2.jaxexport")
  program.write_bytes(b"not a program")
  assert predict.run(argv, str(tmp_path / "cache")) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2 and len(builds) == 2


def test_c_order_copy_is_a_new_array_equal_to_the_view():
  from nfnets_jax.pretrained import timm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for shape in [(), (5,), (3, 130), (70, 3, 3, 3)]:
    x = np.asarray(rng.normal(size=shape), np.float32)
    view = x.transpose(*reversed(range(x.ndim)))
    copy = timm.c_order_copy(view)
    assert copy.flags.c_contiguous and copy.shape == view.shape
    assert not np.shares_memory(copy, x)
    np.testing.assert_array_equal(copy, view)


def _blank_png(path, side):
  """A valid all-black 1-bit `side`x`side` PNG, a few tens of KB."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))
  packer = zlib.compressobj()
  row = bytes(1 + (side + 7) // 8)  # Filter byte + packed bits.
  idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_image_over_the_pixel_limit_is_refused_others_classified(
    exported, image_files, capsys, tmp_path):
  _, path = exported
  big = str(tmp_path / "huge.png")
  _blank_png(big, 20000)  # 400M pixels: PIL raises DecompressionBombError.
  good = image_files["rgb.png"]
  status, out, err = run(["--pretrained", str(path), "--json", big, good],
                         capsys)
  assert status == predict.EXIT_UNREADABLE == 1
  assert [json.loads(line)["path"] for line in out.splitlines()] == [good]
  assert err.count("\n") == 1 and "Traceback" not in err
  assert err.startswith(f"nfnets-predict: cannot read image {big}: ")
  assert "400000000 pixels" in err
  assert str(Image.MAX_IMAGE_PIXELS) in err
