r"""Input pipeline throughput vs the training step's consumption, for the default configs.

  python benchmarks/input_pipeline.py [--configs shapes_clip,digits_vit,digits_krr_st,digits_gpicl]
                                      [--batches 100] [--steps 50] [--rounds 2]
                                      [--results benchmarks/RESULTS.md]

For each config (one subprocess each, one device) it builds, as train.py does, the grain
train iterator (`data.make_train_iterator(config.input, seed=...)`), the method and the jitted
step (benchmarks/harness.py), and measures three things:
  pipeline   batches/s of `parallel.global_batch(method.host_batch(next(it)))`: reading,
             decoding, preprocessing, batching, the method's host step (tokenising captions,
             z-normalising) and the host->device transfer, over --batches batches after the
             first 5 (pipeline start-up excluded). The step does not run meanwhile.
  step       steps/s of the jitted train step alone on one real batch, reused: the
             consumption rate. Timed as train.py's loop runs it (the previous step's loss is
             read back each step, so dispatch overlaps one step).
  loop       steps/s of train.py's loop body (next batch, host_batch, global_batch, step,
             previous loss): what training gets, pipeline and step sharing the same cores.
             Step and loop are timed in 5 alternating blocks (--steps steps in all for
             each), so that load changes on a shared machine hit both alike.
ratio = pipeline / step: how many times faster the pipeline produces batches than the step
consumes them (must be > 1; on 2 CPU cores the two also compete for cores, which `loop`
shows). Of --rounds rounds, the one with the fastest step is reported. digits_krr_st's target model g is a randomly
initialised SSL export written to a temporary directory (the step's cost does not depend on
its values). Writes/replaces the section "## Input pipeline vs step (CPU)" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: the step as train.py builds it
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

SECTION = "## Input pipeline vs step (CPU)"
# name -> (config file under ml_collections_configs/, argument)
CONFIGS = {
    "shapes_clip": ("contrastive/shapes_clip.py", "clip"),
    "digits_vit": ("supervised/digits_vit.py", ""),
    "digits_krr_st": ("distill/digits_krr_st.py", ""),
    "digits_gpicl": ("icl/digits_gpicl.py", ""),
}
STARTUP_BATCHES = 5
BLOCKS = 5  # alternating blocks of step-alone and loop steps


def random_target_export(out_dir: str) -> str:
  """digits_krr_st's SSL target g (the `:ssl` config's model), randomly initialised and
  exported with checkpoint.export, so method=distill can load it."""
  import flax.linen as nn
  import jax
  from jax_transfer import checkpoint, methods, parallel
  cfg = harness.load_config("distill/digits_krr_st.py", "ssl")
  mesh = parallel.make_mesh(cfg.mesh)
  method = methods.get_method(cfg.method)(cfg, mesh)
  params = nn.unbox(method.init_params(jax.random.key(0)))
  checkpoint.export(params, cfg, out_dir)
  return out_dir


def measure(name: str, n_batches: int, n_steps: int) -> dict:
  import jax
  from jax_transfer import data
  relpath, arg = CONFIGS[name]
  config = harness.load_config(relpath, arg)
  tmp = tempfile.mkdtemp(prefix="input_pipeline_")
  if config.method == "distill":
    config.distill.target_export = random_target_export(os.path.join(tmp, "g_export"))
  ts = harness.build_train_step(config, jax.devices()[:1] if config.mesh.data == -1 else None,
                                workdir=tmp)
  method = ts.method

  def next_batch(it):
    return ts.global_batch(method.host_batch(next(it)))

  # ---- Pipeline alone.
  it = data.make_train_iterator(config.input, seed=config.seed)
  t0 = time.perf_counter()
  for _ in range(STARTUP_BATCHES):
    batch = next_batch(it)
  jax.block_until_ready(batch)
  startup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(n_batches):
    batch = next_batch(it)
  jax.block_until_ready(batch)
  pipeline_s = (time.perf_counter() - t0) / n_batches

  # ---- Step alone (one real batch reused), with train.py's one-step-late loss read.
  with ts.context():
    compiled = ts.step.lower(ts.state, batch).compile()
    state = ts.state
    state, metrics = compiled(state, batch)  # warm-up
    float(metrics["train/loss"])

    def run(get_batch, n):
      nonlocal state
      pending = None
      t0 = time.perf_counter()
      for _ in range(n):
        b = get_batch()
        state, metrics = compiled(state, b)
        if pending is not None:
          float(pending["train/loss"])
        pending = metrics
      float(pending["train/loss"])
      return (time.perf_counter() - t0) / n

    # ---- The loop: a fresh iterator (so its prefetch threads start as in training).
    it2 = data.make_train_iterator(config.input, seed=config.seed)
    for _ in range(STARTUP_BATCHES):
      next(it2)
    run(lambda: batch, 10)
    # Step alone and loop in alternating blocks: load changes on a shared machine (and any
    # slow start) hit both alike.
    step_s = loop_s = 0.0
    for _ in range(BLOCKS):
      step_s += run(lambda: batch, n_steps // BLOCKS) / BLOCKS
      loop_s += run(lambda: next_batch(it2), n_steps // BLOCKS) / BLOCKS
  shapes = {k: list(v.shape) for k, v in batch.items()}
  shutil.rmtree(tmp, ignore_errors=True)
  return dict(name=name, config=f"{relpath}" + (f":{arg}" if arg else ""),
              method=config.method, batch=config.input.global_batch_size,
              dataset=config.input.dataset, prefetch=config.input.prefetch,
              num_workers=config.input.num_workers, shapes=shapes,
              startup_s=startup_s, pipeline_s=pipeline_s, step_s=step_s, loop_s=loop_s,
              n_batches=n_batches, n_steps=n_steps)


# ------------------------------------------------------------------------------ Reporting.

def render(rows: list[dict], command: str, load: tuple, note: str) -> str:
  import jax
  lines = [
      SECTION, "",
      "Per default config (one device): **pipeline** = batches/s of the grain train iterator "
      "as train.py builds it plus `method.host_batch` and `parallel.global_batch`, alone; "
      "**step** = steps/s of the jitted train step alone on one real batch; **loop** = "
      "steps/s of train.py's loop body (next batch + host_batch + global_batch + step, the "
      "previous loss read back). ratio = pipeline / step (> 1: the pipeline keeps ahead); "
      "loop / step < 1 is what sharing 2 cores with the pipeline costs. Per config the "
      f"round (of {rows[0]['rounds']}) with the fastest step (pipeline over {rows[0]['n_batches']} batches after "
      f"{STARTUP_BATCHES} start-up batches; step and loop over {rows[0]['n_steps']} steps "
      f"each, in {BLOCKS} alternating blocks).", "",
      "| config | method | global batch | pipeline batches/s | pipeline ms/batch "
      "| step steps/s | step ms | ratio pipeline/step | loop steps/s | loop / step "
      "| start-up s (5 batches) |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| `{r['config']}` | {r['method']} | {r['batch']} | {1 / r['pipeline_s']:,.0f} "
        f"| {1e3 * r['pipeline_s']:.2f} | {1 / r['step_s']:,.1f} | {1e3 * r['step_s']:.2f} "
        f"| **{r['step_s'] / r['pipeline_s']:.1f}x** | {1 / r['loop_s']:,.1f} "
        f"| {r['step_s'] / r['loop_s']:.2f} | {r['startup_s']:.2f} |")
  lines += [""] + report.footer(
      command, report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}, "
                                   "grain 0.2.18", load), note)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--rounds", type=int, default=2)
  report.add_results_arg(p)
  p.add_argument("--note", default="", help="text appended to the section")
  p.add_argument("--one", help=argparse.SUPPRESS)  # config name: child process.
  a = p.parse_args()
  if a.steps < BLOCKS or a.batches < 1:
    p.error(f"--steps={a.steps} must be >= {BLOCKS} (it is split into {BLOCKS} alternating "
            f"blocks) and --batches={a.batches} >= 1")
  if a.one:
    print(json.dumps(measure(a.one, a.batches, a.steps)))
    return
  names = [n for n in a.configs.split(",") if n]
  unknown = set(names) - set(CONFIGS)
  if unknown:
    sys.exit(f"unknown config(s) {sorted(unknown)}; allowed: {sorted(CONFIGS)}")
  load, runs = os.getloadavg(), {n: [] for n in names}
  for rnd in range(a.rounds):
    for n in names:
      r = report.run_child(__file__, ["--one", n, "--batches", str(a.batches), "--steps",
                                      str(a.steps)], n)
      runs[n].append(r)
      print(f"round {rnd} {n:14s}: pipeline {1e3 * r['pipeline_s']:.2f} ms/batch, step "
            f"{1e3 * r['step_s']:.2f} ms, loop {1e3 * r['loop_s']:.2f} ms, ratio "
            f"{r['step_s'] / r['pipeline_s']:.1f}x", flush=True)
  # Per config the round whose step was fastest (the least disturbed by other load), all
  # its numbers together.
  rows = [dict(min(runs[n], key=lambda r: r["step_s"]), rounds=a.rounds) for n in names]
  command = report.command_line("python benchmarks/input_pipeline.py", p, a,
                               ("configs", "batches", "steps", "rounds"))
  report.publish(a.results, SECTION, render(rows, command, load, a.note))


if __name__ == "__main__":
  main()
