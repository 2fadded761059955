r"""Per-device memory of full training vs LoRA on the pod configs (ViT-B/16 on ImageNet, CLIP
B/16 on COCO), from XLA's buffer assignment of the compiled train step on 8 simulated CPU
devices.

  python benchmarks/peft_memory.py [--per-device-batch 2] [--results ...]
  python benchmarks/peft_memory.py --smoke --results FILE   # tiny towers: the test's run

Each row builds the step as train.py does (benchmarks/harness.py build_train_step: the method,
optim.make_optimizer, train.abstract_state, train.jit_train_step with the state / batch
shardings and the donated state) from ml_collections_configs/supervised/imagenet_vit_b16.py
and contrastive/coco_clip_b16.py with their `gpu8` argument, the pod configs' 8-device
variant (ViT: mesh data=8; CLIP: mesh fsdp=8, 16 accumulated microbatches), in three modes:
full training (the config as it is), `lora`, and `lora` with peft.frozen_dtype=bfloat16. The
state has abstract shapes (nothing is allocated); the step is lowered and compiled ahead of
time and `compiled.memory_analysis()` read. Only the batch is shrunk: --per-device-batch
examples per device per microbatch (the configs: 512 and 256), so that a B/16 step compiles
in about a minute on 2 cores; the state's bytes do not depend on it, the temp bytes do.

Columns, per device: trainable params (of all), the params' and the optimiser state's bytes
(from the abstract state's shardings), and XLA's argument bytes (state + batch), output
bytes (the new state + metrics; the state is donated, so it aliases the arguments) and temp
bytes (XLA:CPU's buffer assignment: activations, gradients, optimiser temporaries; a GPU's or
TPU's differ, the argument / output bytes do not).

Data: imagenet2012 is not prepared here; its TFDS metadata (1000 classes, RGB; the recipe's
inception crop makes 224 x 224) stands in, as in tests/test_pod_configs.py. CLIP reads the
embedded shapes_captions resized to 224, as benchmarks/gpu_clip.py does: it names the image
shape and trains the tokenizer (the model's vocabulary stays 49,408); nothing is read per step.
Writes/replaces the section "## PEFT memory: full training vs LoRA on the pod configs (8
simulated devices)" (--smoke: its own section).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import report  # benchmarks/report.py: machine line + RESULTS.md sections

SECTION = "## PEFT memory: full training vs LoRA on the pod configs (8 simulated devices)"
SMOKE_SECTION = "## PEFT memory (script smoke mode, tiny towers)"
N_DEVICES = 8
MODELS = {  # name -> (config file, its 8-device argument)
    "ViT-B/16": ("supervised/imagenet_vit_b16.py", "gpu8"),
    "CLIP B/16": ("contrastive/coco_clip_b16.py", "gpu8"),
}
MODES = {  # name -> (extra config argument, config.peft overrides)
    "full training": ("", {}),
    "LoRA r=8": ("lora", {}),
    "LoRA r=8, frozen bf16": ("lora", {"frozen_dtype": "bfloat16"}),
}
IMAGENET_INFO = {"num_classes": 1000, "class_names": [str(i) for i in range(1000)],
                 "image_shape": (None, None, 3), "num_examples": {}, "label_key": "label",
                 "attributes": {"label": [str(i) for i in range(1000)]}}


def stub_imagenet_metadata():
  """data.dataset_info answers imagenet2012 from TFDS's catalogue (not prepared here)."""
  from jax_transfer.data import pipeline
  real = pipeline._dataset_info  # pylint: disable=protected-access

  def info(name, data_dir, label_key):
    return dict(IMAGENET_INFO) if name == "imagenet2012" else real(name, data_dir, label_key)
  pipeline._dataset_info = info  # pylint: disable=protected-access


def config_for(model: str, mode: str, per_device_batch: int, smoke: bool):
  import harness  # benchmarks/harness.py
  rel, arg = MODELS[model]
  extra, peft_fields = MODES[mode]
  c = harness.load_config(rel, ",".join(a for a in (arg, extra) if a))
  c.peft.update(peft_fields)
  c.input.global_batch_size = per_device_batch * N_DEVICES * c.grad_accum_steps
  if c.method == "contrastive":
    c.input.update(dataset="shapes_captions", caption_key="caption", num_workers=0)
    c.eval.split = "test"
  if smoke:  # The same code paths in seconds.
    if c.method == "contrastive":
      c.model.update(image_variant="nano/16", text_width=32, text_depth=1, text_heads=2,
                     vocab_size=64, context_length=16, embed_dim=32)
    else:
      c.model.variant = "nano/16"
  return c


def abstract_batch(ts):
  """The step's global batch as ShapeDtypeStructs on the batch sharding (nothing allocated):
  normalised f32 images, int32 labels or tokens."""
  import jax
  import jax.numpy as jnp
  from jax_transfer import data, parallel
  c = ts.config
  n, sh = c.input.global_batch_size, parallel.batch_sharding(ts.mesh)
  batch = {"image": jax.ShapeDtypeStruct((n, *data.image_shape(c.input)), jnp.float32,
                                         sharding=sh)}
  if c.method == "contrastive":
    batch["tokens"] = jax.ShapeDtypeStruct((n, c.model.context_length), jnp.int32, sharding=sh)
  else:
    batch["label"] = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh)
  return batch


def per_device_bytes(tree) -> int:
  import jax
  import numpy as np
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def measure(model: str, mode: str, per_device_batch: int, smoke: bool) -> dict:
  import flax
  import jax
  import numpy as np
  import harness  # benchmarks/harness.py
  from jax_transfer import optim, peft
  c = config_for(model, mode, per_device_batch, smoke)
  ts = harness.build_train_step(c, jax.devices()[:N_DEVICES], abstract=True)
  t0 = time.perf_counter()
  with ts.context():
    compiled = ts.step.lower(ts.state, abstract_batch(ts)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  flat = flax.traverse_util.flatten_dict(ts.state.params, sep="/")
  trainable = optim.trainable_paths(ts.state.params, peft.optimizer_config(c))
  size = lambda x: int(np.prod(x.shape))
  return dict(
      model=model, mode=mode, mesh=dict(ts.mesh.shape), accum=c.grad_accum_steps,
      n_train=sum(size(v) for k, v in flat.items() if trainable is None or k in trainable),
      n_all=sum(size(v) for v in flat.values()),
      param_bytes=per_device_bytes(ts.state.params),
      opt_bytes=per_device_bytes(ts.state.opt_state),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      compile_s=compile_s)


def _mib(n: int) -> str:
  return f"{n / 2 ** 20:,.1f}"


def table(rows: list[dict]) -> list[str]:
  out = ["| model | mode | mesh, microbatches | trainable params | params MiB | optimiser "
         "state MiB | argument MiB | output MiB | temp MiB | vs full: argument, temp |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  full = {r["model"]: r for r in rows if r["mode"] == "full training"}
  for r in rows:
    f = full[r["model"]]
    mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    out.append(
        f"| {r['model']} | {r['mode']} | {mesh}, {r['accum']} | {r['n_train']:,} of "
        f"{r['n_all']:,} | {_mib(r['param_bytes'])} | {_mib(r['opt_bytes'])} | "
        f"{_mib(r['argument_bytes'])} | {_mib(r['output_bytes'])} | {_mib(r['temp_bytes'])} "
        f"| {r['argument_bytes'] / f['argument_bytes']:.2f}x, "
        f"{r['temp_bytes'] / f['temp_bytes']:.2f}x |")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--per-device-batch", type=int, default=2,
                      help="examples per device per microbatch")
  parser.add_argument("--smoke", action="store_true", help="tiny towers (tests)")
  report.add_results_arg(parser)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import flax
  import jax
  load = os.getloadavg()
  stub_imagenet_metadata()
  rows = []
  for model in MODELS:
    for mode in MODES:
      rows.append(measure(model, mode, args.per_device_batch, args.smoke))
      print(f"{model} / {mode}: compiled in {rows[-1]['compile_s']:.0f} s", flush=True)
  command = report.command_line("python benchmarks/peft_memory.py", parser, args,
                                ["per_device_batch"]) + (" --smoke" if args.smoke else "")
  machine = report.machine_line(f"jax {jax.__version__}, flax {flax.__version__}", load)
  title = SMOKE_SECTION if args.smoke else SECTION
  note = ("What to read: the state. LoRA keeps the frozen base's params but drops their AdamW "
          "mu and nu (frozen leaves have no optimiser state), and peft.frozen_dtype=bfloat16 "
          "halves the base's params. The argument bytes also hold the batch (CLIP: all 16 "
          "microbatches). The temp bytes say little about an accelerator's: XLA:CPU runs the "
          "bf16 matmuls in f32 (every matmul of the compiled step has an f32 result), and "
          f"the batch here is {args.per_device_batch} per device per microbatch.")
  section = "\n".join(
      [title, "",
       "Per device, from `compiled.memory_analysis()` of the train step train.py builds for "
       "`imagenet_vit_b16.py:gpu8` and `coco_clip_b16.py:gpu8` (the pod configs' 8-device "
       "variants: bf16 compute, f32 params and AdamW state, remat), with `lora` added for the "
       "LoRA rows and `--config.peft.frozen_dtype=bfloat16` for the last ones, compiled on "
       f"{N_DEVICES} simulated CPU devices from abstract shapes (nothing allocated), "
       f"{args.per_device_batch} examples per device per microbatch (the configs: 512 and "
       "256). Argument bytes are the state plus the batch; the state is donated, so the "
       "output aliases it. Temp bytes are XLA:CPU's buffer assignment (activations, "
       "gradients, optimiser temporaries) at this small batch: on a GPU or TPU, and at the "
       "configs' batch, they differ; the state's bytes do not. Compile times: "
       + ", ".join(f"{r['model']} {r['mode']} {r['compile_s']:.0f} s" for r in rows) + ".",
       ""] + table(rows) + [""] + report.footer(command, machine, note))
  report.publish(args.results, title, section)
  print(json.dumps(rows))  # last line: the raw numbers


if __name__ == "__main__":
  main()
