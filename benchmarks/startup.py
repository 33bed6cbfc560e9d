"""Start-up: from a fresh Python process to the first prediction, against timm.

Each measurement is its own fresh process, ours and timm's alternating
(`--rounds` of each), after one unmeasured warm-up of each (so JAX's
persistent compilation cache, where the program uses it, holds what an
earlier run wrote, as on a machine where the program ran before):
  - ours: `import nfnets_jax`, `create_model("dm_nfnet_f0", pretrained=FILE)`
    (a timm `.safetensors` the benchmark writes: random weights) and the
    first call on one preprocessed 256 px image; and the same with random
    weights (`pretrained=False`); each also with JAX's persistent cache
    turned on through its environment variables, as docs/performance.md
    tells library users;
  - timm: `import timm`, `timm.create_model("dm_nfnet_f0")` with the same
    file loaded, and the first eval forward (`no_grad`, 2 threads);
  - `nfnets-predict --pretrained FILE image.jpg` as a command, wall time;
    its persistent compilation cache in a temporary folder.
It prints the median seconds of each phase, ours / timm, and the 1-minute
load before and after.

Usage:
  python benchmarks/startup.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

OURS = """
import time, json, sys
t0 = time.perf_counter()
import numpy as np
import nfnets_jax as nj
t1 = time.perf_counter()
pretrained = sys.argv[1] if sys.argv[1] != "random" else False
model = nj.create_model("dm_nfnet_f0", pretrained=pretrained)
t2 = time.perf_counter()
x = np.zeros((1, 256, 256, 3), np.float32)
np.asarray(model(x))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "create": t2 - t1, "first_call": t3 - t2}))
"""

TIMM = """
import time, json, sys
t0 = time.perf_counter()
import torch, timm, safetensors.torch
t1 = time.perf_counter()
torch.set_num_threads(int(sys.argv[2]))
model = timm.create_model("dm_nfnet_f0")
if sys.argv[1] != "random":
  model.load_state_dict(safetensors.torch.load_file(sys.argv[1]))
model.eval()
t2 = time.perf_counter()
with torch.no_grad():
  model(torch.zeros(1, 3, 256, 256)).numpy()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "create": t2 - t1, "first_call": t3 - t2}))
"""

WRITE = """
import sys, torch, timm, safetensors.torch
import numpy as np
from PIL import Image
torch.manual_seed(0)
model = timm.create_model("dm_nfnet_f0")
safetensors.torch.save_file(model.state_dict(), sys.argv[1])
pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8)
Image.fromarray(pixels).save(sys.argv[2], quality=90)
"""


def _python(code: str, *args: str, env: dict[str, str]) -> dict[str, float]:
  out = subprocess.run([sys.executable, "-c", code, *args], env=env,
                       check=True, capture_output=True, text=True).stdout
  times = json.loads(out.strip().splitlines()[-1])
  times["total"] = sum(times.values())
  return times


def _predict(weights: str, image: str, env: dict[str, str]) -> dict[str, float]:
  # The command of this interpreter's environment, not whichever is on PATH.
  command = os.path.join(os.path.dirname(sys.executable), "nfnets-predict")
  start = time.perf_counter()
  subprocess.run([command, "--pretrained", weights, image], env=env,
                 check=True, capture_output=True, text=True)
  return {"total": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as folder:
    weights = os.path.join(folder, "dm_nfnet_f0.safetensors")
    image = os.path.join(folder, "image.jpg")
    env = dict(os.environ, NFNETS_JAX_COMPILE_CACHE=os.path.join(
        folder, "cache"))
    # Python keeps modules' bytecode between runs, as it does by default (a
    # sandbox may turn it off; an editable install has none until then).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", WRITE, weights, image], check=True,
                   env=env)
    # A library user's own process with JAX's cache turned on (docs).
    cached = dict(env, JAX_COMPILATION_CACHE_DIR=os.path.join(folder, "jax"),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    contenders = {
        "ours, timm file": lambda: _python(OURS, weights, env=env),
        "ours, random": lambda: _python(OURS, "random", env=env),
        "ours, timm file, JAX cache on": lambda: _python(OURS, weights,
                                                         env=cached),
        "ours, random, JAX cache on": lambda: _python(OURS, "random",
                                                      env=cached),
        "timm, file": lambda: _python(TIMM, weights, str(args.threads),
                                      env=env),
        "timm, random": lambda: _python(TIMM, "random", str(args.threads),
                                        env=env),
        "nfnets-predict, 1 image": lambda: _predict(weights, image, env),
    }
    for run in contenders.values():  # Warm-up: caches written, files read.
      run()
    load_before = os.getloadavg()[0]
    results = {name: [] for name in contenders}
    for _ in range(args.rounds):
      for name, run in contenders.items():
        results[name].append(run())
    load_after = os.getloadavg()[0]
  print(f"start-up, median of {args.rounds} fresh processes each "
        f"(after one warm-up); load {load_before:.2f} before, "
        f"{load_after:.2f} after\n")
  print("| | import s | create s | first call s | total s |")
  print("|---|---:|---:|---:|---:|")
  medians = {}
  for name, runs in results.items():
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    medians[name] = med
    cells = [f"{med[k]:.2f}" if k in med else "" for k in
             ("import", "create", "first_call")]
    print(f"| {name} | {' | '.join(cells)} | {med['total']:.2f} |")
  for ours, timm in (("ours, timm file", "timm, file"),
                     ("ours, random", "timm, random"),
                     ("ours, timm file, JAX cache on", "timm, file"),
                     ("ours, random, JAX cache on", "timm, random")):
    print(f"\n{ours} / {timm}: "
          f"{medians[ours]['total'] / medians[timm]['total']:.2f}x")


if __name__ == "__main__":
  main()
