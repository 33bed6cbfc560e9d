"""Image-folder datasets: scan, holdout, decoding, errors, then end to end.

The end-to-end runs train the tiny digits NFNet of `configs/default.py` on a
folder written here: three visually distinct classes (a disc, horizontal
stripes, vertical stripes; random colours), 60 images each of 20x20 in
mixed formats (PNG, JPEG, BMP, WebP, upper-case extensions), some grey,
palette or RGBA, through the command's own code in-process. One run is the
reference (eval top-1 and `nfnets-predict` on new images); a run with one
corrupt file must stop with exit 2, naming the file, after saving a
checkpoint. Resuming exactly: the folder source's data position in
`test_train_stream_resumes_exactly`, a killed run through the CLI in
tests/experiment/test_train.py.
"""
import json
import os
import pickle
import numpy as np
import pytest
from PIL import Image

from nfnets_jax import data
from nfnets_jax.cli import predict
from nfnets_jax.cli import train
from nfnets_jax.data import image_folder
from nfnets_jax.data import images
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import logging as run_logging
from nfnets_jax.pretrained import create
import train_harness as testing


CLASSES = ('disc', 'horizontal', 'vertical')
# Extension, PIL format; upper-case extensions must be found too.
_FORMATS = (('png', 'PNG'), ('jpg', 'JPEG'), ('bmp', 'BMP'),
            ('webp', 'WEBP'), ('JPEG', 'JPEG'), ('PNG', 'PNG'))
PER_CLASS = 60
NUM_STEPS = 40
# Reference flags after the harness's TINY_FLAGS (batch 16, 2 data shards).
_RUN_FLAGS = (f'--config.train.num_steps={NUM_STEPS}',
              '--config.eval.every_steps=20',
              '--config.checkpoint.every_steps=10')


def _pattern(label: int, rng: np.random.Generator, size: int = 20
             ) -> np.ndarray:
  """uint8 `[size, size, 3]`: class `label`'s shape, random colours."""
  colour = rng.integers(0, 256, 3)
  image = np.empty((size, size, 3), np.uint8)
  image[:] = 255 - colour
  rows, cols = np.mgrid[:size, :size]
  phase = rng.integers(0, 4)
  if label == 0:
    centre = rng.integers(6, size - 6, 2)
    mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < 25
  elif label == 1:
    mask = ((rows + phase) // 2) % 2 == 0
  else:
    mask = ((cols + phase) // 2) % 2 == 0
  image[mask] = colour
  return image


def _save(array: np.ndarray, path: str, mode: str | None = None,
          fmt: str = 'PNG') -> str:
  image = Image.fromarray(array)
  if mode == 'P':
    image = image.quantize(8)
  elif mode:
    image = image.convert(mode)
  if fmt == 'JPEG' and image.mode not in ('L', 'RGB'):
    image = image.convert('RGB')
  image.save(path, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return path


def write_folder(root: str, per_class: int = PER_CLASS, seed: int = 0) -> str:
  """Writes `root/<class>/<i>.<ext>` for `CLASSES`; returns `root`."""
  rng = np.random.default_rng(seed)
  for label, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      ext, fmt = _FORMATS[i % len(_FORMATS)]
      mode = {3: 'L', 5: 'RGBA', 6: 'P'}.get(i % 7)
      _save(_pattern(label, rng), os.path.join(root, name, f'{i:03d}.{ext}'),
            mode, fmt)
    # Ignored: hidden files and folders, other extensions.
    with open(os.path.join(root, name, 'notes.txt'), 'w') as f:
      f.write('not an image')
    os.makedirs(os.path.join(root, name, '.cache'), exist_ok=True)
    _save(_pattern(label, rng), os.path.join(root, name, '.cache', 'x.png'))
    _save(_pattern(label, rng), os.path.join(root, name, '.hidden.png'))
  return root


def _tiny_folder(root: str, counts: dict[str, int]) -> str:
  for name, count in counts.items():
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(count):
      _save(np.full((4, 4, 3), i, np.uint8),
            os.path.join(root, name, f'{i}.png'))
  return root


# --- scanning and the holdout ----------------------------------------------


def test_holdout_rule_over_sizes():
  for n in range(0, 301):
    chosen = image_folder.holdout_indices(n)
    assert len(chosen) == (0 if n < 2 else max(1, n // 10)), n
    assert np.all(np.diff(chosen) > 0) and np.all((chosen >= 0) & (chosen < n))
    if n >= 10:  # Evenly spread: one per run of n / k sorted images.
      k = len(chosen)
      np.testing.assert_array_equal(chosen * k // n, np.arange(k))


def test_scan_classes_holdout_is_stratified_and_disjoint(tmp_path):
  root = write_folder(str(tmp_path / 'f'), per_class=23)
  folder = image_folder.scan(root)
  assert folder.class_names == CLASSES and folder.layout == 'classes'
  train_paths, train_labels = folder.bases['train']
  test_paths, test_labels = folder.bases['test']
  assert folder.bases['valid'] is folder.bases['test']
  np.testing.assert_array_equal(np.bincount(test_labels), [2, 2, 2])
  np.testing.assert_array_equal(np.bincount(train_labels), [21, 21, 21])
  assert not set(train_paths) & set(test_paths)
  assert all(not os.path.basename(p).startswith('.') and '.cache' not in p
             and not p.endswith('.txt') for p in train_paths + test_paths)
  for paths, labels in (folder.bases['train'], folder.bases['test']):
    for path, label in zip(paths, labels):
      assert os.path.basename(os.path.dirname(path)) == CLASSES[label]
  # The held-out files are the rule's positions in each sorted class.
  for label, name in enumerate(CLASSES):
    files = sorted(p for p in train_paths + test_paths
                   if f'/{name}/' in p)
    expected = [files[i] for i in image_folder.holdout_indices(len(files))]
    assert sorted(p for p in test_paths if f'/{name}/' in p) == expected
  # The order is fixed and shuffled: not grouped by class.
  assert len(set(train_labels[:20])) == 3
  info = data.dataset_info(data.IMAGE_FOLDER, root)
  assert info.class_names == CLASSES and info.num_classes == 3
  assert info.num_examples == {data.Split.TRAIN: 63,
                               data.Split.TRAIN_AND_VALID: 63,
                               data.Split.VALID: 6, data.Split.TEST: 6}


def test_scan_split_folders(tmp_path):
  root = str(tmp_path / 'splits')
  _tiny_folder(os.path.join(root, 'train'), {'b': 5, 'a': 4})
  _tiny_folder(os.path.join(root, 'val'), {'a': 2, 'b': 1})
  folder = image_folder.scan(root)
  assert folder.class_names == ('a', 'b') and folder.layout == 'splits'
  assert len(folder.bases['train'][0]) == 9  # No holdout.
  assert folder.bases['test'] is folder.bases['valid']
  np.testing.assert_array_equal(np.sort(folder.bases['valid'][1]), [0, 0, 1])
  _tiny_folder(os.path.join(root, 'test'), {'a': 3, 'b': 3})
  image_folder.scan.cache_clear()
  folder = image_folder.scan(root)
  assert len(folder.bases['valid'][0]) == 3
  assert len(folder.bases['test'][0]) == 6
  # A lone train/ folder gets the holdout.
  alone = str(tmp_path / 'alone')
  _tiny_folder(os.path.join(alone, 'train'), {'a': 10, 'b': 20})
  folder = image_folder.scan(alone)
  np.testing.assert_array_equal(np.bincount(folder.bases['test'][1]), [1, 2])
  assert len(folder.bases['train'][0]) == 27


@pytest.mark.parametrize('layout, message', [
    ('missing', "config.dataset.data_dir='{root}' is not a folder"),
    ('no_classes', 'has no class folders'),
    ('empty_class', "class folder(s) ['b'] of '{root}' hold no images"),
    ('mismatch', "missing in val/: ['c'], not in train/: ['d']"),
    ('both_valid', 'has both val/ and validation/'),
])
def test_scan_errors_name_the_folder(tmp_path, layout, message):
  root = str(tmp_path / layout)
  if layout == 'no_classes':
    os.makedirs(root)
    _save(np.zeros((4, 4, 3), np.uint8), os.path.join(root, 'loose.png'))
  elif layout == 'empty_class':
    _tiny_folder(root, {'a': 3, 'b': 0})
  elif layout == 'mismatch':
    _tiny_folder(os.path.join(root, 'train'), {'a': 2, 'c': 2})
    _tiny_folder(os.path.join(root, 'val'), {'a': 2, 'd': 2})
  elif layout == 'both_valid':
    for split in ('train', 'val', 'validation'):
      _tiny_folder(os.path.join(root, split), {'a': 2})
  with pytest.raises(ValueError) as err:
    data.dataset_info(data.IMAGE_FOLDER, root)
  assert message.format(root=root) in str(err.value)
  assert 'config.dataset.data_dir' in str(err.value)


# --- decoding ----------------------------------------------------------------


@pytest.mark.parametrize('mode, fmt', [
    (None, 'PNG'), (None, 'BMP'), ('L', 'PNG'), ('L', 'BMP'), ('RGBA', 'PNG'),
    ('P', 'PNG'), ('LA', 'PNG'), ('RGBA', 'WEBP'), (None, 'JPEG')])
def test_decode_gives_rgb_uint8(tmp_path, mode, fmt):
  rgb = _pattern(0, np.random.default_rng(3), size=16)
  path = str(tmp_path / f'x.{fmt.lower()}')
  image = Image.fromarray(rgb)
  image = image.quantize(8) if mode == 'P' else (
      image.convert(mode) if mode else image)
  options = {'WEBP': {'lossless': True},
             'JPEG': {'quality': 95, 'subsampling': 0}}.get(fmt, {})
  image.save(path, fmt, **options)
  decoded = images.read_rgb(path)
  assert decoded.dtype == np.uint8 and decoded.shape == (16, 16, 3)
  expected = np.asarray(image.convert('RGB'))
  if fmt == 'JPEG':  # Lossy: close to the original, not equal.
    assert np.abs(decoded.astype(int) - expected).mean() < 12
  else:
    np.testing.assert_array_equal(decoded, expected)
  if mode in ('L', 'LA'):
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


@pytest.mark.parametrize('content', [b'not an image', 'truncated'])
def test_undecodable_file_names_its_path(tmp_path, content):
  path = str(tmp_path / 'bad.png')
  if content == 'truncated':
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    content = open(_save(noise, str(tmp_path / 'g.png')), 'rb').read()
    content = content[:len(content) // 2]
  with open(path, 'wb') as f:
    f.write(content)
  with pytest.raises(data.ImageDecodeError) as err:
    images.read_rgb(path)
  assert err.value.path == path and repr(path) in str(err.value)
  # grain worker processes pickle errors: the path survives.
  again = pickle.loads(pickle.dumps(err.value))
  assert again.path == path and str(again) == str(err.value)


# --- through the pipeline ----------------------------------------------------


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_folder(str(tmp_path_factory.mktemp('images') / 'root'))


def _load(folder, split, **kwargs):
  defaults = dict(dataset=data.IMAGE_FOLDER, data_dir=folder, batch_size=8,
                  image_size=16, seed=0, eval_crop_padding=0)
  return data.load(split, **{**defaults, **kwargs})


def test_eval_pass_over_hosts_reads_the_holdout_once(folder):
  _, expected = image_folder.scan(folder).bases['test']
  labels = []
  for shard in range(2):
    for batch in _load(folder, data.Split.TEST, is_training=False,
                       shard_index=shard, shard_count=2):
      assert batch['images'].shape == (8, 16, 16, 3)
      labels += batch['labels'][batch['mask'] > 0].tolist()
  np.testing.assert_array_equal(sorted(labels), np.sort(expected))
  assert len(labels) == 18


def test_train_stream_resumes_exactly(folder):
  it = _load(folder, data.Split.TRAIN, is_training=True)
  for _ in range(25):  # Past the first epoch (162 images, 8 a batch).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = _load(folder, data.Split.TRAIN, is_training=True)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# --- validation before compute -----------------------------------------------


def _config(root: str, **train):
  config = testing.load_config(testing.DEFAULT_CONFIG)
  config.dataset.name = data.IMAGE_FOLDER
  config.dataset.data_dir = root
  config.workdir = '/unused'
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.mark.parametrize('counts, batch, message', [
    ({'a': 10, 'b': 10}, 128,
     'config.train.global_batch_size=128 is invalid; allowed: at most 18 '
     "(the training split's size in config.dataset.data_dir="),
    ({'a': 1, 'b': 1, 'c': 1}, 2,
     "config.dataset.eval_split='test' is invalid; allowed: a split with "
     'examples (this one has none in config.dataset.data_dir='),
    ({'a': 3, 'b': 0}, 2, "class folder(s) ['b']"),
    ({}, 2, 'has no class folders'),
])
def test_validate_rejects_bad_folders(tmp_path, counts, batch, message):
  root = str(tmp_path / 'root')
  os.makedirs(root)
  _tiny_folder(root, counts)
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate(_config(root, global_batch_size=batch),
                               check_model=False)
  assert message in str(err.value)


def test_cli_bad_folder_exits_2_before_compute(cache_dir, tmp_path):
  root = _tiny_folder(str(tmp_path / 'root'), {'cat': 4, 'dog': 0})
  proc = testing.train_in_process(
      str(tmp_path / 'w'), '--config.dataset.name=image_folder',
      f'--config.dataset.data_dir={root}', config=testing.DEFAULT_CONFIG,
      cache_dir=cache_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"class folder(s) ['dog'] of '{root}' hold no images" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not testing.checkpoint_steps(str(tmp_path / 'w'))


# --- end to end --------------------------------------------------------------


def _flags(root: str) -> tuple[str, ...]:
  return ('--config.dataset.name=image_folder',
          f'--config.dataset.data_dir={root}', *_RUN_FLAGS)


@pytest.fixture(scope='module')
def reference(cache_dir, folder, tmp_path_factory):
  """A run of the digits config on the folder (in-process)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'w')
  proc = testing.train_in_process(workdir, *_flags(folder),
                                  config=testing.DEFAULT_CONFIG,
                                  cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.slow
def test_trains_to_high_accuracy_and_names_classes(reference):
  final = run_logging.read_metrics(reference, 'eval')[-1]
  assert final['step'] == NUM_STEPS and final['count'] == 18
  assert final['top1'] >= 0.9 and final['ema_top1'] >= 0.9, final
  with open(os.path.join(reference, create.CLASS_NAMES_FILE)) as f:
    assert json.load(f) == list(CLASSES)


@pytest.mark.slow
def test_predict_names_the_class_of_new_images(reference, tmp_path, capsys):
  rng = np.random.default_rng(123)  # Images the run has not seen.
  paths = [_save(_pattern(label, rng), str(tmp_path / f'new{label}.png'))
           for label in range(len(CLASSES))]
  assert predict.main(['--pretrained', reference, '--json', *paths]) == 0
  results = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith('{')]
  assert [r['path'] for r in results] == paths
  for label, result in enumerate(results):
    assert result['top'][0]['label'] == CLASSES[label], result
    assert result['top'][0]['index'] == label


@pytest.mark.slow
def test_corrupt_file_stops_with_exit_2_after_a_checkpoint(cache_dir, tmp_path):
  root = write_folder(str(tmp_path / 'root'))
  # Last of 61 sorted discs: not a holdout position, so read in training.
  bad = os.path.join(root, 'disc', 'zz_corrupt.png')
  noise = np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8)
  good = open(_save(noise, str(tmp_path / 'noise.png')), 'rb').read()
  with open(bad, 'wb') as f:
    f.write(good[:len(good) // 2])  # A truncated PNG.
  workdir = str(tmp_path / 'w')
  proc = testing.train_in_process(workdir, *_flags(root),
                                  config=testing.DEFAULT_CONFIG,
                                  cache_dir=cache_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f'cannot decode image {bad!r}' in proc.stderr
  step = int(proc.stderr.split('(at step ')[1].split(')')[0])
  assert step < NUM_STEPS
  assert testing.checkpoint_steps(workdir)[-1] == step
  assert f'Checkpoint: step {step} in ' in proc.stderr


@pytest.mark.slow
def test_finetune_config_on_image_folder(folder, tmp_path):
  """`configs/nfnet_finetune.py:smoke` with the two dataset flags: a new
  3-way head on a (tiny, saved here) pretrained 1000-class model."""
  path = os.path.join(testing.REPO, 'configs', 'nfnet_finetune.py')
  pretrained = testing.tiny_pretrained(
      testing.load_config(path, 'smoke'), str(tmp_path / 'tiny.npz'))
  workdir = str(tmp_path / 'w')
  argv = [train.PROG, f'--config={path}:smoke', f'--workdir={workdir}',
          '--config.dataset.name=image_folder',
          f'--config.dataset.data_dir={folder}',
          f'--config.pretrained.path={pretrained}']
  assert train.run(argv) == 0
  assert run_logging.read_metrics(workdir, 'eval')[-1]['count'] == 18
  head = testing.load_checkpoint(workdir)['params']['NFNet/~/linear']['w']
  assert head.shape[-1] == len(CLASSES)
  with open(os.path.join(workdir, create.CLASS_NAMES_FILE)) as f:
    assert json.load(f) == list(CLASSES)
