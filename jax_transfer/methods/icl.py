"""GPICL: meta-training a sequence learner to learn classification tasks in context
(Kirsch, Harrison, Sohl-Dickstein, Metz 2022) through the shared loop.

Data flow. The grain pipeline yields base examples (global batch = num_sequences * seq_len,
shuffled, so consecutive examples are i.i.d.); host_batch flattens and z-normalises them. On
device, loss_fn cuts the batch into [B, L] sequences and draws each sequence's task (A, rho)
from the step RNG (data/icl_tasks.py), so the task stream is deterministic, resumable and
never stored. The loss is the cross-entropy at every position, averaged: position j is
"learn from j examples", so one sequence trains all context sizes at once.

config.icl:
  seq_len              L, examples per sequence
  num_tasks            size of the finite task pool (2^k); 0 = a fresh task per sequence
  task_seed            root of the pool: the same seed gives the same tasks
  fixed_task_fraction  share of every batch from one fixed task (plateau intervention)
  model_dim            D of the projected inputs; 0 = the base dataset's feature count (the
                       paper's square A)
  resample_sequences   0: the (micro)batch of base examples is cut into consecutive sequences
                       of seq_len. R > 0: R sequences per (micro)batch, each seq_len examples
                       drawn at random (distinct within a sequence) from that batch on device
                       -- many sequences per step from a cheap host batch (the larger batches
                       of sequences that shorten the loss plateau; on 2 CPU cores the grain
                       pipeline, not the learner, bounds the examples per step)
  stats_examples       train examples used for the z-normalisation constants
  eval_sequences, eval_seed, unseen_datasets, baseline_sequences: meta-testing
                       (evaluators/icl_curves.py)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_transfer import config as config_lib, data, models, parallel, peft
from jax_transfer.data import icl_tasks
from jax_transfer.evaluators import icl_curves
from jax_transfer.methods.base import Method

LEARNERS = ("seq_transformer", "seq_lstm")


def default_icl_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seq_len=32, num_tasks=0, task_seed=0, fixed_task_fraction=0.0, model_dim=0,
      resample_sequences=0,
      stats_examples=10_000, eval_sequences=64, eval_seed=12345,
      unseen_datasets=("wine", "iris", "breast_cancer", "shapes_captions:shape"),
      baseline_sequences=16))


def feature_count(input_cfg) -> int:
  h, w, c = data.image_shape(input_cfg)
  return h * w * c


class ICL(Method):

  @staticmethod
  def validate_config(config):
    err = config_lib.ConfigError
    if "icl" not in config:
      raise err("config.icl is missing (see methods/icl.py default_icl_config)")
    c, ref = config.icl, default_icl_config()
    unknown = sorted(set(c.keys()) - set(ref.keys()))
    if unknown:
      raise err(f"unknown config key 'icl.{unknown[0]}'; allowed: {sorted(ref.keys())}")
    if config.model_name not in LEARNERS:
      raise err(f"model_name={config.model_name!r}: method icl needs one of {LEARNERS}")
    if c.seq_len < 2:
      raise err(f"icl.seq_len={c.seq_len} must be >= 2")
    if (not c.resample_sequences
        and config.input.global_batch_size % (c.seq_len * config.grad_accum_steps)):
      raise err(f"input.global_batch_size={config.input.global_batch_size} must be a multiple "
                f"of icl.seq_len={c.seq_len} times grad_accum_steps (whole sequences)")
    if c.resample_sequences < 0:
      raise err(f"icl.resample_sequences={c.resample_sequences} must be >= 0 (0 = off)")
    micro = config.input.global_batch_size // config.grad_accum_steps
    if c.resample_sequences and micro < c.seq_len:
      raise err(f"icl.resample_sequences needs >= icl.seq_len={c.seq_len} base examples per "
                f"(micro)batch, got {micro}")
    if c.num_tasks < 0:
      raise err(f"icl.num_tasks={c.num_tasks} must be >= 0 (0 = unlimited)")
    if not 0 <= c.fixed_task_fraction < 1:
      raise err(f"icl.fixed_task_fraction={c.fixed_task_fraction} must be in [0, 1)")
    if config.model_name == "seq_transformer" and config.model.get("max_len", 128) < c.seq_len:
      raise err(f"model.max_len={config.model.max_len} < icl.seq_len={c.seq_len}")
    c_in = config.input
    n = (len(c_in.classes) if c_in.classes else
         data.dataset_info(c_in.dataset, c_in.data_dir, label_key=c_in.label_key)["num_classes"])
    if config.model.num_classes != n:
      raise err(f"model.num_classes={config.model.num_classes} but {config.input.dataset} has "
                f"{n} classes")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.icl = config.icl
    self.model = peft.wrap(models.get_model(config.model_name,
                                            **config_lib.model_kwargs(config.model)), config)
    self.num_classes = config.model.num_classes
    self.feature_count = feature_count(config.input)
    self.model_dim = self.icl.model_dim or self.feature_count
    dp = parallel.data_parallel_size(mesh) if mesh is not None else 1
    if self.icl.resample_sequences % dp:
      raise config_lib.ConfigError(
          f"icl.resample_sequences={self.icl.resample_sequences} must be a multiple of the "
          f"data-parallel size {dp}")
    # z-normalisation constants from the training split, fixed for the run (and for meta-test).
    x, _ = icl_curves.load_split(config.input, config.input.train_split,
                                 limit=self.icl.stats_examples)
    self.mean, self.std = icl_tasks.feature_stats(x)

  def host_batch(self, batch):
    # The host builds sequences from pixels, so they are scaled here, as load_split's are.
    images = data.host_normalise(batch["image"], self.config.input)
    x = icl_tasks.znormalise(images, self.mean, self.std)
    return {"x": x, "y": np.asarray(batch["label"], np.int32)}

  def init_params(self, rng):
    tokens = jnp.zeros((1, self.icl.seq_len, self.model_dim + self.num_classes), jnp.float32)
    return self.model.init({"params": rng}, tokens)["params"]

  def sequences(self, batch, rng):
    """Batch of base examples [N, ...] -> tokens [B, L, D+C], targets [B, L]: B = N / L
    consecutive sequences, or B = icl.resample_sequences drawn from the N examples."""
    length = self.icl.seq_len
    if self.icl.resample_sequences:
      rng, idx_rng = jax.random.split(rng)
      n = batch["y"].shape[0]
      idx = jax.vmap(lambda k: jax.random.choice(k, n, (length,), replace=False))(
          jax.random.split(idx_rng, self.icl.resample_sequences))  # [R, L]
      x, y = batch["x"][idx], batch["y"][idx]
    else:
      x = batch["x"].reshape(-1, length, batch["x"].shape[-1])
      y = batch["y"].reshape(-1, length)
    x = nn.with_logical_constraint(x, ("batch", "length", None))
    keys = icl_tasks.sequence_task_keys(rng, x.shape[0], jax.random.key(self.icl.task_seed),
                                        self.icl.num_tasks, self.icl.fixed_task_fraction)
    tokens, targets, _ = icl_tasks.make_sequences(x, y, keys, self.model_dim, self.num_classes)
    return tokens, targets

  def loss_fn(self, params, extra, batch, rng):
    task_rng, dropout_rng = jax.random.split(rng)
    tokens, targets = self.sequences(batch, task_rng)
    logits, _ = self.model.apply({"params": params}, tokens, train=True,
                                 rngs={"dropout": dropout_rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)  # [B, L]
    metrics = {"accuracy": correct.mean(), "accuracy_first": correct[:, 0].mean(),
               "accuracy_last": correct[:, -1].mean(), "loss_last": ce[:, -1].mean()}
    return ce.mean(), (metrics, extra)

  def apply(self, params, tokens):
    return self.model.apply({"params": params}, tokens)[0]

  def meta_test_suites(self, unseen_datasets=None) -> dict:
    """Suites for evaluators/icl_curves.py: seen / unseen tasks on the base test split, and
    fresh tasks on each unseen dataset."""
    c = self.config
    x, y = icl_curves.load_split(c.input, c.eval.split)
    x = icl_tasks.znormalise(x, self.mean, self.std)
    pool_root = jax.random.key(self.icl.task_seed)
    # Fresh tasks come from a root no training key can equal (distinct seed domain).
    fresh_root = jax.random.fold_in(jax.random.key(self.icl.eval_seed), 1)

    def seen(b):
      if self.icl.num_tasks == 0:  # Unlimited: training tasks are fresh draws too.
        return jax.random.split(jax.random.fold_in(fresh_root, 0), b)
      ids = jax.random.randint(jax.random.key(self.icl.eval_seed), (b,), 0, self.icl.num_tasks)
      return jax.vmap(icl_tasks.pool_task_key, (None, 0))(pool_root, ids)

    def fresh(i):
      return lambda b: jax.random.split(jax.random.fold_in(fresh_root, i), b)

    suites = {"seen": icl_curves.Suite(x, y, self.num_classes, seen),
              "unseen": icl_curves.Suite(x, y, self.num_classes, fresh(1))}
    names = self.icl.unseen_datasets if unseen_datasets is None else unseen_datasets
    for i, spec in enumerate(names):
      ux, uy, n = icl_curves.unseen_dataset(spec, c.input)
      if n > self.num_classes:
        raise ValueError(f"unseen dataset {spec} has {n} classes > model's {self.num_classes}")
      suites[spec.replace(":", "_")] = icl_curves.Suite(ux, uy, n, fresh(2 + i))
    return suites

  def evaluators(self):
    c = self.config
    return [icl_curves.ICLCurves(
        self.apply, self.meta_test_suites(), seq_len=self.icl.seq_len,
        model_dim=self.model_dim, num_classes=self.num_classes,
        num_sequences=self.icl.eval_sequences, every_steps=c.eval_every_steps,
        eval_seed=self.icl.eval_seed, workdir=self.workdir,
        baseline_sequences=self.icl.baseline_sequences)]
