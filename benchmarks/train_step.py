r"""Train-step speed and memory of the default digits ViT, side by side, on this machine.

  python benchmarks/train_step.py [--steps 100] [--warmup 10] [--rounds 3]
                                 [--results benchmarks/RESULTS.md]

For each variant of ml_collections_configs/supervised/digits_vit.py (batch 64 / 256 x compute
float32 / bfloat16 x remat off / on) it builds the step exactly as train.py does (the method by
name, optim.make_optimizer, train.create_state, train.make_default_train_step, jit with the
state/batch shardings and donated state) and reports:
  ms/step       median wall time of `--steps` steps after `--warmup` steps, each step timed
                to `jax.block_until_ready` of its outputs (the same real batch every step,
                so input-pipeline time is excluded); p10-p90 beside it shows the noise.
                The whole grid is measured `--rounds` times, interleaved (other jobs may
                share the machine), and each row reports its fastest round's median (its
                p10-p90 and memory too), with the range of the rounds' medians beside it.
  examples/s    batch / median step time.
  compile s     jit lower + XLA compile of the step.
  XLA MiB       compiled.memory_analysis(): temp (activations, workspace) + argument bytes.
  peak RSS MiB  the process's max resident set size (resource.getrusage). Each variant runs
                in its own subprocess, so this is that variant's peak, not a running max.
Writes/replaces the section "## Train step (CPU)" of --results (other sections are kept).
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: time_step
import argparse
import importlib.util
import json
import os
import pathlib
import resource
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "ml_collections_configs" / "supervised" / "digits_vit.py"
SECTION = "## Train step (CPU)"
# (batch, compute dtype, remat); the first row is the default config, the baseline.
VARIANTS = [(b, d, r) for r in (False, True) for d in ("float32", "bfloat16")
            for b in (64, 256)]


def load_config(batch: int, dtype: str, remat: bool):
  spec = importlib.util.spec_from_file_location("digits_vit", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("")
  c.input.global_batch_size = batch
  c.model.dtype = dtype
  c.model.remat = remat
  return c


def build_step(config):
  """The pieces train.train_and_evaluate builds before its loop, built the same way.
  Returns (jitted step, state, one global batch, mesh, rules)."""
  import jax
  from jax_transfer import config as config_lib, data, methods, optim, parallel, train

  config_lib.validate(config, jax.device_count())
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.sharding_rules)
  method = methods.get_method(config.method)(config, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, config.total_steps)
  state, state_sh = train.create_state(method, tx, mesh, rules, jax.random.key(config.seed))
  step = train.jit_train_step(method, tx, schedule, config, state_sh, mesh)
  it = data.make_train_iterator(config.input, seed=config.seed)
  local = {k: v for k, v in next(it).items() if k in ("image", "label")}
  return step, state, parallel.global_batch(local, mesh), mesh, rules


def measure(batch: int, dtype: str, remat: bool, steps: int, warmup: int) -> dict:
  import jax
  from jax_transfer import parallel
  config = load_config(batch, dtype, remat)
  step, state, gbatch, mesh, rules = build_step(config)
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    timing, state, metrics = harness.time_step(compiled, state, gbatch, warmup, steps)
  loss = float(metrics["train/loss"])
  assert loss == loss, "NaN loss: the benchmark would time garbage"
  median = timing["median_s"]
  return dict(
      batch=batch, dtype=dtype, remat=remat, steps=steps, warmup=warmup,
      ms_per_step=1e3 * median, p10_ms=1e3 * timing["p10_s"], p90_ms=1e3 * timing["p90_s"],
      examples_per_s=batch / median, compile_s=compile_s,
      xla_temp_bytes=getattr(mem, "temp_size_in_bytes", None),
      xla_argument_bytes=getattr(mem, "argument_size_in_bytes", None),
      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      final_loss=loss, variant=config.model.variant)


# ------------------------------------------------------------------------------- Reporting.



def _mib(x):
  return "n/a" if x is None else f"{x / 2**20:.1f}"


def render(rows: list[dict], command: str, load: tuple) -> str:
  import jax
  base = rows[0]["ms_per_step"]
  lines = [
      SECTION, "",
      f"ViT-{rows[0]['variant']} on digits (8x8x1, 5 classes), "
      "`ml_collections_configs/supervised/digits_vit.py` with the batch / compute dtype / "
      "remat of each row; AdamW, one device. Median of "
      f"{rows[0]['steps']} steps after {rows[0]['warmup']} warm-up steps, each timed to "
      "`jax.block_until_ready`; the input pipeline is excluded (one real batch reused). "
      "Peak RSS is per variant (one subprocess each).", "",
      f"Best of {rows[0]['rounds']} interleaved rounds per row (range of the rounds' medians "
      "shown); XLA temp/args from `compiled.memory_analysis()`.", "",
      "| batch | compute | remat | ms/step (median) | p10-p90 ms | rounds' medians ms "
      "| vs. baseline | examples/s | compile s | XLA temp MiB | XLA args MiB | peak RSS MiB |",
      "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['batch']} | {r['dtype']} | {'on' if r['remat'] else 'off'} "
        f"| {r['ms_per_step']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} "
        f"| {min(r['round_medians_ms']):.1f}-{max(r['round_medians_ms']):.1f} "
        f"| {r['ms_per_step'] / base:.2f}x | {r['examples_per_s']:,.0f} "
        f"| {r['compile_s']:.2f} | {_mib(r['xla_temp_bytes'])} "
        f"| {_mib(r['xla_argument_bytes'])} | {r['peak_rss_bytes'] / 2**20:.0f} |")
  lines += [""] + report.footer(
      command, report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}",
                                   load))
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  report.add_results_arg(p)
  p.add_argument("--one", help=argparse.SUPPRESS)  # "batch,dtype,remat": child process.
  a = p.parse_args()
  if a.one:
    b, d, r = a.one.split(",")
    print(json.dumps(measure(int(b), d, r == "1", a.steps, a.warmup)))
    return
  load, runs = os.getloadavg(), {v: [] for v in VARIANTS}
  for rnd in range(a.rounds):
    for b, d, r in VARIANTS:
      runs[(b, d, r)].append(report.run_child(
          __file__, ["--steps", str(a.steps), "--warmup", str(a.warmup), "--one",
                     f"{b},{d},{int(r)}"], f"variant batch={b} dtype={d} remat={r}"))
      print(f"round {rnd} batch {b:4d} {d:8s} remat {'on ' if r else 'off'}: "
            f"{runs[(b, d, r)][-1]['ms_per_step']:.2f} ms/step", flush=True)
  rows = []
  for v in VARIANTS:
    best = dict(min(runs[v], key=lambda x: x["ms_per_step"]))
    best["round_medians_ms"] = [x["ms_per_step"] for x in runs[v]]
    best["rounds"] = a.rounds
    rows.append(best)
  command = report.command_line("python benchmarks/train_step.py", p, a,
                               ("steps", "warmup", "rounds"))
  report.publish(a.results, SECTION, render(rows, command, load))


if __name__ == "__main__":
  main()
