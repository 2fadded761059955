r"""GPICL on the embedded digits: meta-train a small causal Transformer (or LSTM) to learn
randomly projected, label-permuted digit tasks in context (Kirsch et al. 2022).

Arguments (comma-separated):
  (none)     Transformer width 64, depth 2, 4 heads; sequences of 32 digits, 32 sequences
             per batch (1024 base examples), unlimited tasks, 1500 steps.
  lstm       the LSTM baseline (hidden 64, 2 layers: same parameter count) at the same budget.
  tasks=N    a finite pool of N tasks (the transition experiment sweeps N; 0 = unlimited).
  runlocal   shrink to a smoke run (20 steps, 4 sequences of 16).

Command (the transition experiment runs it for every N, see experiments/icl/README.md):
  python -m jax_transfer.main --config=ml_collections_configs/icl/digits_gpicl.py:tasks=65536 \
    --workdir=/tmp/icl_digits
Hardware: 2 shared CPU cores. Measured: experiments/icl/README.md runs this config through
experiments/icl/transition.py shrunk to digits 0-4 and 500 steps (~40-110 s per run on a quiet
machine): memorisation up to ~2^8 tasks, chance on unseen tasks at every pool size at that
budget. The default here (10-way, 1500 steps, ~5 min) has not been run to the end.
"""
from jax_transfer.config import base_config
from jax_transfer.methods.icl import default_icl_config


def get_config(arg: str = ""):
  args = dict(a.split("=") if "=" in a else (a, "") for a in arg.split(",") if a)
  unknown = set(args) - {"lstm", "tasks", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: lstm, tasks=N, runlocal")
  c = base_config()
  c.method = "icl"
  c.seed = 0
  c.total_steps = 1500
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 1

  c.icl = default_icl_config()
  c.icl.seq_len = 32
  c.icl.num_tasks = int(args.get("tasks") or 0)
  c.icl.eval_sequences = 64

  c.input.dataset = "digits"
  c.input.global_batch_size = 32 * c.icl.seq_len  # 32 sequences of 32 examples.
  c.eval.batch_size = 256

  if "lstm" in args:
    c.model_name = "seq_lstm"
    # Hidden 64: ~71k params, as the Transformer's ~74k, but a state of 256 floats vs 8192.
    c.model = dict(num_classes=10, width=64, depth=2, dtype="float32")
  else:
    c.model_name = "seq_transformer"
    c.model = dict(num_classes=10, width=64, depth=2, num_heads=4, mlp_dim=128,
                   max_len=c.icl.seq_len, dtype="float32")

  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 2.0  # as the reimplementation in REFERENCES.md
  c.schedule.warmup_steps = 100

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.icl.seq_len = 16
    c.input.global_batch_size = 4 * c.icl.seq_len  # 64 examples: the runlocal limit.
    c.model.max_len = c.icl.seq_len
    c.icl.eval_sequences = 16
    c.icl.baseline_sequences = 4
    c.schedule.warmup_steps = 5
  return c
