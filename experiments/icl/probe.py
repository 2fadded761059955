r"""Quick standalone GPICL probe (no shared loop): meta-train on unlimited tasks (a fresh
(A, rho) per sequence) with the same task sampler and learner as the method, and print the
training loss and unseen-task accuracy (test-split digits, fresh tasks) as training goes.
Used to find a setting that leaves the ln C plateau on 2 CPU cores (experiments/icl/README.md).

  python experiments/icl/probe.py --classes=0,1 --image_size=4 --seq_len=16 --sequences=128 \
      --steps=1000 --lr=1e-3
"""
import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_transfer.data import icl_tasks
from jax_transfer.evaluators import icl_curves
from jax_transfer.models import seq_learner


def load(classes, image_size, split):
  cfg = ml_collections.ConfigDict(dict(
      dataset="digits", data_dir=None, classes=tuple(classes), image_size=image_size or None,
      label_key=None, caption_key=None))
  return icl_curves.load_split(cfg, split)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--classes", default="0,1")
  p.add_argument("--image_size", type=int, default=0)
  p.add_argument("--model_dim", type=int, default=0)
  p.add_argument("--seq_len", type=int, default=16)
  p.add_argument("--sequences", type=int, default=128)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--b2", type=float, default=0.999)
  p.add_argument("--eps", type=float, default=1e-8)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--num_tasks", type=int, default=0)
  p.add_argument("--fixed", type=float, default=0.0)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  classes = [int(c) for c in a.classes.split(",")]
  c = len(classes)
  xtr, ytr = load(classes, a.image_size, "train")
  xte, yte = load(classes, a.image_size, "test")
  mean, std = icl_tasks.feature_stats(xtr)
  xtr, xte = icl_tasks.znormalise(xtr, mean, std), icl_tasks.znormalise(xte, mean, std)
  d_in = xtr.shape[1]
  d = a.model_dim or d_in
  print(f"train {xtr.shape} test {xte.shape} classes {c} model_dim {d}", flush=True)
  model = seq_learner.make_seq_transformer(num_classes=c, width=a.width, depth=a.depth,
                                           num_heads=a.heads, max_len=a.seq_len)
  params = model.init(jax.random.key(a.seed),
                      jnp.zeros((1, a.seq_len, d + c)))["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, a.steps)
  tx = optax.chain(optax.clip_by_global_norm(2.0),
                   optax.adam(sched, b2=a.b2, eps=a.eps))
  opt = tx.init(params)
  xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(ytr)
  pool_root = jax.random.key(1000 + a.seed)

  def batch(rng):
    k_idx, k_task = jax.random.split(rng)
    idx = jax.random.randint(k_idx, (a.sequences, a.seq_len), 0, len(xtr_j))
    keys = icl_tasks.sequence_task_keys(k_task, a.sequences, pool_root, a.num_tasks, a.fixed)
    tokens, targets, _ = icl_tasks.make_sequences(xtr_j[idx], ytr_j[idx], keys, d, c)
    return tokens, targets

  def loss_fn(params, tokens, targets):
    logits, _ = model.apply({"params": params}, tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce.mean(), (ce.mean(0), (logits.argmax(-1) == targets).mean())

  @jax.jit
  def step(params, opt, rng):
    tokens, targets = batch(rng)
    (loss, (ce_pos, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, targets)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss, ce_pos, acc

  # Unseen tasks on the test split (a different key root), 256 sequences.
  idx = np.asarray(icl_tasks.sample_indices(jax.random.key(99), len(xte), 256, a.seq_len))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(12345), 1), 256)
  te_tokens, te_targets, _ = icl_tasks.make_sequences(jnp.asarray(xte[idx]),
                                                      jnp.asarray(yte[idx]), keys, d, c)

  @jax.jit
  def evaluate(params):
    logits, _ = model.apply({"params": params}, te_tokens)
    return (logits.argmax(-1) == te_targets).mean(0)

  t = time.time()
  rng = jax.random.key(a.seed + 1)
  for s in range(1, a.steps + 1):
    params, opt, loss, ce_pos, acc = step(params, opt, jax.random.fold_in(rng, s))
    if s % a.eval_every == 0 or s == a.steps:
      curve = np.asarray(evaluate(params))
      ce_pos = np.asarray(ce_pos)
      print(f"step {s} {time.time() - t:.0f}s loss {float(loss):.4f} (ln C {np.log(c):.4f}) "
            f"ce[0] {ce_pos[0]:.3f} ce[-1] {ce_pos[-1]:.3f} train acc {float(acc):.3f} | "
            f"unseen k=0 {curve[0]:.3f} k=1 {curve[1]:.3f} k={a.seq_len // 2} "
            f"{curve[a.seq_len // 2]:.3f} k={a.seq_len - 1} {curve[-1]:.3f} "
            f"mean {curve.mean():.3f}", flush=True)


if __name__ == "__main__":
  main()
