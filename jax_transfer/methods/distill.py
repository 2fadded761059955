"""KRR-ST: self-supervised dataset distillation (Lee et al., ICLR 2024).

Learns a synthetic set X_s [n, H, W, C] and target representations Y_s [n, D] such that a
model pretrained on (X_s, Y_s) by MSE transfers like one pretrained by SSL on the full source.

  params (the loop's optimiser, config.optimizer; AdamW in the paper):
    images  X_s, initialised from n random real training images (distill.init_seed)
    targets Y_s, initialised to g(X_s)
  extra (checkpointed and sharded with the state; never touched by the loop's optimiser):
    pool_params  K learner models stacked on a leading 'pool' axis
    pool_opt     their inner optimiser states (SGD + momentum + weight decay)
    pool_age     [K] inner steps since each model's last reset
    target       g's frozen params (loaded from distill.target_export, the SSL export)

One outer iteration (loss_fn, run by the loop's default step):
  1. pick pool model i uniformly (step rng);
  2. KRR on its features f (learner's pre-head features + a bias column; losses.krr_loss
     factorises the smaller side by QR, losses.krr_form):
       loss = MSE(K_ts (K_ss + λI)⁻¹ Y_s, g(x_real)),  λ = reg_ratio · tr(K_ss)
     (losses.krr_loss), differentiated w.r.t. X_s and Y_s only; x_real is the loop's
     batch-sharded real batch (labels ignored), f(x_real) and g(x_real) carry no gradient;
  3. model i takes distill.inner_steps SGD steps on MSE(h(f(X_s)), Y_s) (its head h maps
     features to D), using stop_gradient(X_s, Y_s);
  4. a model whose age reaches distill.pool_reset_steps is re-initialised. Initial ages are
     spread (k · reset / K), so resets are staggered and the pool covers models at every stage
     of training (paper: offsets spread over the reset period).
The updated pool is returned as the new `extra`, so the shared step applies the outer update
and the loop checkpoints / resumes the pool with everything else. With grad_accum_steps > 1
each microbatch is one pick + inner update.

The learner is config.model_name / config.model with num_classes replaced by D (g's width).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_transfer import checkpoint, config as config_lib, data, losses, models
from jax_transfer.data import pipeline
from jax_transfer.methods.base import Method
from jax_transfer.methods.ssl import PROJECTOR

P = nn.with_logical_partitioning


def read_images(input_cfg, split: str, indices) -> np.ndarray:
  """float32 [len(indices), H, W, C] in [-1, 1]: records `indices` of `split`, preprocessed
  exactly as the training pipeline does (its record -> example function)."""
  source = pipeline.get_source(input_cfg.dataset, split, input_cfg.data_dir)
  prep = pipeline.Preprocess(source, input_cfg)  # The loader's own preprocessing.
  return data.host_normalise(np.stack([prep(i, position=j)["image"]
                                       for j, i in enumerate(indices)]), input_cfg)


def load_target(export_dir: str):
  """g from an SSL export -> (apply(params, images) -> [B, D], params). Projector dropped."""
  model, params, _ = checkpoint.load_pretrained(export_dir)
  params = {k: v for k, v in params.items() if k != PROJECTOR}
  apply = lambda p, images: model.apply({"params": p}, images, train=False)[0]
  return apply, params


def build_learner(config, target_dim: int):
  kwargs = config_lib.model_kwargs(config.model)
  kwargs["num_classes"] = target_dim
  return models.get_model(config.model_name, **kwargs)


def inner_optimizer(dcfg) -> optax.GradientTransformation:
  """The pool's own optimiser (paper: SGD lr 0.1, momentum 0.9, weight decay 1e-3)."""
  return optax.chain(optax.add_decayed_weights(dcfg.inner_weight_decay),
                     optax.sgd(dcfg.inner_lr, momentum=dcfg.inner_momentum or None))


class Distill(Method):

  @staticmethod
  def validate_config(config):
    if "distill" not in config:
      raise config_lib.ConfigError("method=distill needs a config.distill section")
    d = config.distill
    for key in ("num_synthetic", "pool_size", "pool_reset_steps", "inner_steps"):
      if not d[key] > 0:
        raise config_lib.ConfigError(f"distill.{key}={d[key]!r} must be > 0")
    if not d.reg_ratio > 0:
      raise config_lib.ConfigError(f"distill.reg_ratio={d.reg_ratio!r} must be > 0")
    if not d.target_export:
      raise config_lib.ConfigError("distill.target_export must name the SSL target model's "
                                   "export (python -m jax_transfer.export)")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    d = config.distill
    self.dcfg = d
    self.image_shape = data.image_shape(config.input)
    self.g_apply, self.g_params = load_target(d.target_export)
    self.target_dim = jax.eval_shape(
        self.g_apply, self.g_params, jax.ShapeDtypeStruct((1, *self.image_shape),
                                                          jnp.float32)).shape[-1]
    self.learner = build_learner(config, self.target_dim)
    self.inner_tx = inner_optimizer(d)
    # X_s init: n distinct random real training images (KRR-ST: random real initialisation).
    num_train = data.dataset_info(config.input.dataset, config.input.data_dir)[
        "num_examples"][config.input.train_split.split("[")[0]]
    idx = np.sort(np.random.default_rng(d.init_seed).choice(num_train, d.num_synthetic,
                                                           replace=False))
    self.init_images = read_images(config.input, config.input.train_split, idx)
    self.init_targets = np.asarray(jax.jit(self.g_apply)(self.g_params, self.init_images))

  # ----------------------------------------------------------------------------- state
  def init_params(self, rng):
    del rng  # Deterministic: real images and g(X_s).
    return {"images": P(lambda: jnp.asarray(self.init_images),
                        ("synthetic", None, None, None))(),
            "targets": P(lambda: jnp.asarray(self.init_targets), ("synthetic", "features"))()}

  def _init_model(self, rng):
    dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.learner.init({"params": rng}, dummy, train=False)["params"]

  def _fresh(self, rng):
    params = nn.unbox(self._init_model(rng))
    return params, self.inner_tx.init(params)

  def init_extra(self, rng, params):
    del params
    k = self.dcfg.pool_size
    pool_params, pool_opt = jax.vmap(self._fresh)(jax.random.split(rng, k))
    # Re-box with a leading 'pool' axis, so each member's dims keep their logical names
    # (e.g. 'embed' -> fsdp) and the pool shards like K copies of the model.
    names = jax.tree.map(lambda b: b.names, jax.eval_shape(self._init_model, rng),
                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
    pool_params = jax.tree.map(lambda v, n: nn.Partitioned(v, ("pool",) + tuple(n)),
                               pool_params, names, is_leaf=lambda x: isinstance(x, tuple))
    ages = (jnp.arange(k) * self.dcfg.pool_reset_steps) // k  # Spread reset offsets.
    return {"pool_params": pool_params, "pool_opt": pool_opt, "pool_age": ages.astype(jnp.int32),
            "target": jax.tree.map(jnp.asarray, self.g_params)}

  # ----------------------------------------------------------------------------- math
  def features(self, model_params, images):
    """Learner's pre-head features f(x) [B, F]."""
    return self.learner.apply({"params": model_params}, images, train=False)[1]["pre_logits"]

  def inner_loss(self, model_params, images, targets):
    pred, _ = self.learner.apply({"params": model_params}, images, train=False)
    return jnp.mean((pred.astype(jnp.float32) - targets) ** 2)

  def inner_update(self, model_params, opt_state, images, targets):
    """distill.inner_steps steps of the pool optimiser on MSE(h(f(X_s)), Y_s); returns the
    last step's loss. Unrolled at trace time rather than a lax.scan: XLA:CPU runs these
    convolution gradients inside a while loop ~40x slower (n = 1000: 58 s vs 1.6 s; benchmarks/
    RESULTS.md, "KRR-ST outer step: where the time goes"), and inner_steps is small (1)."""
    for _ in range(self.dcfg.inner_steps):
      loss, g = jax.value_and_grad(self.inner_loss)(model_params, images, targets)
      updates, opt_state = self.inner_tx.update(g, opt_state, model_params)
      model_params = optax.apply_updates(model_params, updates)
    return model_params, opt_state, loss

  def loss_fn(self, params, extra, batch, rng):
    k_pick, k_reset = jax.random.split(rng)
    i = jax.random.randint(k_pick, (), 0, self.dcfg.pool_size)
    take = lambda tree: jax.tree.map(lambda x: x[i], tree)
    model_params, model_opt = take(extra["pool_params"]), take(extra["pool_opt"])
    # Real side: no gradient (depends on neither X_s nor Y_s).
    x_real = batch["image"]
    y_t = jax.lax.stop_gradient(self.g_apply(extra["target"], x_real))   # g(x_real) [B, D]
    f_t = jax.lax.stop_gradient(self.features(model_params, x_real))     # [B, F]
    f_s = self.features(jax.lax.stop_gradient(model_params), params["images"])  # [n, F]
    loss, metrics = losses.krr_loss(f_t, f_s, params["targets"], y_t, self.dcfg.reg_ratio)

    # Inner step of model i on the current (X_s, Y_s), then reset it if it is old enough.
    images, targets = jax.lax.stop_gradient((params["images"], params["targets"]))
    model_params, model_opt, inner = self.inner_update(model_params, model_opt, images,
                                                       targets)
    age = extra["pool_age"][i] + self.dcfg.inner_steps
    reset = age >= self.dcfg.pool_reset_steps
    fresh_params, fresh_opt = self._fresh(k_reset)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(reset, a, b), new, old)
    model_params, model_opt = pick(fresh_params, model_params), pick(fresh_opt, model_opt)
    put = lambda tree, new: jax.tree.map(lambda x, y: x.at[i].set(y), tree, new)
    extra = dict(extra, pool_params=put(extra["pool_params"], model_params),
                 pool_opt=put(extra["pool_opt"], model_opt),
                 pool_age=extra["pool_age"].at[i].set(jnp.where(reset, 0, age)))
    metrics = dict(metrics, inner_mse=inner, pool_index=i.astype(jnp.float32),
                   target_var=jnp.var(y_t, axis=0).mean())
    return loss, (metrics, extra)


def default_distill_config():
  """The config.distill section shared by methods ssl, distill and distilled_pretrain
  (paper values where the paper gives one: KRR-ST / REFERENCES.md)."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      target_export="",        # g: export of an ssl run (method=distill).
      num_synthetic=100,       # n = |X_s|.
      pool_size=10,            # K learner models.
      pool_reset_steps=1000,   # Inner steps before a pool model is re-initialised.
      inner_steps=1,           # Inner steps per outer iteration (on the picked model).
      inner_lr=0.1, inner_momentum=0.9, inner_weight_decay=1e-3,
      reg_ratio=1e-6,          # λ = reg_ratio · tr(K_ss).
      init_seed=0,             # Which real images initialise X_s.
      set_export="",           # (method=distilled_pretrain) the (images, targets) export.
      pretrain_batch_size=256,
      probe_shots=(),
      ssl=ml_collections.ConfigDict(dict(  # (method=ssl) Barlow Twins.
          projector_dims=(256, 256), offdiag_weight=5e-3, min_scale=0.5, flip=False,
          jitter=0.3, grayscale_prob=0.0, noise=0.05)),
  ))
