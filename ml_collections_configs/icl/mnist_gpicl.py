r"""GPICL at paper scale: a causal Transformer (width 256, depth 4, 8 heads) meta-trained on
randomly projected, label-permuted MNIST tasks (Kirsch et al. 2022), data parallel over a mesh.

Settings follow a public reimplementation's (REFERENCES.md): d = 256, 4 layers, 8 heads,
batch 128 sequences, context 100, Adam lr 2e-4, gradient clip 2; inputs 28x28 -> 784 features,
A [784, 784] ~ N(0, 1/784). Meta-test: seen / unseen MNIST tasks, wine, iris, breast cancer and
the shapes attribute, with logistic regression on the same examples.

Arguments (comma-separated):
  (none)        unlimited tasks (a fresh task per sequence), 50k steps.
  tasks=N       a finite pool of N tasks (the transition experiment at scale: N = 2^2 .. 2^24).
  fixed=F       share F of every batch from one fixed task (the paper's plateau intervention).
  dataset=NAME  another TFDS image classification dataset with 10 classes (fashion_mnist).
  runlocal      shrink to this CPU: embedded digits, width 64, depth 2, 4 sequences of 16,
                20 steps, mesh data=-1.

Command (one host with 8 accelerators; TFDS mnist prepared as array_record in $TFDS_DATA_DIR):
  python -m jax_transfer.main --config=ml_collections_configs/icl/mnist_gpicl.py \
    --config.input.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR
Mesh: data=-1 (pure data parallel; 128 sequences = 16 per device on 8 devices, any device
count dividing 128 keeps whole sequences on one device). The state (~3.3M params, Adam) is
tiny, so no FSDP; the per-step projections [128, 784, 784] f32 (315 MB) are sharded by batch.

Hardware, wall time, result -- NOT MEASURED HERE (no accelerator was available). The paper
reports 73.7% MNIST accuracy after 99 in-context examples (SGD on the same examples: 70.3%).
Measured, runlocal only (2 shared CPU cores, jax 0.10.2 CPU):
  python -m jax_transfer.main --config=ml_collections_configs/icl/mnist_gpicl.py:runlocal \
    --workdir=/tmp/icl_mnist_rl
  26.9 s wall (20 steps + 2 meta-tests incl. the logistic-regression baseline): a smoke test of
  the path, accuracies at chance. The measured digits experiments: experiments/icl/README.md.
"""
from jax_transfer.config import base_config
from jax_transfer.methods.icl import default_icl_config


def get_config(arg: str = ""):
  args = dict(a.split("=") if "=" in a else (a, "") for a in arg.split(",") if a)
  unknown = set(args) - {"tasks", "fixed", "dataset", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: tasks=N, fixed=F, "
                     "dataset=NAME, runlocal")
  c = base_config()
  c.method = "icl"
  c.seed = 0
  c.total_steps = 50_000
  c.log_every_steps = 100
  c.eval_every_steps = 2_500
  c.checkpoint_every_steps = 2_500

  c.icl = default_icl_config()
  c.icl.seq_len = 100
  c.icl.num_tasks = int(args.get("tasks") or 0)
  c.icl.fixed_task_fraction = float(args.get("fixed") or 0.0)
  c.icl.eval_sequences = 256
  c.icl.baseline_sequences = 64

  c.input.dataset = args.get("dataset") or "mnist"
  c.input.global_batch_size = 128 * c.icl.seq_len  # 128 sequences of 100 examples.
  c.input.num_workers = 8
  c.eval.batch_size = 512
  c.mesh.data = -1

  c.model_name = "seq_transformer"
  c.model = dict(num_classes=10, width=256, depth=4, num_heads=8, mlp_dim=1024,
                 max_len=c.icl.seq_len, dtype="float32")

  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-4
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 2.0
  c.schedule.warmup_steps = 1_000

  if "runlocal" in args:
    c.input.dataset = "digits"
    c.input.num_workers = 0
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.icl.seq_len = 16
    c.input.global_batch_size = 4 * c.icl.seq_len
    c.icl.eval_sequences = 16
    c.icl.baseline_sequences = 4
    c.eval.batch_size = 64
    c.model = dict(num_classes=10, width=64, depth=2, num_heads=4, mlp_dim=128,
                   max_len=c.icl.seq_len, dtype="float32")
    c.optimizer.lr = 1e-3
    c.schedule.warmup_steps = 5
  return c
