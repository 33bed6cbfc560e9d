"""NFNet throughput: nfnets_jax against timm's `dm_nfnet_*`, side by side.

For each batch size, each contender in its own process, interleaved (so every
contender sees the same machine), it times:
  - inference: the jitted forward in eval mode, images/s;
  - a train step: forward, backward and an SGD-Nesterov update, images/s;
for ours (one row per `--conv-impl`, the lowering set with
`nfnets_jax.conv_impl`; programs compiled with the package's CPU compiler
options) and timm (one row per memory format).

It cannot be fooled by load. It prints the 1-minute load average before and
after the run (after a cool-down), the CPU time the hypervisor stole, and
the machine's measured matmul rate; each row's MFU is its FLOP/s over that
rate (on a GPU also over the chip's dense bf16 peak). Ratios are marked
INVALID when the load before the run exceeded `--max-load-per-core` per core
used, when a row's repetitions spread (max - min) / median more than
`--max-spread`, or when more than `--max-steal` of the CPU time was stolen.

It sets NFNETS_JAX_MALLOC=1 unless told otherwise, and every process calls
`nfnets_jax.cpu.malloc.tune()` first, as `nfnets-train` does, so timm runs
under the same glibc malloc settings as ours (which also makes our CPU
dispatch synchronous; NFNETS_JAX_MALLOC=0 gives both glibc's defaults and
ours JAX's asynchronous dispatch; see docs/performance.md). CPU: float32 for both, every core
(torch's thread count = cores). GPU: ours in bfloat16 activations with
float32 params, timm under bf16 autocast; peak device memory per row.
`benchmarks/gpu_run.sh` is the whole GPU run.

Usage:
  python benchmarks/throughput.py                        # F0, 192 px, 8 and 32
  python benchmarks/throughput.py --batches 8 --repeats 7 --out r.md
  python benchmarks/throughput.py --conv-impl split native --timm-formats \
      nchw channels_last --batches 64 128 256            # on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

# Several processes share one GPU: none may take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Keep freed buffers, dispatch synchronously (nfnets_jax/cpu/malloc.py).
os.environ.setdefault("NFNETS_JAX_MALLOC", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets_jax.cpu import malloc

MALLOC_SETTINGS = malloc.tune()  # Before JAX starts, in every process.

import nfnets_jax as nj
import haiku as hk
import jax
import jax.numpy as jnp
import optax

NUM_CLASSES = 1000
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's sheets.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
TIMM_NAMES = {f"F{i}": f"dm_nfnet_f{i}" for i in range(7)}


@dataclasses.dataclass
class Contender:
  """One row: closures that each run one inference or one train step."""
  name: str
  infer: Callable[[], None]
  train: Callable[[], None]
  peak_memory: Callable[[], int | None] = lambda: None


class Worker:
  """A contender living in its own process, driven over a pipe.

  Ours and timm never share a process (no thread pool, allocator or flag of
  one can touch the other); each runs alone while the others block on a
  pipe. Each timed call waits `--pause` seconds first: right after the other
  process's step, ours ran 7.27 img/s (F0 train, batch 8, 0.2 s pause) against
  8.03 alone and 7.74 after a 2 s pause, and timm 6.60 against 7.61, with
  spreads of 10-14% against 3-9% (2-core Zen 5 EPYC; cause not found).
  """

  def __init__(self, factory: Callable[..., Contender], *spec):
    """Starts the process; there `factory(*spec)` builds the contender (a
    module-level function, so that the process can import it)."""
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_serve, args=(child, factory, spec),
                             daemon=True)
    self._proc.start()
    self.name = self._ask("name")
    self.times: dict[str, list[float]] = {"infer": [], "train": []}

  def _ask(self, command: str):
    self._conn.send(command)
    status, value = self._conn.recv()
    if status == "error":
      raise RuntimeError(f"benchmark worker failed: {value}")
    return value

  def run(self, kind: str) -> float:
    """Runs one `kind` ('infer' or 'train') step there; returns seconds."""
    return self._ask(kind)

  def peak_memory(self) -> int | None:
    return self._ask("memory")

  def close(self) -> None:
    self._conn.send("stop")
    self._proc.join(timeout=60)


def _serve(conn, factory: Callable[..., Contender], spec: tuple) -> None:
  """Worker process body: builds the contender, answers commands."""
  try:
    contender = factory(*spec)
  except Exception as e:  # pylint: disable=broad-except
    conn.recv()
    conn.send(("error", f"{type(e).__name__}: {e}"))
    return
  while (command := conn.recv()) != "stop":
    try:
      if command == "name":
        conn.send(("ok", contender.name))
      elif command == "memory":
        conn.send(("ok", contender.peak_memory()))
      else:
        conn.send(("ok", _time(getattr(contender, command))))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------- machine ----
def cpu_times() -> tuple[float, float]:
  """(total, stolen) CPU seconds since boot, from /proc/stat (0s elsewhere)."""
  try:
    with open("/proc/stat") as f:
      fields = [float(v) for v in f.readline().split()[1:]]
  except OSError:
    return 0.0, 0.0
  hz = os.sysconf("SC_CLK_TCK")
  return sum(fields[:8]) / hz, (fields[7] if len(fields) > 7 else 0.0) / hz


def steal_since(start: tuple[float, float]) -> float:
  """Fraction of the CPU time since `start` (a `cpu_times()`) stolen."""
  total, stolen = cpu_times()
  return (stolen - start[1]) / max(total - start[0], 1e-9)


def load1() -> float:
  return os.getloadavg()[0]


def cores_used() -> int:
  return len(os.sched_getaffinity(0))


def matmul_rates(backend: str, threads: int | None,
                 repeats: int = 5) -> dict[str, float]:
  """Best-of-`repeats` FLOP/s of square matmuls, JAX and torch (on `threads`
  threads when set): the best over 2048 and 4096 on a CPU (XLA's own CPU
  matmul halves its rate at 4096 on a 2-core AVX2 machine), 8192 in bfloat16
  on a GPU."""
  sizes, dtype = ((2048, 4096), jnp.float32) if backend == "cpu" else (
      (8192,), jnp.bfloat16)

  def best_rate(square: Callable[[int], Callable[[], object]]) -> float:
    """The best FLOP/s over `sizes` of `square(n)()`, an n x n matmul."""
    rates = []
    for n in sizes:
      run = square(n)
      run()  # Compile / warm up.
      rates.append(2 * n**3 / min(_time(run) for _ in range(repeats)))
    return max(rates)

  mm = jax.jit(lambda a, b: a @ b)

  def jax_square(n):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    return lambda: mm(a, a).block_until_ready()

  rates = {"jax": best_rate(jax_square)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return rates
  if threads is not None:
    torch.set_num_threads(threads)
  cuda = torch.cuda.is_available()
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def torch_square(n):
    t = torch.randn(n, n, device="cuda" if cuda else "cpu",
                    dtype=torch.bfloat16 if cuda else torch.float32)
    return lambda: (t @ t, sync())

  rates["torch"] = best_rate(torch_square)
  return rates


def _time(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ------------------------------------------------------------- contenders ----
def make_ours(variant: str, batch: int, size: int, conv_impl: str,
              dtype: str) -> Contender:
  """Our NFNet: jitted eval forward and jitted, donating train step."""
  dtype = jnp.dtype(dtype)
  model = hk.transform_with_state(lambda x, training: nj.NFNet(
      NUM_CLASSES, variant, stochdepth_rate=0.1)(x, is_training=training))
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (batch, size, size, 3), dtype)
  labels = jax.nn.one_hot(jnp.arange(batch) % NUM_CLASSES, NUM_CLASSES)
  params, state = model.init(rng, images, True)
  opt = optax.sgd(0.1, momentum=0.9, nesterov=True)

  def infer(params, state, images):
    return model.apply(params, state, None, images, False)[0]["logits"]

  def loss_fn(params, state, rng, images, labels):
    out, state = model.apply(params, state, rng, images, True)
    loss = optax.softmax_cross_entropy(out["logits"].astype(jnp.float32),
                                       labels).mean()
    return loss, state

  def train_step(params, state, opt_state, rng, images, labels):
    grads, state = jax.grad(loss_fn, has_aux=True)(params, state, rng, images,
                                                   labels)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  carry = [params, state, opt.init(params)]
  with nj.conv_impl(conv_impl):  # Read when the programs are traced.
    infer = nj.cpu.jit(infer).lower(params, state, images).compile()
    train_step = nj.cpu.jit(train_step, donate_argnums=(0, 1, 2)).lower(
        *carry, rng, images, labels).compile()

  def run_infer():
    jax.block_until_ready(infer(carry[0], carry[1], images))

  def run_train():
    carry[:] = train_step(*carry, rng, images, labels)
    jax.block_until_ready(carry)

  def peak_memory() -> int | None:
    """Bytes of XLA's buffers (arguments, outputs, temporaries) for a step."""
    mem = train_step.memory_analysis()
    return None if mem is None else (mem.temp_size_in_bytes
                                     + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes)

  return Contender(f"ours[{conv_impl}]", run_infer, run_train, peak_memory)


def make_timm(variant: str, batch: int, size: int, memory_format: str,
              bf16: bool, threads: int | None = None) -> Contender:
  """timm's dm_nfnet model: no_grad eval forward and an SGD-Nesterov step."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if threads is not None:
    torch.set_num_threads(threads)
  model = timm.create_model(TIMM_NAMES[variant], pretrained=False,
                            drop_path_rate=0.1).to(device)
  fmt = {"nchw": torch.contiguous_format,
         "channels_last": torch.channels_last}[memory_format]
  model = model.to(memory_format=fmt)
  images = torch.randn(batch, 3, size, size, device=device).to(
      memory_format=fmt)
  labels = torch.arange(batch, device=device) % NUM_CLASSES
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                        nesterov=True)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  amp = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

  def run_infer():
    model.eval()
    with torch.no_grad(), amp():
      model(images)
    sync()

  peak = [None]

  def run_train():
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    model.train()
    opt.zero_grad(set_to_none=True)
    with amp():
      loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    opt.step()
    sync()
    if cuda:
      peak[0] = max(peak[0] or 0, torch.cuda.max_memory_allocated())

  return Contender(f"timm[{memory_format}]", run_infer, run_train,
                   lambda: peak[0])


# ------------------------------------------------------------------- run ----
def train_flops_per_image(variant: str, size: int) -> float:
  """FLOPs of one train-step image: 3x the forward's 2 * MACs."""
  macs = nj.count_flops(lambda x: nj.NFNet(NUM_CLASSES, variant)(
      x, is_training=False), size)
  return 6.0 * macs


def measure(workers: list[Worker], repeats: int, pause: float) -> None:
  """Warms each worker up, then times `repeats` interleaved rounds."""
  for w in workers:
    t_infer, t_train = w.run("infer"), w.run("train")
    print(f"  warm-up {w.name}: infer {t_infer:.1f}s, train {t_train:.1f}s",
          flush=True)
    w.run("infer"), w.run("train")
  for rep in range(repeats):
    for w in workers:
      for kind in ("infer", "train"):
        time.sleep(pause)  # Let the other side's thread pool go idle.
        w.times[kind].append(w.run(kind))
    print(f"  repeat {rep + 1}/{repeats}", flush=True)


def spread(times: Sequence[float]) -> float:
  return (max(times) - min(times)) / statistics.median(times)


def report_rows(contenders: list[Worker], batch: int, flops: float,
                rate: float, peak: float | None, invalid_machine: str | None,
                max_spread: float) -> list[dict]:
  """One dict per contender: img/s, spread, MFU, ratio to the fastest timm
  row (or why it is invalid)."""
  timms = [c for c in contenders if c.name.startswith("timm")]
  # Ratios are against timm's fastest memory format, per kind.
  bases = {kind: min(timms, key=lambda t: statistics.median(t.times[kind]),
                     default=None) for kind in ("infer", "train")}
  rows = []
  for c in contenders:
    row = {"model": c.name, "batch": batch}
    for kind in ("infer", "train"):
      base = bases[kind]
      ips = batch / statistics.median(c.times[kind])
      row[f"{kind}_img_s"] = ips
      row[f"{kind}_spread"] = spread(c.times[kind])
      per_image = flops / 3 if kind == "infer" else flops
      row[f"{kind}_mfu"] = ips * per_image / rate
      if peak:
        row[f"{kind}_mfu_peak"] = ips * per_image / peak
      if base is not None:
        why = invalid_machine or next(
            (f"{d.name} batch {batch} {kind} spread "
             f"{spread(d.times[kind]):.0%} > "
             f"{max_spread:.0%}" for d in (c, base)
             if spread(d.times[kind]) > max_spread), None)
        row[f"{kind}_ratio"] = (
            None if why else
            ips / (batch / statistics.median(base.times[kind])))
        row[f"{kind}_invalid"] = why
    row["peak_memory_bytes"] = c.peak_memory()
    rows.append(row)
  return rows


def markdown(rows: list[dict], has_peak: bool) -> str:
  """The rows as a Markdown table."""
  head = ("| model | batch | infer img/s | infer MFU | train img/s | "
          "train MFU | infer vs best timm | train vs best timm | spread i/t | memory |")
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  for r in rows:
    def mfu(kind):
      text = f"{r[f'{kind}_mfu']:.0%}"
      return text + (f" ({r[f'{kind}_mfu_peak']:.0%} of peak)"
                     if has_peak else "")

    def ratio(kind):
      if f"{kind}_ratio" not in r:
        return "-"
      if r[f"{kind}_ratio"] is None:
        return "INVALID"
      return f"{r[f'{kind}_ratio']:.2f}x"

    mem = r["peak_memory_bytes"]
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['infer_img_s']:.2f} | "
        f"{mfu('infer')} | {r['train_img_s']:.2f} | {mfu('train')} | "
        f"{ratio('infer')} | {ratio('train')} | "
        f"{r['infer_spread']:.0%} / {r['train_spread']:.0%} | "
        f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB'} |")
  return "\n".join(lines)


def cool_down(max_wait: float, threshold: float) -> float:
  """Waits (up to `max_wait` s) for the 1-min load to fall below `threshold`."""
  deadline = time.monotonic() + max_wait
  while load1() >= threshold and time.monotonic() < deadline:
    time.sleep(5)
  return load1()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line flags; defaults depend on the backend (CPU or GPU)."""
  gpu = jax.default_backend() != "cpu"
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--variant", default="F0", choices=sorted(TIMM_NAMES))
  parser.add_argument("--size", type=int, default=192, help="image side, px")
  parser.add_argument("--batches", type=int, nargs="+",
                      default=[64, 128, 256] if gpu else [8, 32])
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed, interleaved repetitions per measurement")
  parser.add_argument("--conv-impl", nargs="+",
                      default=["split", "native"] if gpu else ["auto"],
                      choices=nj.cpu.CONV_IMPLS)
  parser.add_argument("--timm-formats", nargs="+",
                      default=["nchw", "channels_last"] if gpu else ["nchw"],
                      choices=["nchw", "channels_last"])
  parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                      default="bfloat16" if gpu else "float32",
                      help="activations (params stay float32; timm: autocast)")
  parser.add_argument("--no-timm", action="store_true")
  parser.add_argument("--max-load-per-core", type=float, default=1.0)
  parser.add_argument("--max-spread", type=float, default=0.10)
  parser.add_argument("--max-steal", type=float, default=0.10,
                      help="largest fraction of CPU time the host may steal")
  parser.add_argument("--pause", type=float, default=2.0,
                      help="seconds of idle before each timed call (0.2 s "
                      "slowed both sides by 6-15%%, see README)")
  parser.add_argument("--cool-down", type=float, default=90.0,
                      help="max seconds to wait for the load to fall after")
  parser.add_argument("--out", help="also write the report (Markdown) and "
                      "a JSON twin (same name, .json) here")
  args = parser.parse_args(argv)
  if any(b < 1 for b in args.batches):
    parser.error(f"--batches: every value must be >= 1, got {args.batches}")
  if args.repeats < 2:
    parser.error(f"--repeats must be >= 2 to measure a spread, got "
                 f"{args.repeats}")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  backend = jax.default_backend()
  dtype = jnp.dtype(args.dtype)
  cores = cores_used()
  load_before = load1()
  cpu0 = cpu_times()
  device = jax.devices()[0].device_kind
  header = [f"backend={backend} device={device} cores={cores} "
            f"variant={args.variant} size={args.size} dtype={dtype.name} "
            f"jax={jax.__version__} XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}"
            f" compiler options={nj.cpu.compiler_options()}",
            "cpu.malloc.tune() (every process): " + (" ".join(
                f"{k}={v}" for k, v in MALLOC_SETTINGS.items())
                or "off: glibc's defaults, asynchronous dispatch"),
            f"load before: {load_before:.2f} (1-min average, "
            f"{load_before / cores:.2f} per core)"]
  print("\n".join(header), flush=True)
  torch_threads = cores if backend == "cpu" else None
  rates = matmul_rates(backend, torch_threads)
  rate = max(rates.values())
  peak = next((v for k, v in BF16_PEAK.items() if k in device), None)
  header.append("matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s"
                                       for k, v in rates.items())
                + f" -> MFU is against {rate / 1e9:.0f} GFLOP/s"
                + (f"; bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
  print(header[-1], flush=True)
  if not args.no_timm:
    import torch  # pylint: disable=g-import-not-at-top
    header.append(f"torch={torch.__version__} threads="
                  f"{torch.get_num_threads()}")
  flops = train_flops_per_image(args.variant, args.size)
  header.append(f"{flops / 1e9:.1f} GFLOP per train-step image "
                f"({flops / 3e9:.1f} per inference image)")
  print(header[-1], flush=True)

  rows: list[dict] = []
  for batch in args.batches:
    print(f"batch {batch}:", flush=True)
    contenders = [Worker(make_ours, args.variant, batch, args.size, impl,
                         dtype.name) for impl in args.conv_impl]
    if not args.no_timm:
      contenders += [Worker(make_timm, args.variant, batch, args.size, fmt,
                            dtype == jnp.bfloat16, torch_threads)
                     for fmt in args.timm_formats]
    measure(contenders, args.repeats, args.pause)
    steal = steal_since(cpu0)
    invalid = None
    if load_before / cores > args.max_load_per_core:
      invalid = (f"load before {load_before:.2f} > {args.max_load_per_core}"
                 f" per core x {cores}")
    elif steal > args.max_steal:
      invalid = f"{steal:.0%} of CPU time stolen > {args.max_steal:.0%}"
    rows += report_rows(contenders, batch, flops, rate, peak, invalid,
                        args.max_spread)
    for w in contenders:
      w.close()

  steal = steal_since(cpu0)
  load_end = load1()
  load_after = cool_down(args.cool_down, args.max_load_per_core * cores / 2)
  footer = [f"load at end: {load_end:.2f}; after cool-down: {load_after:.2f}"
            f"; CPU time stolen by the host during the run: {steal:.1%}",
            f"(medians of {args.repeats} interleaved repetitions; train step ="
            " forward + backward + SGD-Nesterov update, dropout 0.2, "
            "stochastic depth 0.1; MFU = FLOP/s over the matmul rate above"
            + "; memory = XLA's buffers of our train step, torch's peak "
            "allocated bytes of timm's on a GPU)"]
  body = markdown(rows, peak is not None) + "\n\n" + "\n".join(footer)
  reasons = sorted({r[f"{k}_invalid"] for r in rows
                    for k in ("infer", "train") if r.get(f"{k}_invalid")})
  if reasons:
    body += "\nratios marked INVALID: " + "; ".join(reasons)
  print("\n" + body)
  report = "\n".join(header) + "\n\n" + body
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
      json.dump({"header": header, "footer": footer, "rows": rows,
                 "matmul_flops": rates, "load_before": load_before,
                 "load_after": load_after, "steal": steal}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
