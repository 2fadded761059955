r"""One CLIP training step, jax_transfer vs open_clip, on this CPU, side by side.

  python benchmarks/open_clip_step.py [--steps 30] [--warmup 5] [--rounds 3] [--batch 128]
                                      [--results benchmarks/RESULTS.md]

The same model on both sides: ml_collections_configs/contrastive/shapes_clip.py's two towers
(ViT-mu/4 image tower at 32x32x3, text 64 wide x 2 layers x 4 heads, vocab 64, context 16,
embed 64) built with the open_clip parity options (models/two_towers.py: pre_norm,
patch_bias=False, ln_eps=1e-5, erf GELU), and open_clip's `CLIP` with the matching
CLIPVisionCfg / CLIPTextCfg, so the two compute the same function (tests/test_import_clip.py
checks that equivalence to 2e-6). One step = forward, CLIP loss over the batch, backward,
global-norm clip 1.0, AdamW (lr 1e-3, wd 0.05 on matrices only), logit-scale clamp; float32.
  jax_transfer  built through the platform exactly as train.py builds it: the 'contrastive'
                method by name, optim.make_optimizer, train.create_state,
                train.make_default_train_step, jax.jit with state/batch shardings and donated
                state, on a 1-device mesh; dense CLIP loss (`:clip,dense`; on one device the
                chunked ring has nothing to save).
  open_clip     torch eager (open_clip's default), `open_clip.loss.ClipLoss`,
                torch.optim.AdamW, torch.nn.utils.clip_grad_norm_; torch's default threads.
Both get the same synthetic batch (uniform images, random tokens with EOT = the largest id);
step time does not depend on the values. Reported per framework, each in its own fresh
subprocess (so each is measured alone): median ms/step over `--steps` steps after `--warmup`
(each timed to completion: jax.block_until_ready / torch is synchronous on CPU), the best of
`--rounds` interleaved rounds; peak memory = the process's max RSS minus its RSS after imports
(resource.getrusage; torch's allocations are invisible to tracemalloc), and for JAX also
XLA's compiled.memory_analysis(). Writes/replaces only the section
"## CLIP train step: jax_transfer vs open_clip (CPU)" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: median_time
import argparse
import importlib.util
import json
import math
import os
import pathlib
import re
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "ml_collections_configs" / "contrastive" / "shapes_clip.py"
SECTION = "## CLIP train step: jax_transfer vs open_clip (CPU)"
IMAGE_SIZE = 32  # shapes_captions images
PARITY = dict(pre_norm=True, patch_bias=False, ln_eps=1e-5, gelu_approximate=False)


def load_config(batch: int):
  spec = importlib.util.spec_from_file_location("shapes_clip", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("clip,dense")
  c.input.global_batch_size = batch
  c.model.update(PARITY)
  return c


def synthetic_batch(batch: int, image_size: int, context: int, vocab: int, seed: int = 0):
  """images [B, S, S, 3] in [0, 1) (NHWC), tokens [B, L] with EOT = vocab - 1."""
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.random((batch, image_size, image_size, 3), np.float32)
  tokens = np.zeros((batch, context), np.int32)
  for row, eot in zip(tokens, rng.integers(2, context, size=batch)):
    row[:eot] = rng.integers(1, vocab - 1, size=eot)
    row[eot] = vocab - 1
  return images, tokens


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(step, n_warmup, n_steps):
  t = harness.median_time(step, n_warmup, n_steps)
  return dict(ms_per_step=1e3 * t["median_s"], p10_ms=1e3 * t["p10_s"],
              p90_ms=1e3 * t["p90_s"])


# ------------------------------------------------------------------------ jax_transfer side.

def measure_jax(batch: int, steps: int, warmup: int) -> dict:
  import jax
  import numpy as np
  from jax_transfer import config as config_lib, methods, mfu, optim, parallel, train
  config = load_config(batch)
  base_rss = _rss_bytes()

  devices = jax.devices()[:1]
  config.mesh.data = 1
  config_lib.validate(config, len(devices))
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.sharding_rules)
  method = methods.get_method(config.method)(config, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, config.total_steps)
  state, state_sh = train.create_state(method, tx, mesh, rules, jax.random.key(config.seed))
  rss_state = _rss_bytes() - base_rss  # XLA runtime + init compile + state
  m = config.model
  images, tokens = synthetic_batch(batch, IMAGE_SIZE, m.context_length, m.vocab_size)
  gbatch = parallel.global_batch({"image": images, "tokens": tokens}, mesh)
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    jitted = train.jit_train_step(method, tx, schedule, config, state_sh, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    rss_compiled = _rss_bytes() - base_rss
    mem = compiled.memory_analysis()
    box = {"state": state}

    def step():
      box["state"], metrics = compiled(box["state"], gbatch)
      jax.block_until_ready((box["state"], metrics))
      box["metrics"] = metrics
    timing = _timed(step, warmup, steps)
  loss = float(box["metrics"]["train/loss"])
  assert math.isfinite(loss), "non-finite loss: the benchmark would time garbage"
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(box["state"].params))
  return dict(timing, framework="jax_transfer", version=f"jax {jax.__version__}",
              params=params, loss=loss, compile_s=compile_s,
              peak_rss_delta=_max_rss_bytes() - base_rss, rss_after_state=rss_state,
              rss_after_compile=rss_compiled, rss_after_steps=_rss_bytes() - base_rss,
              xla_temp=mem.temp_size_in_bytes, xla_args=mem.argument_size_in_bytes,
              xla_out=mem.output_size_in_bytes, xla_alias=mem.alias_size_in_bytes,
              flops=mfu.compiled_flops(compiled), threads=os.cpu_count())


# --------------------------------------------------------------------------- open_clip side.

def measure_torch(batch: int, steps: int, warmup: int) -> dict:
  sys.path.insert(0, str(REPO / "tests"))
  import open_clip_shim
  oc = open_clip_shim.load_open_clip()
  if oc is None:
    raise SystemExit("torch / open_clip_torch not installed: bash setup_env.sh dev")
  torch = oc.torch
  import numpy as np
  config = load_config(batch)  # the same sizes, read from the same config
  base_rss = _rss_bytes()

  m = config.model
  from jax_transfer.models.two_towers import image_geometry
  v = image_geometry(m)
  torch.manual_seed(0)
  model = oc.model.CLIP(
      m.embed_dim,
      dict(layers=v["depth"], width=v["width"], head_width=v["width"] // v["num_heads"],
           mlp_ratio=v["mlp_dim"] / v["width"], patch_size=v["patch_size"],
           image_size=IMAGE_SIZE),
      dict(context_length=m.context_length, vocab_size=m.vocab_size, width=m.text_width,
           heads=m.text_heads, layers=m.text_depth),
      init_logit_scale=m.logit_scale_init)
  model.train()
  # open_clip's main.py split: no weight decay on gains, biases, logit_scale (ndim < 2) and
  # embeddings; ours (wd_exclude_regex) also exempts the embeddings, so match it.
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    exempt = (p.ndim < 2 or "embedding" in name or "ln" in name or "bias" in name)
    (no_decay if exempt else decay).append(p)
  opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                           {"params": decay, "weight_decay": config.optimizer.weight_decay}],
                          lr=config.optimizer.lr, betas=(config.optimizer.b1,
                                                         config.optimizer.b2), eps=1e-8)
  loss_fn = oc.loss.ClipLoss()
  images, tokens = synthetic_batch(batch, IMAGE_SIZE, m.context_length, m.vocab_size)
  images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NCHW
  tokens = torch.from_numpy(tokens.astype(np.int64))
  out = {}

  def step():
    opt.zero_grad(set_to_none=True)
    zimg = model.encode_image(images, normalize=True)
    ztxt = model.encode_text(tokens, normalize=True)
    loss = loss_fn(zimg, ztxt, model.logit_scale.exp())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    out["loss"] = float(loss.detach())
  timing = _timed(step, warmup, steps)
  assert math.isfinite(out["loss"])
  return dict(timing, framework="open_clip", version=f"torch {torch.__version__}",
              params=sum(p.numel() for p in model.parameters()), loss=out["loss"],
              peak_rss_delta=_max_rss_bytes() - base_rss, threads=torch.get_num_threads())


# ------------------------------------------------------------------------------- Reporting.



def _mib(x):
  return "-" if x is None else f"{x / 2**20:.1f}"


def render(rows: dict, command: str, load: tuple, batch: int, note: str = "") -> str:
  j, t = rows["jax_transfer"], rows["open_clip"]
  lines = [
      SECTION, "",
      f"One training step (forward + CLIP loss + backward + grad clip + AdamW, float32, batch "
      f"{batch}) of the same CLIP: `shapes_clip.py`'s two towers (ViT-mu/4 at "
      f"{IMAGE_SIZE}x{IMAGE_SIZE}x3; text 64 wide x 2 layers x 4 heads, context 16, vocab "
      f"64; embed 64) with the open_clip parity options, vs open_clip's `CLIP` of the same "
      f"sizes (torch eager, `ClipLoss`, `torch.optim.AdamW`). Ours is built through the "
      f"platform (contrastive method, `train.create_state`, `make_default_train_step`, jit "
      f"with donated state, 1-device mesh, dense loss). Median of {j['steps']} steps after "
      f"{j['warmup']} warm-up steps; best of {j['rounds']} interleaved rounds (all rounds' "
      f"medians shown). Each framework runs alone in a fresh subprocess; peak RSS delta = "
      f"max RSS minus RSS after imports (compilation included for JAX).", "",
      "| framework | ms/step (median) | p10-p90 ms | rounds' medians ms | examples/s "
      "| peak RSS delta MiB | XLA temp / args / out MiB | params | threads |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in (j, t):
    xla = (f"{_mib(r['xla_temp'])} / {_mib(r['xla_args'])} / {_mib(r['xla_out'])}"
           if "xla_temp" in r else "-")
    lines.append(
        f"| {r['framework']} ({r['version']}) | {r['ms_per_step']:.1f} "
        f"| {r['p10_ms']:.1f}-{r['p90_ms']:.1f} "
        f"| {', '.join(f'{x:.1f}' for x in r['round_medians_ms'])} "
        f"| {batch / r['ms_per_step'] * 1e3:,.0f} | {r['peak_rss_delta'] / 2**20:.0f} "
        f"| {xla} | {r['params']:,} | {r['threads']} |")
  lines += [
      "",
      f"Ratios (jax_transfer / open_clip): ms/step **{j['ms_per_step'] / t['ms_per_step']:.2f}x"
      f"**, peak RSS delta **{j['peak_rss_delta'] / t['peak_rss_delta']:.2f}x**. "
      f"JAX compile: {j['compile_s']:.1f} s (not in the step time); XLA counts "
      f"{(j['flops'] or 0) / 1e9:.2f} GFLOP per step. Params differ by one scalar "
      f"(our `logit_bias`, unused by the CLIP loss). JAX RSS above its post-import baseline: "
      f"{j['rss_after_state'] / 2**20:.0f} MiB after `create_state` (XLA runtime, init "
      f"compile, state), {j['rss_after_compile'] / 2**20:.0f} MiB after compiling the step, "
      f"{j['rss_after_steps'] / 2**20:.0f} MiB after the timed steps.",
      "",
  ] + report.footer(
      command, report.machine_line(f"{j['version']}, {t['version']}, open_clip_torch 3.3.0",
                                   load), note)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=128)
  report.add_results_arg(p)
  p.add_argument("--notes", default="", help="file whose text is appended to the section")
  p.add_argument("--one", choices=("jax", "torch"), help=argparse.SUPPRESS)  # child process
  a = p.parse_args()
  if a.one:
    fn = measure_jax if a.one == "jax" else measure_torch
    print(json.dumps(fn(a.batch, a.steps, a.warmup)))
    return
  load, runs = os.getloadavg(), {"jax": [], "torch": []}
  for rnd in range(a.rounds):
    for side in ("jax", "torch"):
      runs[side].append(report.run_child(
          __file__, ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch",
                     str(a.batch), "--one", side], side))
      print(f"round {rnd} {side:5s}: {runs[side][-1]['ms_per_step']:.1f} ms/step, "
            f"peak RSS delta {runs[side][-1]['peak_rss_delta'] / 2**20:.0f} MiB", flush=True)
  rows = {}
  for side, rs in runs.items():
    best = dict(min(rs, key=lambda x: x["ms_per_step"]))
    best.update(round_medians_ms=[x["ms_per_step"] for x in rs], rounds=a.rounds,
                steps=a.steps, warmup=a.warmup)
    rows[best["framework"]] = best
  command = report.command_line("python benchmarks/open_clip_step.py", p, a,
                               ("steps", "warmup", "rounds", "batch"))
  note = pathlib.Path(a.notes).read_text().rstrip("\n") if a.notes else ""
  report.publish(a.results, SECTION, render(rows, command, load, a.batch, note))


if __name__ == "__main__":
  main()
