r"""Transfer modes side by side: full fine-tuning, a linear probe, LoRA, adapters and BitFit of
the same ViT, through the platform's own train step (compiled FLOPs, step time, trainable
parameters).

  nice -n 5 python benchmarks/peft_step.py [--variant s/2] [--batch 64] [--steps 20]
                                           [--warmup 3] [--rounds 3] [--results ...]

The step is built as train.py builds it (benchmarks/harness.py build_train_step) from
`supervised/digits_vit.py` (digits, 8x8x1 images, 5 classes) with the ViT widened to
--variant; each mode changes only `optimizer.trainable_regex` (the probe) or `config.peft`.
GFLOP is `compiled.cost_analysis()['flops']` of the whole step (forward, backward, optimiser);
ms/step the median of --steps steps after --warmup, each blocked on its outputs, the modes
interleaved over --rounds rounds, each keeping its fastest. A frozen parameter has no
gradient formed (train.make_default_train_step), so a probe runs the backbone forward only.
"LoRA r=8, frozen bf16" stores the frozen weights in bf16 (peft.frozen_dtype; compute f32).
Writes/replaces the section "## Transfer modes: full, probe, LoRA, adapters, prefix, VPT,
BitFit (CPU)".
"""
from __future__ import annotations

import argparse

import harness  # benchmarks/harness.py
import report  # benchmarks/report.py

SECTION = "## Transfer modes: full, probe, LoRA, adapters, prefix, VPT, BitFit (CPU)"
MODES = {  # name -> (optimizer.trainable_regex, config.peft overrides)
    "full fine-tuning": (".*", {}),
    "linear probe": ("^head/", {}),
    "LoRA r=8 (attention)": (".*", dict(method="lora", rank=8, alpha=16.0)),
    "LoRA r=8, frozen bf16": (".*", dict(method="lora", rank=8, alpha=16.0,
                                         frozen_dtype="bfloat16")),
    "adapters r=8 (Houlsby)": (".*", dict(method="adapter", rank=8)),
    "parallel adapter r=8": (".*", dict(method="parallel_adapter", rank=8)),
    "prefix tuning, length 8": (".*", dict(method="prefix", length=8)),
    "VPT-deep, 8 prompts": (".*", dict(method="vpt", length=8)),
    "BitFit": (".*", dict(method="bitfit")),
}


def build(mode: str, variant: str, batch: int):
  import jax
  import numpy as np
  from flax import traverse_util
  from jax_transfer import optim, parallel, peft
  from ml_collections_configs.supervised import digits_vit
  regex, peft_fields = MODES[mode]
  c = digits_vit.get_config("")
  c.model.variant = variant
  c.input.global_batch_size = batch
  c.optimizer.trainable_regex = regex
  c.peft.update(peft_fields)
  ts = harness.build_train_step(c, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 256, (batch, 8, 8, 1), dtype=np.uint8),
           "label": rng.integers(0, 5, batch).astype(np.int32)}
  with ts.context():
    batch_arr = ts.global_batch(local)
    compiled = ts.step.lower(ts.state, batch_arr).compile()
  flat = traverse_util.flatten_dict(jax.device_get(ts.state.params), sep="/")
  trainable = optim.trainable_paths(ts.state.params, peft.optimizer_config(c))
  n_train = sum(int(np.prod(v.shape)) for k, v in flat.items()
                if trainable is None or k in trainable)
  n_all = sum(int(np.prod(v.shape)) for v in flat.values())
  return ts, compiled, batch_arr, compiled.cost_analysis()["flops"], n_train, n_all


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="s/2")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  report.add_results_arg(parser)
  args = parser.parse_args()
  import os
  import jax
  import flax
  load = os.getloadavg()
  built = {m: build(m, args.variant, args.batch) for m in MODES}
  best = {m: [] for m in MODES}
  for _ in range(args.rounds):
    for m, (ts, compiled, batch, *_rest) in built.items():
      state = ts.fresh_state()
      with ts.context():
        timing, _, _ = harness.time_step(compiled, state, batch, args.warmup, args.steps)
      best[m].append(timing["median_s"] * 1e3)
  full = built["full fine-tuning"]
  rows = ["| mode | trainable params | GFLOP / step | vs full | ms / step (best) | rounds | "
          "vs full |", "|---|---|---|---|---|---|---|"]
  for m, (_, _, _, flops, n_train, n_all) in built.items():
    ms = min(best[m])
    rows.append(f"| {m} | {n_train:,} of {n_all:,} | {flops / 1e9:.2f} | "
                f"{flops / full[3]:.2f}x | {ms:.1f} | "
                f"{', '.join(f'{t:.1f}' for t in best[m])} | "
                f"{ms / min(best['full fine-tuning']):.2f}x |")
  command = report.command_line("python benchmarks/peft_step.py", parser, args,
                                ["variant", "batch", "steps", "warmup", "rounds"])
  machine = report.machine_line(f"jax {jax.__version__}, flax {flax.__version__}", load)
  section = "\n".join(
      [SECTION, "",
       f"The supervised train step of `supervised/digits_vit.py` with ViT-{args.variant} "
       f"(8x8x1 digits, 5 classes, batch {args.batch}, f32, AdamW with grad clipping, 1-device "
       "mesh, state donated) in each transfer mode: `optimizer.trainable_regex='^head/'` for "
       "the probe, `config.peft` for the others (jax_transfer/peft.py). Frozen parameters get "
       "no gradient, so a frozen backbone costs its forward pass only.", ""] + rows + [""] +
      report.footer(command, machine))
  report.publish(args.results, SECTION, section)


if __name__ == "__main__":
  main()
