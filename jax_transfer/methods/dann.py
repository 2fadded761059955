r"""DANN: domain-adversarial training (Ganin et al. 2016, "Domain-Adversarial Training of Neural
Networks", JMLR 17), unsupervised domain adaptation from a labelled source (config.input) to
an unlabelled target domain (config.dann.target_dataset), following tllib
(thuml/Transfer-Learning-Library: modules/grl.py, alignment/dann.py,
modules/domain_discriminator.py, examples/domain_adaptation/image_classification/dann.py).

Each step takes a source batch (x_s, y_s) and a target batch x_t of the same size (the target
labels never leave the host: DomainPairs keeps only the target images). As in tllib's example,
x = concat(x_s, x_t) goes through the backbone in one forward pass, so a BatchNorm model
normalises by the statistics of both domains and its running statistics (extra['batch_stats'],
as methods/supervised.py) are updated with them. With f = the pooled features (the model's
aux['pre_logits']) and D the domain discriminator,

  loss = CE(logits(x_s), y_s) + trade_off * L_d,
  L_d  = 1/2 [ mean_s BCE(D(R(f_s)), 1) + mean_t BCE(D(R(f_t)), 0) ]  (DomainAdversarialLoss)

where R is the gradient reversal layer: R(f) = f forward, dR/df = -coeff(i) * I backward, so D
learns to tell the domains apart while the backbone learns features it cannot. The coefficient
follows tllib's WarmStartGradientReverseLayer,

  coeff(i) = 2 (hi - lo) / (1 + exp(-alpha i / max_iters)) - (hi - lo) + lo,

i = the train step (0-based: the first step's coeff is lo); with alpha=10, lo=0, hi=1 and
max_iters = total_steps (the defaults) it is Ganin's lambda_p = 2 / (1 + exp(-10 p)) - 1,
p = i / total_steps. i is counted in the method state (extra['grl_step'], one per loss_fn
call, divided by grad_accum_steps), so it is checkpointed and a resumed run continues the
schedule exactly. D is tllib's DomainDiscriminator: Linear(F, hidden) - BN - ReLU -
Linear(hidden, hidden) - BN - ReLU - Linear(hidden, 1) (logits; the sigmoid is inside the
BCE), its BatchNorm normalising by the batch's statistics (D only runs in training, so it
keeps no running statistics). Its params are the top-level `discriminator/` subtree, with
logical axis names ('embed' in, 'mlp' hidden) so it shards with the model. No bottleneck
layer between the backbone and the head (tllib adds a 256-wide one): the features are the
model's own.

Metrics: train/accuracy (source), train/cls_loss, train/transfer_loss (L_d),
train/domain_accuracy (D's, mean of both domains), train/grl_coeff. Evaluators: Supervised's
('eval' on the source, 'eval_<dataset>' for each of eval.datasets, e.g. the target's test
split). Export: the classifier's params (plus the `discriminator/` subtree, which a plain
supervised fine-tune ignores: merge_pretrained reads only the paths its model has) and the
running statistics; `jax_transfer.load_pretrained(DIR)` gives a model that applies as usual.

config.dann (defaults: SECTION_DEFAULTS; `section(...)` builds it for config files):
  target_dataset  the target domain (required): an embedded shifted domain (digits_rotated,
                  ...) or a prepared TFDS dataset with the source's image shape and class
                  names; read at target_split ('train') with input.classes applied (closed
                  set) and no examples_per_class subset, with the source's batch size and
                  training recipe, shuffled with a seed stream of its own.
  trade_off       weight of L_d (1.0); 0 trains the classifier exactly as supervised does
                  on the same source batches (for a model without BatchNorm).
  hidden          discriminator width (1024, tllib's); batch_norm: its BN layers (True).
  grl             alpha (10), lo (0), hi (1), max_iters (None = total_steps).

Command (digits -> rotated digits, ResNet with BatchNorm; `:runlocal` for a smoke run):
  python -m jax_transfer.main --config=ml_collections_configs/shift/digits_dann.py \
    --workdir=/tmp/dann
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_transfer import config as config_lib, data
from jax_transfer.methods.supervised import Supervised

P = nn.with_logical_partitioning

DISCRIMINATOR = "discriminator"  # Top-level params subtree of the domain discriminator.
TARGET_KEY = "target_image"      # The batch column of the target domain's images.
TARGET_SALT = 0x74617267         # 'targ': the target stream's seed is (seed, TARGET_SALT).
DISC_SALT = 0x64697363           # 'disc': fold_in constant of the discriminator's init key.

GRL_DEFAULTS = dict(alpha=10.0, lo=0.0, hi=1.0, max_iters=None)
SECTION_DEFAULTS = dict(target_dataset="", target_split="train", trade_off=1.0, hidden=1024,
                        batch_norm=True, grl=GRL_DEFAULTS)


def section(**overrides) -> ml_collections.ConfigDict:
  """config.dann with SECTION_DEFAULTS and `overrides` (grl given as a dict of its keys);
  max_iters is an int placeholder, so --config.dann.grl.max_iters=500 works."""
  grl = {**GRL_DEFAULTS, **overrides.pop("grl", {})}
  if grl["max_iters"] is None:
    grl["max_iters"] = ml_collections.config_dict.placeholder(int)
  return ml_collections.ConfigDict({**SECTION_DEFAULTS, **overrides,
                                    "grl": ml_collections.ConfigDict(grl)})


# ------------------------------------------------------------------------ Gradient reversal.


@jax.custom_vjp
def grad_reverse(x, coeff):
  """R(x) = x; the cotangent g comes back as -coeff * g (tllib's GradientReverseFunction).
  coeff gets no gradient."""
  return x


def _grad_reverse_fwd(x, coeff):
  return x, coeff


def _grad_reverse_bwd(coeff, g):
  return (jax.tree.map(lambda t: (-coeff * t).astype(t.dtype), g), jnp.zeros_like(coeff))


grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


def grl_coeff(step, *, alpha=10.0, lo=0.0, hi=1.0, max_iters=1000):
  """tllib's WarmStartGradientReverseLayer coefficient at iteration `step` (float32):
  2 (hi - lo) / (1 + exp(-alpha step / max_iters)) - (hi - lo) + lo, rising from lo at step
  0 towards hi. A pure function of the step (jnp or numpy scalars)."""
  p = jnp.asarray(step, jnp.float32) / max_iters
  return (2.0 * (hi - lo) / (1.0 + jnp.exp(-alpha * p)) - (hi - lo) + lo).astype(jnp.float32)


# ---------------------------------------------------------------------- Domain discriminator.


class _BatchStatNorm(nn.Module):
  """BatchNorm1d in training mode: (x - batch mean) / sqrt(batch var + eps) * scale + bias,
  statistics over the (global, under jit) batch axis; no running averages."""
  axis_name: str
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    f = x.shape[-1]
    scale = self.param("scale", P(nn.initializers.ones, (self.axis_name,)), (f,))
    bias = self.param("bias", P(nn.initializers.zeros, (self.axis_name,)), (f,))
    mean, var = x.mean(0), x.var(0)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class DomainDiscriminator(nn.Module):
  """features [N, F] -> domain logits [N] (source 1, target 0): tllib's DomainDiscriminator,
  (Linear - BN - ReLU) x 2 - Linear(1), the sigmoid left to the loss. Linear layers init as
  torch's (uniform, variance 1 / (3 fan_in)); kernels named ('embed', 'mlp'), ('mlp',
  'embed'), ('embed', None) like a transformer MLP's, so they shard with the model."""
  hidden: int = 1024
  batch_norm: bool = True

  @nn.compact
  def __call__(self, features):
    x = features.astype(jnp.float32)
    torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    for i, names in enumerate((("embed", "mlp"), ("mlp", "embed")), start=1):
      x = nn.Dense(self.hidden, name=f"fc{i}", kernel_init=P(torch_init, names),
                   bias_init=P(nn.initializers.zeros, names[1:]))(x)
      if self.batch_norm:
        x = _BatchStatNorm(names[1], name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(1, name="out", kernel_init=P(torch_init, ("embed", None)),
                    bias_init=P(nn.initializers.zeros, (None,)))(x)[:, 0]


def domain_adversarial_loss(d_source, d_target):
  """(L_d, domain accuracy) from the discriminator's logits on the source [B_s] and the target
  [B_t] (tllib's DomainAdversarialLoss, equal weights): L_d = 1/2 (mean BCE(d_s, 1) + mean
  BCE(d_t, 0)), accuracy = 1/2 (mean[d_s >= 0] + mean[d_t < 0]) (sigmoid >= 1/2)."""
  d_source, d_target = d_source.astype(jnp.float32), d_target.astype(jnp.float32)
  loss = 0.5 * (optax.sigmoid_binary_cross_entropy(d_source, jnp.ones_like(d_source)).mean()
                + optax.sigmoid_binary_cross_entropy(d_target, jnp.zeros_like(d_target)).mean())
  accuracy = 0.5 * (jnp.mean(d_source >= 0) + jnp.mean(d_target < 0))
  return loss, accuracy


# ------------------------------------------------------------------------------ Config.


def _type_ok(value, ref) -> bool:
  """`value` may stand for the default `ref` (None: an optional int; ints pass for floats)."""
  if isinstance(value, bool) or isinstance(ref, bool):
    return isinstance(value, bool) and isinstance(ref, bool)
  if ref is None:
    return value is None or isinstance(value, int)
  return isinstance(value, (int, float) if isinstance(ref, float) else type(ref))


def dann_config(config) -> dict:
  """config.dann merged over SECTION_DEFAULTS, as a plain dict (grl.max_iters resolved to
  total_steps when unset); ConfigError on unknown keys, wrong types or out-of-range values."""
  given = config.get("dann")
  if given is None:
    raise config_lib.ConfigError("method='dann' needs a config.dann section with "
                                 "dann.target_dataset (the unlabelled target domain)")
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
  grl = given.pop("grl", None) or {}
  grl = grl.to_dict() if isinstance(grl, ml_collections.ConfigDict) else dict(grl)
  for prefix, part, defaults in (("dann.", given, SECTION_DEFAULTS),
                                 ("dann.grl.", grl, GRL_DEFAULTS)):
    unknown = sorted(set(part) - set(defaults))
    if unknown:
      raise config_lib.ConfigError(f"unknown config key(s) {prefix}{unknown[0]}; allowed keys "
                                   f"here: {sorted(defaults)}")
    for k, v in part.items():
      if not _type_ok(v, defaults[k]):
        want = "int" if defaults[k] is None else type(defaults[k]).__name__
        raise config_lib.ConfigError(f"config key '{prefix}{k}' must be {want}, got {v!r}")
  c = {**SECTION_DEFAULTS, **given, "grl": {**GRL_DEFAULTS, **grl}}
  if c["grl"]["max_iters"] is None:
    c["grl"]["max_iters"] = config.total_steps
  checks = (("trade_off", c["trade_off"] >= 0, ">= 0"), ("hidden", c["hidden"] > 0, "> 0"),
            ("grl.alpha", c["grl"]["alpha"] >= 0, ">= 0"),
            ("grl.max_iters", c["grl"]["max_iters"] > 0, "> 0"))
  for key, ok, want in checks:
    if not ok:
      value = c["grl"][key[4:]] if key.startswith("grl.") else c[key]
      raise config_lib.ConfigError(f"dann.{key}={value!r} must be {want}")
  return c


def target_input(config) -> ml_collections.ConfigDict:
  """The input section of the target stream: config.input reading dann.target_dataset at
  dann.target_split, input.classes kept (closed set), no few-shot subset."""
  d = config.dann
  c = config_lib.eval_input(config.input, d.target_dataset)
  c.train_split = d.get("target_split") or SECTION_DEFAULTS["target_split"]
  c.examples_per_class = None
  return c


def _check_target(config, d) -> None:
  """The target domain exists, has target_split, and matches the source's images and classes."""
  name, c = d["target_dataset"], config.input
  if not name:
    raise config_lib.ConfigError("dann.target_dataset is required: the unlabelled target "
                                 "domain, e.g. 'digits_rotated'")
  info = config_lib.like_input_dataset(c, name, f"dann.target_dataset={name!r}")
  split = d["target_split"]
  if any(p.split("[")[0].strip() not in info["num_examples"] for p in split.split("+")):
    raise config_lib.ConfigError(f"dann.target_split={split!r}: {name!r} has splits "
                                 f"{sorted(info['num_examples'])}")


# ------------------------------------------------------------------------------ Input.


class DomainPairs:
  """Source batches with a target batch's images beside them, as TARGET_KEY; every other
  target column (its labels included) is dropped here, on the host. Checkpointable: the state
  is both iterators' ({'source': ..., 'target': ...}), so a resumed run draws exactly the
  pairs that followed."""

  def __init__(self, source, target):
    self.source, self.target = source, target

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = dict(next(self.source))
    batch[TARGET_KEY] = next(self.target)["image"]
    return batch

  def get_state(self) -> dict:
    return {"source": self.source.get_state(), "target": self.target.get_state()}

  def set_state(self, state: dict) -> None:
    self.source.set_state(state["source"])
    self.target.set_state(state["target"])


def target_seed(seed: int) -> int:
  """The target stream's seed: its own shuffle and augmentation, independent of the source's."""
  return int(np.random.SeedSequence([seed, TARGET_SALT]).generate_state(1)[0])


# ------------------------------------------------------------------------------ Method.


class DANN(Supervised):

  @staticmethod
  def validate_config(config):
    Supervised.validate_config(config)
    d = dann_config(config)
    if config.input.get("shards"):
      raise config_lib.ConfigError("input.shards: method='dann' reads TFDS datasets only "
                                   "(the source and dann.target_dataset)")
    m = config.get("mixup")
    if m is not None and any(m.get(k, 0) for k in ("mixup_alpha", "cutmix_alpha",
                                                    "label_smoothing")):
      raise config_lib.ConfigError("mixup: method='dann' does not mix batches; unset "
                                   "config.mixup")
    _check_target(config, d)

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.dann = dann_config(config)
    self.discriminator = DomainDiscriminator(self.dann["hidden"], self.dann["batch_norm"])
    self.target_normalise = data.normaliser(target_input(config), train=True)

  def train_iterator(self, *, seed, process_index=0, process_count=1):
    source = super().train_iterator(seed=seed, process_index=process_index,
                                    process_count=process_count)
    target = data.make_train_iterator(target_input(self.config), seed=target_seed(seed),
                                      process_index=process_index, process_count=process_count)
    return DomainPairs(source, target)

  @functools.cached_property
  def feature_dim(self) -> int:
    """F of the model's aux['pre_logits'] (shapes only)."""
    variables = jax.eval_shape(self._init_variables, jax.random.key(0))
    dummy = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
    _, aux = jax.eval_shape(functools.partial(self.model.apply, train=False),
                            nn.unbox(variables), dummy)
    return aux["pre_logits"].shape[-1]

  def init_params(self, rng):
    """The model's params (from `rng`, as Supervised's) plus the discriminator's subtree."""
    params = dict(super().init_params(rng))
    disc = self.discriminator.init(jax.random.fold_in(rng, DISC_SALT),
                                   jnp.zeros((2, self.feature_dim), jnp.float32))
    return {**params, DISCRIMINATOR: disc["params"]}

  def init_extra(self, rng, params):
    extra = super().init_extra(rng, params) or {}
    return {**extra, "grl_step": jnp.zeros((), jnp.int32)}

  def load_extra(self, extra):
    return super().load_extra(extra) if self.has_batch_stats else extra

  def _variables(self, params, extra):
    params = {k: v for k, v in params.items() if k != DISCRIMINATOR}
    return super()._variables(params, extra)

  def grl_coeff(self, step):
    return grl_coeff(step, **self.dann["grl"])

  def loss_fn(self, params, extra, batch, rng):
    labels, source = batch["label"], batch["image"]
    target = self.target_normalise({"image": batch[TARGET_KEY]})["image"]
    b = source.shape[0]
    images = jnp.concatenate([source, target.astype(source.dtype)])
    # One forward over both domains: a BN model's statistics are of both.
    (logits, aux), extra = self.train_apply(params, extra, images, rng)
    cls_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits[:b].astype(jnp.float32), labels).mean()
    coeff = self.grl_coeff(extra["grl_step"] // self.config.grad_accum_steps)
    d = self.discriminator.apply({"params": params[DISCRIMINATOR]},
                                 grad_reverse(aux["pre_logits"], coeff))
    transfer_loss, domain_accuracy = domain_adversarial_loss(d[:b], d[b:])
    loss = cls_loss + self.dann["trade_off"] * transfer_loss
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits[:b], -1) == labels),
               "cls_loss": cls_loss, "transfer_loss": transfer_loss,
               "domain_accuracy": domain_accuracy, "grl_coeff": coeff}
    return loss, (metrics, {**extra, "grl_step": extra["grl_step"] + 1})
