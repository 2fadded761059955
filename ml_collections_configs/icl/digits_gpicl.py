r"""GPICL on the embedded digits: meta-train a small causal Transformer (or LSTM) to learn
randomly projected, label-permuted digit tasks in context (Kirsch et al. 2022).

Arguments (comma-separated):
  (none)     the setting that leaves the ln C plateau and generalises on 2 CPU cores
             (experiments/icl/README.md): digits 0-4 (5-way), resized 8x8 -> 4x4 (16 features,
             square A [16, 16] ~ N(0, 1/16)), 128 sequences of 32 per step resampled on device
             from 256 base examples (icl.resample_sequences), Transformer width 64, depth 2,
             4 heads, lr 1e-3, unlimited tasks, 1500 steps.
  paper      the paper-shaped setting: 10-way digits at 8x8 (64 features), 32 sequences of 32
             per batch (1024 base examples), 1500 steps. On 2 CPU cores it stays on the ln 10
             plateau at this budget (the 64-feature plateau outlasts it; the README's first
             sweep: every pool size stayed at ln 5 for 500 steps at 64 features).
  gen        accepted for old commands: the default.
  lstm       the LSTM baseline (hidden 64, 2 layers: same parameter count) at the same budget.
  tasks=N    a finite pool of N tasks (the transition experiment sweeps N; 0 = unlimited).
  runlocal   shrink to a smoke run (20 steps, 4 sequences of 16).

Command (the transition experiment runs it for every N, see experiments/icl/README.md):
  python -m jax_transfer.main --config=ml_collections_configs/icl/digits_gpicl.py:tasks=65536 \
    --workdir=/tmp/icl_digits
Hardware: 2 CPU cores, jax 0.10.2. The default, measured end to end (`python -m
jax_transfer.main --config=ml_collections_configs/icl/digits_gpicl.py --workdir=W`, Intel
Xeon, 2026-12-02, 6.7 min wall on a machine shared with other jobs): at step 1500 the
meta-test accuracy averaged over k = 0..31 in-context examples is 0.551 on unseen tasks and
0.542 on seen ones (chance 0.2), rising with k (unseen: 0.23 at k=0, 0.45 at k=4, 0.59 at
k=31); wine / iris (never trained on) 0.77 / 0.72; the train loss leaves the ln 5 = 1.609
plateau at step ~600 and ends at 1.14. The transition experiment (experiments/RESULTS.md,
`python experiments/icl/transition.py --out=workdirs/icl_transition_v3 --steps=1500
--tasks=4,16,64,256,1024,2048,4096,16384,65536,0`, the default setting for every N):
memorisation up to ~2^8 tasks (unseen at chance), generalisation from ~2^11 tasks on
(unseen-task accuracy 0.60 mean over k at 2^12 - 2^16, 0.55 unlimited), 43-50 s per run.
"""
from jax_transfer.config import base_config
from jax_transfer.methods.icl import default_icl_config


def get_config(arg: str = ""):
  args = dict(a.split("=") if "=" in a else (a, "") for a in arg.split(",") if a)
  unknown = set(args) - {"lstm", "tasks", "runlocal", "gen", "paper"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: lstm, tasks=N, paper, "
                     "gen, runlocal")
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

  if "paper" not in args:  # the default: the setting that generalises here
    c.input.classes = (0, 1, 2, 3, 4)
    c.model.num_classes = 5
    c.input.image_size = 4  # 16 features: the plateau at 64 features outlasts this budget
    c.input.global_batch_size = 256  # cheap host batch; the learner sees 128 sequences:
    c.icl.resample_sequences = 128
    c.icl.unseen_datasets = ("wine", "iris", "breast_cancer", "shapes_captions:size")
    c.eval_every_steps = c.checkpoint_every_steps = c.total_steps

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.icl.seq_len = 16
    c.input.global_batch_size = 4 * c.icl.seq_len  # 64 examples: the runlocal limit.
    if c.icl.resample_sequences:
      c.icl.resample_sequences = 8
    c.model.max_len = c.icl.seq_len
    c.icl.eval_sequences = 16
    c.icl.baseline_sequences = 4
    c.schedule.warmup_steps = 5
  return c
