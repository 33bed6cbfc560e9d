"""Tests of experiments/pretrained_eval.py: numbers against brute force.

A tiny NFNet (widths 16-32, one block per stage, 24 px test size) is written
by the test itself as an official-layout pickle, a safe `.npz` and a timm
`dm_nfnet_*` state dict (`.pth`, `.safetensors`), from the same weights; the
script's `main()` evaluates them on TFDS mock data (`tfds.testing.mock_data`,
no download) and its top-1 / top-5 / loss must equal a reference computed
here: PIL's bicubic resize to 24 + 32 px, a central 24 px crop, the ImageNet
normalization, the model applied directly, NumPy argmax / log-softmax.
"""
import csv
import json
import shutil
import sys

import haiku as hk
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import nfnets_jax
from experiments import pretrained_eval
from nfnets_jax.cpu import compiler
from nfnets_jax.experiment import checkpoint_io
from nfnets_jax.experiment import train_state
from nfnets_jax.models import nfnet
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import official
from nfnets_jax.pretrained import timm

import checkpoint_files
import train_harness as testing


TINY = {"width": [16, 32], "depth": [1, 1], "train_imsize": 16,
        "test_imsize": 24, "randaugment_layers": 0,
        "randaugment_magnitude": 0, "drop_rate": 0.0}
TINY_JSON = json.dumps(TINY)
TEST_PX, PAD = 24, 32
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
NUM_EXAMPLES = 20  # 3 batches of 8: the last one padded.
MOCK = dict(num_examples=NUM_EXAMPLES,
            policy=tfds.testing.MockPolicy.USE_CODE)


def tiny_params(num_classes, seed=0):
  """Random tiny NFNet params (NumPy, no compile), every branch active."""
  shapes = checks.expected_param_shapes(TINY, num_classes)
  rng = np.random.default_rng(seed)
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for name, shape in leaves.items():
      if name == "skip_gain":
        v = rng.uniform(0.5, 1.0, shape)
      elif name == "gain":
        v = rng.uniform(0.5, 1.5, shape)
      elif name in ("bias", "b"):
        v = rng.normal(0.0, 0.2, shape)
      elif module.endswith("/~/linear"):  # classifier
        v = rng.normal(0.0, 2.0 / np.sqrt(shape[0]), shape)
      elif name == "w" and len(shape) == 2:  # squeeze-excite
        v = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
      else:  # conv kernels: weight standardization rescales them
        v = rng.normal(0.0, 1.0, shape)
      params[module][name] = np.asarray(v, np.float32)
  return params


def to_timm_state_dict(params, depths):
  """Haiku params -> timm dm_nfnet_* keys and layouts, written out here."""
  block_names = {}
  k = 0
  for stage, depth in enumerate(depths):
    for block in range(depth):
      block_names["NFNet/~/nf_block" + (f"_{k}" if k else "")] = (
          f"stages.{stage}.{block}")
      k += 1
  convs = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b",
           "conv2": "conv3", "conv_shortcut": "downsample.conv"}
  sd = {}

  def conv(prefix, leaves):
    sd[f"{prefix}.weight"] = leaves["w"].transpose(3, 2, 0, 1)  # HWIO->OIHW
    sd[f"{prefix}.gain"] = leaves["gain"].reshape(-1, 1, 1, 1)
    sd[f"{prefix}.bias"] = leaves["bias"]

  for module, leaves in params.items():
    if module.startswith("NFNet/~/stem_conv"):
      conv(f"stem.conv{int(module[-1]) + 1}", leaves)
    elif module == "NFNet/~/final_conv":
      conv("final_conv", leaves)
    elif module == "NFNet/~/linear":
      sd["head.fc.weight"] = leaves["w"].T
      sd["head.fc.bias"] = leaves["b"]
    elif module in block_names:
      sd[f"{block_names[module]}.skipinit_gain"] = leaves["skip_gain"]
    else:
      block, sub = module.split("/~/", 2)[1:]
      block = block_names["NFNet/~/" + block]
      if sub in convs:
        conv(f"{block}.{convs[sub]}", leaves)
      else:
        fc = {"squeeze_excite/~/linear": "fc1",
              "squeeze_excite/~/linear_1": "fc2"}[sub]
        sd[f"{block}.attn_last.{fc}.weight"] = leaves["w"].T[:, :, None, None]
        sd[f"{block}.attn_last.{fc}.bias"] = leaves["b"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache: repeated main() calls compile each net once.

  Every `main()` builds a new eval step, so the in-memory cache misses; the
  persistent one is keyed by the program and saves ~4 s a call on CPU.
  """
  with testing.persistent_cache(str(tmp_path_factory.mktemp("jax_cache"))):
    yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The same 10- and 1000-class weights in every accepted file format."""
  root = tmp_path_factory.mktemp("ckpt")
  files = {}
  for classes in (10, 1000):
    params = tiny_params(classes)
    pickled = root / f"tiny{classes}_haiku.npz"
    pickled.write_bytes(checkpoint_files.old_haiku_pickle(params))
    npz = official.save_npz(params, root / f"tiny{classes}.npz")
    sd = to_timm_state_dict(params, TINY["depth"])
    # The written timm layout converts back to exactly these params.
    checkpoint_files.assert_params_equal(
        params, timm.from_timm_state_dict(sd)[0])
    files[classes] = {"params": params, "official": str(pickled),
                      "npz": npz}
    if classes == 10:
      torch = pytest.importorskip("torch")
      pth = root / "dm_nfnet_tiny.pth"
      torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
      files[classes]["timm"] = str(pth)
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      st = root / "dm_nfnet_tiny.safetensors"
      save_file(sd, str(st))
      files[classes]["safetensors"] = str(st)
  return files


def resize_bicubic(image, side):
  """PIL's bicubic (Keys a=-0.5), per channel in float; equal to TF's when
  upscaling, as here (every mock image is smaller than the resize target)."""
  assert max(image.shape[:2]) <= side
  return np.stack([np.asarray(Image.fromarray(
      image[..., c].astype(np.float32)).resize(
          (side, side), Image.Resampling.BICUBIC))
                   for c in range(image.shape[-1])], axis=-1)


def reference_logits(params, images, num_classes, forward="official",
                     pad=PAD):
  """The paper's eval preprocessing and the model, written independently."""
  side = TEST_PX + pad
  offset = pad // 2
  x = np.stack([
      (resize_bicubic(image, side)[offset:offset + TEST_PX,
                                   offset:offset + TEST_PX] - MEAN) / STD
      for image in images]).astype(np.float32)
  kwargs = {"official": timm.OFFICIAL_NFNET_KWARGS,
            "timm": timm.TIMM_NFNET_KWARGS}[forward]
  fwd = hk.transform(lambda x: nfnet.NFNet(num_classes, TINY, **kwargs)(
      x, is_training=False))
  with nfnets_jax.conv_impl("native"):
    logits = compiler.run_once(fwd.apply, params, None, x)["logits"]
  return np.asarray(logits, np.float64)


def brute_force(logits, labels):
  """top-1, top-5 (%) and mean cross-entropy with NumPy."""
  top1 = np.mean(np.argmax(logits, -1) == labels)
  top5 = np.mean([l in np.argsort(z)[-5:] for z, l in zip(logits, labels)])
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -np.mean(logp[np.arange(len(labels)), labels])
  return 100 * top1, 100 * top5, loss


def mock_split(dataset, split, n):
  source = tfds.data_source(dataset, split=split)
  examples = [source[i] for i in range(n)]
  return ([e["image"] for e in examples],
          np.array([e["label"] for e in examples]))


def run(tmp_path, checkpoint, *flags):
  """`main()` of the flags, its convolutions lowered as the reference's."""
  out = tmp_path / "out"
  argv = ["--checkpoint", checkpoint, "--batch_size", "8", "--out", str(out),
          *flags]
  with nfnets_jax.conv_impl("native"):
    return pretrained_eval.main(argv), out


def assert_row_matches(row, want, n):
  top1, top5, loss = want
  assert row["examples"] == n
  assert row["top1"] == pytest.approx(top1, abs=1e-9)
  assert row["top5"] == pytest.approx(top5, abs=1e-9)
  assert row["loss"] == pytest.approx(loss, rel=1e-4)


# ---------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------


def test_official_and_timm_sources_match_brute_force(checkpoints, tmp_path):
  ckpt = checkpoints[10]
  with tfds.testing.mock_data(**MOCK):
    images, labels = mock_split("cifar10", "test", NUM_EXAMPLES)
    results = {}
    for kind in ("official", "npz", "timm", "safetensors"):
      rows, _ = run(tmp_path / kind, ckpt[kind], "--dataset", "cifar10",
                    "--variant", TINY_JSON)
      assert len(rows) == 1
      results[kind] = rows[0]
    # timm weights under the official forward: the official numbers.
    rows, _ = run(tmp_path / "timm_official", ckpt["timm"], "--dataset",
                  "cifar10", "--variant", TINY_JSON, "--forward", "official")
    results["timm_as_official"] = rows[0]
  official = reference_logits(ckpt["params"], images, 10, "official")
  timm = reference_logits(ckpt["params"], images, 10, "timm")
  want_official = brute_force(official, labels)
  want_timm = brute_force(timm, labels)
  print(f"\nofficial {want_official}, timm {want_timm}")
  # Non-degenerate: some right, some wrong, a real loss.
  assert 0 < want_official[0] < 100 and want_official[2] > 0.1
  for kind in ("official", "npz", "timm_as_official"):
    assert results[kind]["forward"] == "official"
    assert_row_matches(results[kind], want_official, NUM_EXAMPLES)
  for kind in ("timm", "safetensors"):
    assert results[kind]["source"] == "timm"
    assert results[kind]["forward"] == "timm"
    assert_row_matches(results[kind], want_timm, NUM_EXAMPLES)
  # Same weights, the two forwards (timm: eps added to the variance, exact
  # GELU): close logits and accuracy, not identical.
  rel = np.abs(official - timm).max() / np.abs(official).max()
  assert 1e-7 < rel < 2e-2, rel
  assert np.mean(official.argmax(-1) == timm.argmax(-1)) >= 0.9
  assert abs(results["timm"]["top1"] - results["official"]["top1"]) <= (
      100 / NUM_EXAMPLES)
  assert results["timm"]["loss"] == pytest.approx(results["official"]["loss"],
                                                  rel=2e-2)
  for row in results.values():
    assert (row["resize_px"], row["crop_px"]) == (TEST_PX + PAD, TEST_PX)
    assert row["paper_top1"] is None  # Not ImageNet.


def test_imagenet_protocol_paper_columns_and_files(checkpoints, tmp_path):
  """Non-square ImageNet mock images, 1000 classes, --quick, --forward."""
  ckpt = checkpoints[1000]
  n = 12
  with tfds.testing.mock_data(**MOCK):
    images, labels = mock_split("imagenet2012", "validation", n)
    rows, out = run(tmp_path, ckpt["npz"], "--quick", "--max_examples",
                    str(n), "--variant", TINY_JSON, "--split", "test",
                    "--dataset", "imagenet2012", "--forward", "timm")
  assert len({img.shape for img in images}) > 1  # Varied, non-square.
  row = rows[0]
  assert row["tfds_split"] == f"validation[0:{NUM_EXAMPLES}]"
  assert (row["resize_px"], row["crop_px"]) == (56, 24)
  assert row["forward"] == "timm"
  want = brute_force(reference_logits(ckpt["params"], images, 1000, "timm"),
                     labels)
  assert_row_matches(row, want, n)
  # The tiny custom net has no published number; F0..F6 do, on this split.
  assert row["paper_top1"] is None
  split = pretrained_eval.data.Split
  assert pretrained_eval.paper_reference("F0", "imagenet2012", split.TEST,
                                         1000) == (83.6, 96.8)
  assert pretrained_eval.paper_reference("F6", "imagenet2012", split.TEST,
                                         1000) == (86.5, 97.9)
  assert pretrained_eval.paper_reference("F0", "imagenet2012", split.VALID,
                                         1000) is None
  assert pretrained_eval.paper_reference("F7", "imagenet2012", split.TEST,
                                         1000) is None
  assert set(pretrained_eval.PAPER) == {f"F{i}" for i in range(7)}
  # Files: the command in the header, the CSV carries the same numbers.
  md = (out / "pretrained_eval.md").read_text().splitlines()
  assert md[2].startswith(f"Generated by `python -m {pretrained_eval.MODULE} "
                          f"--checkpoint {ckpt['npz']}")
  assert "--quick" in md[2]
  text = "\n".join(md)
  assert "| F0 | `F0_haiku.npz` | `dm_nfnet_f0` | 288 | 256 | 83.6 | 96.8 |" \
      in text
  with open(out / "pretrained_eval.csv", newline="") as f:
    (csv_row,) = list(csv.DictReader(f))
  assert float(csv_row["top1"]) == pytest.approx(row["top1"])
  assert csv_row["resize_px"] == "56" and csv_row["paper_top1"] == ""


def test_quick_caps_the_examples(checkpoints, tmp_path, monkeypatch):
  monkeypatch.setattr(pretrained_eval, "QUICK_MAX_EXAMPLES", 5)
  with tfds.testing.mock_data(**MOCK):
    rows, _ = run(tmp_path, checkpoints[10]["npz"], "--quick", "--dataset",
                  "cifar10", "--variant", TINY_JSON)
  assert rows[0]["examples"] == 5


def test_variant_sizes_follow_the_table():
  for name in nfnet.NFNET_VARIANTS:
    assert pretrained_eval.parse_variant(name) == name
  assert pretrained_eval.parse_variant("dm_nfnet_f1") == "F1"
  assert pretrained_eval.parse_variant("f3") == "F3"
  sizes = {v: nfnet.NFNET_VARIANTS[v].test_imsize
           for v in pretrained_eval.PAPER}
  assert sizes == {"F0": 256, "F1": 320, "F2": 352, "F3": 416, "F4": 512,
                   "F5": 544, "F6": 576}


# ---------------------------------------------------------------------------
# nfnets-train workdirs.
# ---------------------------------------------------------------------------


RUN_PAD = 8  # The run's eval.crop_padding, unlike the paper's 32.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """An nfnets-train workdir of the tiny NFNet on cifar10, checkpoint step 5.

  Its config evaluates at 24 px after a resize to 24 + 8 px; its EMA params
  differ from the raw ones; metrics.jsonl holds a final evaluation record
  with marker values.
  """
  import optax  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("run")
  config = testing.load_config(testing.DEFAULT_CONFIG)
  with config.unlocked():
    config.workdir = str(root)
    config.model.kwargs = {"variant": TINY}
    config.dataset.name = "cifar10"
    config.dataset.eval_split = "test"
    config.eval.image_size = TEST_PX
    config.eval.crop_padding = RUN_PAD
  (root / "config.json").write_text(config.to_json_best_effort(indent=2))
  params, ema = tiny_params(10, seed=1), tiny_params(10, seed=2)
  state = train_state.TrainState(
      params=params, model_state={}, opt_state=optax.identity().init(params),
      ema_params=ema, ema_model_state={}, step=np.int32(5),
      rng=np.zeros(2, np.uint32))
  ckpt = checkpoint_io.Checkpointer(str(root / "checkpoints"), 2,
                                    async_save=False)
  ckpt.save(5, state, [{}])
  ckpt.close()
  record = {"step": 5, "split": "eval", "top1": 0.123, "top5": 0.456,
            "loss": 7.5, "ema_top1": 0.25, "ema_top5": 0.5, "ema_loss": 9.5}
  (root / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  return root, state


def test_workdir_raw_and_ema_match_brute_force(workdir, tmp_path):
  root, state = workdir
  with tfds.testing.mock_data(**MOCK):
    images, labels = mock_split("cifar10", "test", NUM_EXAMPLES)
    rows, _ = run(tmp_path, str(root))
    ema_rows, _ = run(tmp_path, str(root), "--params", "ema",
                      "--max_examples", "10", "--step", "5")
  assert [r["params"] for r in rows] == ["raw", "ema"]
  for row, params in zip(rows, [state.params, state.ema_params]):
    want = brute_force(reference_logits(params, images, 10, pad=RUN_PAD),
                       labels)
    assert_row_matches(row, want, NUM_EXAMPLES)
    assert row["source"] == "workdir" and row["dataset"] == "cifar10"
    assert row["forward"] == "run config"
    # The run's eval geometry, from its config.json.
    assert (row["resize_px"], row["crop_px"]) == (TEST_PX + RUN_PAD, TEST_PX)
    assert row["variant"] == "custom (widths 16-32, depths 1-1)"
  assert rows[0]["loss"] != rows[1]["loss"]
  # The run's own final evaluation is shown beside ours (full split).
  assert (rows[0]["run_top1"], rows[0]["run_loss"]) == (12.3, 7.5)
  assert (rows[1]["run_top1"], rows[1]["run_loss"]) == (25.0, 9.5)

  assert [r["params"] for r in ema_rows] == ["ema"]
  assert ema_rows[0]["examples"] == 10
  assert ema_rows[0]["run_top1"] is None  # Not the run's whole split.


# ---------------------------------------------------------------------------
# Errors name the bad value.
# ---------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
  missing = str(tmp_path / "F0_haiku.npz")
  with pytest.raises(FileNotFoundError, match=r"--checkpoint=.*F0_haiku\.npz"
                     r"' does not exist"):
    run(tmp_path, missing)


@pytest.mark.parametrize("variant, match", [
    ("F9", r"--variant='F9'.*unknown; allowed: \['F0'"),
    ('{"width": [16]}', r"--variant=.*needs exactly"),
    ("{not json", r"--variant='\{not json' is not a valid variant"),
])
def test_unknown_variant(checkpoints, tmp_path, variant, match):
  with pytest.raises(ValueError, match=match):
    run(tmp_path, checkpoints[10]["npz"], "--variant", variant)


def test_checkpoint_that_does_not_fit_the_variant(checkpoints, tmp_path):
  with pytest.raises(checks.ParamsMismatchError,
                     match=r"(?s)--checkpoint=.*tiny10\.npz' does not match "
                     r"NFNet\(variant='F0', .*missing \(176\).*mis-shaped.*"
                     r"NFNet/~/linear/w: got \(64, 10\), expected "
                     r"\(3072, 10\)"):
    run(tmp_path, checkpoints[10]["npz"], "--variant", "F0")


def test_uninferable_variant_asks_for_it(checkpoints, tmp_path):
  with pytest.raises(ValueError, match=r"(?s)cannot infer.*depths \(1, 1\) "
                     r"and widths \(16, 32\).*pass --variant"):
    run(tmp_path, checkpoints[10]["npz"])


def test_class_count_must_be_the_datasets(checkpoints, tmp_path):
  with tfds.testing.mock_data(**MOCK):
    with pytest.raises(ValueError, match=r"has 10 classes but "
                       r"--dataset='imagenet2012' has 1000"):
      run(tmp_path, checkpoints[10]["npz"], "--variant", TINY_JSON)


@pytest.mark.parametrize("flags, match", [
    (["--batch_size", "0"], r"--batch_size=0 must be >= 1"),
    (["--max_examples", "0"], r"--max_examples=0 must be >= 1"),
    (["--source", "workdir"], r"--source='workdir' does not fit "
     r"--checkpoint=.*tiny10\.npz' \(official by its content\)"),
    (["--split", "bogus"], r"--split='bogus'.*Unknown split"),
    (["--dataset", "no_such_dataset"], r"--dataset='no_such_dataset'.*not "
     r"a known dataset"),
    (["--dataset", "mnist", "--data_dir", "{tmp}"], r"(?s)--dataset='mnist'"
     r".*no prepared TFDS data.*tfds build mnist"),
])
def test_bad_flags(checkpoints, tmp_path, flags, match):
  flags = [f.format(tmp=tmp_path) for f in flags]
  with pytest.raises(ValueError, match=match):
    run(tmp_path, checkpoints[10]["npz"], "--variant", TINY_JSON, *flags)


def test_bad_workdirs(workdir, tmp_path):
  root, _ = workdir
  with pytest.raises(FileNotFoundError, match="without config.json"):
    run(tmp_path, str(tmp_path))
  with pytest.raises(ValueError, match="read from the workdir"):
    run(tmp_path, str(root), "--variant", "F0")
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text((root / "config.json").read_text())
  with tfds.testing.mock_data(**MOCK):
    with pytest.raises(FileNotFoundError, match="has no checkpoints"):
      run(tmp_path, str(empty))
    with pytest.raises(ValueError, match=r"step=7 .* available: \[5\]"):
      run(tmp_path, str(root), "--step", "7")
    with pytest.raises(ValueError, match=r"--params='raw,best'"):
      run(tmp_path, str(root), "--params", "raw,best")
    with pytest.raises(ValueError, match=r"has 10 classes but "
                       r"--dataset='imagenet2012' has 1000"):
      run(tmp_path, str(root), "--dataset", "imagenet2012")


def test_workdir_params_must_fit_its_config(workdir, tmp_path):
  """A config.json naming another network than the checkpoint's params."""
  root, _ = workdir
  other = tmp_path / "other_run"
  shutil.copytree(root, other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["kwargs"]["variant"]["width"] = [16, 64]
  (other / "config.json").write_text(json.dumps(config))
  with tfds.testing.mock_data(**MOCK):
    with pytest.raises(checks.ParamsMismatchError,
                       match=r"(?s)other_run' \(raw params\) does not match "
                       r"NFNet\(variant=\{'width': \[16, 64\].*num_classes="
                       r"10\).*mis-shaped.*NFNet/~/linear/w: got \(64, 10\), "
                       r"expected \(128, 10\)"):
      run(tmp_path, str(other))


@pytest.mark.parametrize("kind, source", [("npz", "timm"),
                                          ("timm", "official")])
def test_source_must_fit_the_content(checkpoints, tmp_path, kind, source):
  """`--source` names a kind; the file's content is the other one."""
  path = checkpoints[10][kind]
  other = {"timm": "official", "official": "timm"}[source]
  with pytest.raises(ValueError, match=rf"--source='{source}' does not fit "
                     rf"--checkpoint=.* \({other} by its content\); use "
                     rf"--source={other} or auto"):
    run(tmp_path, path, "--source", source, "--variant", TINY_JSON)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))
