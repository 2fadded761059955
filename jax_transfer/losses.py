"""Losses shared by the methods. One section per family; each loss returns (loss, metrics).

Contrastive image-text losses (CLIP, ALIGN, SigLIP) come in two forms with the same results:

* dense:   plain jnp on global [B, E] arrays sharded over the batch axes; XLA places the
           collectives (it all-gathers the other tower and materialises the [B, B] logits, a
           [b, B] slab per device, so per-device memory grows with the device count).
* chunked: `jax.shard_map` over the batch mesh axes ('data', 'fsdp'). Each device keeps its
           image block [b, E]; text blocks travel around a ring with `lax.ppermute` (n - 1
           hops), so a device only ever holds [b, b] logit blocks: memory stays flat as the
           number of devices grows (open_clip's "local loss", big_vision's chunked sigmoid).

Conventions (REFERENCES.md, CLIP / ALIGN / SigLIP): zimg, ztxt are L2-normalised [B, E];
`logit_scale` is the raw log-temperature t (scale = exp(t)); for the softmax losses the scale is
clipped at 100 inside the loss, and `clamp_logit_scale` clips the parameter itself to
[0, log 100] after each update, as open_clip does. SigLIP uses exp(t) unclipped (t' = log 10 at
init, bias b = -10) as big_vision does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jax_transfer.parallel import BATCH_AXES

# ================================================================================================
# Contrastive (CLIP / ALIGN / SigLIP)
# ================================================================================================

MAX_LOGIT_SCALE = 100.0  # CLIP: "clipped to prevent scaling the logits by more than 100".


def clamp_logit_scale(t):
  """Log-temperature parameter t -> t clipped to [0, log 100]; apply after each update."""
  return jnp.clip(t, 0.0, math.log(MAX_LOGIT_SCALE))


def _softmax_scale(t):
  """exp(t) clipped at 100 (CLIP / ALIGN)."""
  return jnp.minimum(jnp.exp(t), MAX_LOGIT_SCALE)


def _sigmoid_scale(t):
  return jnp.exp(t)


def _check(zimg, ztxt):
  chex.assert_rank(zimg, 2)
  chex.assert_equal_shape([zimg, ztxt])
  return zimg.astype(jnp.float32), ztxt.astype(jnp.float32)


def _strict_hits(pos, negatives):
  """Accuracy counts: does the positive strictly beat every negative of its row / column?
  pos: [B]; negatives: [B, B] logits with the diagonal at -inf. (Ties count as misses, so
  all-equal logits give accuracy 0, not argmax's tie-break; the chunked losses compute the same
  definition from running maxima.)"""
  return jnp.sum(pos > negatives.max(axis=1)), jnp.sum(pos > negatives.max(axis=0))


def _cross_entropy(lse_negatives, pos):
  """CE = logsumexp_j l_j - l_pos, written as softplus(logsumexp_{j != pos} l_j - l_pos): the
  same value, but accurate in float32 when the loss is tiny (CLIP on separable pairs at init is
  4.37e-6, which a logsumexp of size ~14 minus a logit of size ~14 would round to ~1e-6)."""
  return jax.nn.softplus(lse_negatives - pos)


def _mask_diagonal(logits):
  return jnp.where(jnp.eye(logits.shape[0], dtype=bool), -jnp.inf, logits)


# ---- dense ------------------------------------------------------------------------------------

def _dense_softmax(zimg, ztxt, logit_scale, direction_weight):
  """Shared by CLIP (weight 1/2: mean of the two directions) and ALIGN (weight 1: their sum)."""
  zimg, ztxt = _check(zimg, ztxt)
  b = zimg.shape[0]
  scale = _softmax_scale(logit_scale)
  logits = scale * zimg @ ztxt.T                      # [B, B]: row i = image i vs all texts
  pos, negatives = jnp.diagonal(logits), _mask_diagonal(logits)
  i2t = jnp.mean(_cross_entropy(jax.nn.logsumexp(negatives, axis=1), pos))  # CE(logits, arange)
  t2i = jnp.mean(_cross_entropy(jax.nn.logsumexp(negatives, axis=0), pos))  # CE(logits^T, ..)
  loss = direction_weight * (i2t + t2i)
  hits_i2t, hits_t2i = _strict_hits(pos, negatives)
  return loss, {"i2t_acc": hits_i2t / b, "t2i_acc": hits_t2i / b, "scale": scale}


def clip_loss(zimg, ztxt, logit_scale):
  """CLIP: 1/2 [CE(logits, arange) + CE(logits^T, arange)], logits = min(e^t, 100) zimg ztxt^T.
  zimg, ztxt: [B, E] L2-normalised; logit_scale: [] raw t. Returns (loss, metrics)."""
  return _dense_softmax(zimg, ztxt, logit_scale, 0.5)


def align_loss(zimg, ztxt, logit_scale):
  """ALIGN: the same normalised softmax, the two directions summed (L_i2t + L_t2i)."""
  return _dense_softmax(zimg, ztxt, logit_scale, 1.0)


def _signed_for_softplus(logits, diag):
  """-log sigmoid(z l) = softplus(-z l): negate the positives (the diagonal of the own block)."""
  if not diag:
    return logits
  return jnp.where(jnp.eye(logits.shape[0], dtype=bool), -logits, logits)


def siglip_loss(zimg, ztxt, logit_scale, logit_bias):
  """SigLIP: -(1/B) sum_ij log sigmoid(z_ij (e^t x_i.y_j + b)), z_ii = 1, z_ij = -1 otherwise.
  Normalised by B (not B^2), as in the paper and big_vision. Computed as
  (1/B) sum_ij softplus(-z_ij l_ij) -- equal to REFERENCES.md's sum softplus(l) - sum l_ii, but
  without the cancellation softplus(l) - l suffers for confident positives."""
  zimg, ztxt = _check(zimg, ztxt)
  b = zimg.shape[0]
  scale = _sigmoid_scale(logit_scale)
  logits = scale * zimg @ ztxt.T + logit_bias
  loss = jnp.sum(jax.nn.softplus(_signed_for_softplus(logits, True))) / b
  hits_i2t, hits_t2i = _strict_hits(jnp.diagonal(logits), _mask_diagonal(logits))
  return loss, {"i2t_acc": hits_i2t / b, "t2i_acc": hits_t2i / b, "scale": scale,
                "bias": jnp.asarray(logit_bias, jnp.float32)}


# ---- chunked (ring over the batch axes) -------------------------------------------------------
#
# Why a hand-written backward (jax.custom_vjp) rather than autodiff through the ring: reverse-
# mode through a scan of n steps stores each step's residuals, i.e. n [b, b] logit blocks (or,
# with jax.checkpoint, n travelling [b, E] text blocks) -- exactly the [b, B] slab the ring is
# meant to avoid. The backward is instead a second ring pass (like flash attention's): it
# recomputes each [b, b] block from the saved embeddings and per-row logsumexps, so forward and
# backward both keep O(b^2 + b E) per device. ppermute's own transpose (the inverse permutation)
# is what the backward ring implements: the text-gradient accumulator travels with its block and
# takes a last hop home. The tests check these gradients against autodiff of the dense losses.
#
# The t2i direction (softmax over all images for each text) is computed in the same pass: each
# travelling text block carries its running per-text logsumexp (and running max for accuracy),
# updated on every device it visits from the transposed block, and after the ring a final hop of
# that [b] vector brings it home. That costs one [b]-float hop instead of a second n-step ring
# of [b, E] blocks and [b, b] matmuls.

def _ring(block_fn, combine, local, travel, axis, n):
  """Visits all n blocks of `travel` with each device's `local` block.

  block_fn(local, travel, diag) -> (local_stats, travel_stats): statistics of one [b, b] block;
  diag=True on the first step only, when the travelling block is the device's own (the block
  holding the positives). combine = (merge_local, merge_travel), each (acc, new) -> acc. Returns
  (local_stats over all blocks, travel_stats of *this device's own* travelling block over all
  devices). Travelling inputs make n - 1 hops; their statistics make one more hop home.
  """
  shift = functools.partial(lax.ppermute, axis_name=axis,
                            perm=[(i, (i + 1) % n) for i in range(n)])
  local_acc, travel_acc = block_fn(local, travel, True)
  if n == 1:
    return local_acc, travel_acc

  def step(carry, _):
    local_acc, travel, travel_acc = carry
    travel, travel_acc = shift((travel, travel_acc))  # step s (1..n-1): device k holds block k - s
    new_local, new_travel = block_fn(local, travel, False)
    return (combine[0](local_acc, new_local), travel,
            combine[1](travel_acc, new_travel)), None

  (local_acc, _, travel_acc), _ = lax.scan(step, (local_acc, travel, travel_acc), None,
                                           length=n - 1)
  # After n - 1 hops device k holds block k + 1's statistics; one hop takes them home.
  return local_acc, shift(travel_acc)


def _ring_size(mesh: Mesh, batch: int) -> int:
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch % n:
    raise ValueError(f"chunked contrastive loss: batch {batch} is not divisible by the "
                     f"{n} devices of mesh axes {BATCH_AXES}")
  return n


def _logsumexp_max(acc, new):
  """Streaming logsumexp (logaddexp is the exact merge of two logsumexps) and running max."""
  (lse_a, max_a), (lse_b, max_b) = acc, new
  return jnp.logaddexp(lse_a, lse_b), jnp.maximum(max_a, max_b)


def _sum_max(acc, new):
  return acc[0] + new[0], jnp.maximum(acc[1], new[1])


def _add(acc, new):
  return jax.tree.map(jnp.add, acc, new)


def _negatives(logits, diag):
  return _mask_diagonal(logits) if diag else logits


def _smap(mesh, fn, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


ROWS = P(BATCH_AXES, None)  # [B, E] embeddings: batch split over ('data', 'fsdp').
VEC = P(BATCH_AXES)         # [B] per-example statistics.


def _chunked_softmax_fwd(mesh, direction_weight, zimg_in, ztxt_in, t):
  zimg, ztxt = _check(zimg_in, ztxt_in)
  batch = zimg.shape[0]
  n = _ring_size(mesh, batch)
  w = direction_weight / batch

  def per_device(x, y, t):
    scale = _softmax_scale(t)

    def block(x, y, diag):
      neg = _negatives(scale * x @ y.T, diag)        # [b, b]: local images vs one text block
      return ((jax.nn.logsumexp(neg, axis=1), neg.max(axis=1)),
              (jax.nn.logsumexp(neg, axis=0), neg.max(axis=0)))

    (lse_row, max_row), (lse_col, max_col) = _ring(block, (_logsumexp_max, _logsumexp_max),
                                                   x, y, BATCH_AXES, n)
    pos = scale * jnp.sum(x * y, axis=1)              # own pairs live on the own block
    ce_row, ce_col = _cross_entropy(lse_row, pos), _cross_entropy(lse_col, pos)
    loss = lax.psum(w * (jnp.sum(ce_row) + jnp.sum(ce_col)), BATCH_AXES)
    acc = lax.psum(jnp.stack([jnp.sum(pos > max_row), jnp.sum(pos > max_col)]), BATCH_AXES)
    # The backward needs the full logsumexps (negatives and positive): pos + CE.
    return loss, acc / batch, scale, pos + ce_row, pos + ce_col

  loss, acc, scale, lse_row, lse_col = _smap(
      mesh, per_device, (ROWS, ROWS, P()), (P(), P(), P(), VEC, VEC))(zimg, ztxt, t)
  metrics = {"i2t_acc": acc[0], "t2i_acc": acc[1], "scale": scale}
  return (loss, metrics), (zimg_in, ztxt_in, t, lse_row, lse_col)


def _chunked_softmax_bwd(mesh, direction_weight, res, g):
  zimg_in, ztxt_in, t, lse_row, lse_col = res
  zimg, ztxt = _check(zimg_in, ztxt_in)
  batch = zimg.shape[0]
  n = _ring_size(mesh, batch)
  c = g[0] * direction_weight / batch    # d loss / d logits = c (P + Q - 2I)

  def per_device(x, lse_row, y, lse_col, t, c):
    scale = _softmax_scale(t)

    def block(local, travel, diag):
      (x, lse_row), (y, lse_col) = local, travel
      dots = x @ y.T
      logits = scale * dots
      grad = jnp.exp(logits - lse_row[:, None]) + jnp.exp(logits - lse_col[None, :])
      if diag:
        grad = grad - 2.0 * jnp.eye(grad.shape[0])
      grad = c * grad
      return (scale * grad @ y, jnp.sum(grad * dots)), scale * grad.T @ x

    (dx, dscale), dy = _ring(block, (_add, _add), (x, lse_row), (y, lse_col), BATCH_AXES, n)
    return dx, dy, lax.psum(dscale, BATCH_AXES)

  dx, dy, dscale = _smap(mesh, per_device, (ROWS, VEC, ROWS, VEC, P(), P()),
                         (ROWS, ROWS, P()))(zimg, lse_row, ztxt, lse_col, t, c)
  dt, = jax.vjp(_softmax_scale, t)[1](dscale.astype(t.dtype).reshape(jnp.shape(t)))
  return dx.astype(zimg_in.dtype), dy.astype(ztxt_in.dtype), dt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_softmax(mesh, direction_weight, zimg, ztxt, t):
  return _chunked_softmax_fwd(mesh, direction_weight, zimg, ztxt, t)[0]


_chunked_softmax.defvjp(_chunked_softmax_fwd, _chunked_softmax_bwd)


def _as_float(t):
  return jnp.asarray(t, jnp.float32)


def chunked_clip_loss(zimg, ztxt, logit_scale, *, mesh: Mesh):
  """`clip_loss` computed with [b, b] blocks on a ring over the mesh's batch axes."""
  return _chunked_softmax(mesh, 0.5, zimg, ztxt, _as_float(logit_scale))


def chunked_align_loss(zimg, ztxt, logit_scale, *, mesh: Mesh):
  """`align_loss` computed with [b, b] blocks on a ring over the mesh's batch axes."""
  return _chunked_softmax(mesh, 1.0, zimg, ztxt, _as_float(logit_scale))


def _chunked_siglip_fwd(mesh, zimg_in, ztxt_in, t, bias):
  zimg, ztxt = _check(zimg_in, ztxt_in)
  batch = zimg.shape[0]
  n = _ring_size(mesh, batch)

  def per_device(x, y, t, bias):
    scale = _sigmoid_scale(t)

    def block(x, y, diag):
      logits = scale * x @ y.T + bias
      neg = _negatives(logits, diag)
      softplus_sum = jnp.sum(jax.nn.softplus(_signed_for_softplus(logits, diag)))
      return (softplus_sum, neg.max(axis=1)), neg.max(axis=0)

    (softplus_sum, max_row), max_col = _ring(block, (_sum_max, jnp.maximum), x, y,
                                             BATCH_AXES, n)
    loss = lax.psum(softplus_sum, BATCH_AXES) / batch
    pos = scale * jnp.sum(x * y, axis=1) + bias       # positives: only on the own block
    acc = lax.psum(jnp.stack([jnp.sum(pos > max_row), jnp.sum(pos > max_col)]), BATCH_AXES)
    return loss, acc / batch, scale

  loss, acc, scale = _smap(mesh, per_device, (ROWS, ROWS, P(), P()),
                           (P(), P(), P()))(zimg, ztxt, t, bias)
  metrics = {"i2t_acc": acc[0], "t2i_acc": acc[1], "scale": scale, "bias": bias}
  return (loss, metrics), (zimg_in, ztxt_in, t, bias)


def _chunked_siglip_bwd(mesh, res, g):
  zimg_in, ztxt_in, t, bias = res
  zimg, ztxt = _check(zimg_in, ztxt_in)
  batch = zimg.shape[0]
  n = _ring_size(mesh, batch)
  c = g[0] / batch                       # d loss / d logits = c (sigmoid(l) - I)

  def per_device(x, y, t, bias, c):
    scale = _sigmoid_scale(t)

    def block(x, y, diag):
      dots = x @ y.T
      grad = jax.nn.sigmoid(scale * dots + bias)
      if diag:
        grad = grad - jnp.eye(grad.shape[0])
      grad = c * grad
      return (scale * grad @ y, jnp.sum(grad * dots), jnp.sum(grad)), scale * grad.T @ x

    (dx, dscale, dbias), dy = _ring(block, (_add, _add), x, y, BATCH_AXES, n)
    return dx, dy, lax.psum(dscale, BATCH_AXES), lax.psum(dbias, BATCH_AXES)

  dx, dy, dscale, dbias = _smap(mesh, per_device, (ROWS, ROWS, P(), P(), P()),
                                (ROWS, ROWS, P(), P()))(zimg, ztxt, t, bias, c)
  dt, = jax.vjp(_sigmoid_scale, t)[1](dscale.reshape(jnp.shape(t)))
  return (dx.astype(zimg_in.dtype), dy.astype(ztxt_in.dtype), dt,
          dbias.reshape(jnp.shape(bias)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_siglip(mesh, zimg, ztxt, t, bias):
  return _chunked_siglip_fwd(mesh, zimg, ztxt, t, bias)[0]


_chunked_siglip.defvjp(_chunked_siglip_fwd, _chunked_siglip_bwd)


def chunked_siglip_loss(zimg, ztxt, logit_scale, logit_bias, *, mesh: Mesh):
  """`siglip_loss` as a sum of softplus over [b, b] blocks on a ring over the batch axes; the
  positive labels (z_ii = 1) live on each device's own block only, the first one it visits."""
  return _chunked_siglip(mesh, zimg, ztxt, _as_float(logit_scale), _as_float(logit_bias))


# ---- registry ---------------------------------------------------------------------------------

ContrastiveLoss = Callable[..., tuple[jax.Array, dict]]

# name -> (dense, chunked, uses logit_bias)
CONTRASTIVE_LOSSES = {
    "clip": (clip_loss, chunked_clip_loss, False),
    "align": (align_loss, chunked_align_loss, False),
    "siglip": (siglip_loss, chunked_siglip_loss, True),
}


def get_contrastive_loss(name: str, chunked: bool = False, mesh: Mesh | None = None
                         ) -> ContrastiveLoss:
  """Uniform callable `(zimg, ztxt, logit_scale, logit_bias=None) -> (loss, metrics)`.
  Softmax losses ignore `logit_bias`. `chunked=True` needs the mesh the batch is sharded on."""
  if name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"unknown contrastive loss {name!r}; allowed: "
                     f"{', '.join(sorted(CONTRASTIVE_LOSSES))}")
  dense, ring, uses_bias = CONTRASTIVE_LOSSES[name]
  if chunked and mesh is None:
    raise ValueError(f"chunked contrastive loss {name!r} needs a mesh")
  fn = functools.partial(ring, mesh=mesh) if chunked else dense

  def loss_fn(zimg, ztxt, logit_scale, logit_bias=None):
    if uses_bias:
      if logit_bias is None:
        raise ValueError(f"contrastive loss {name!r} needs logit_bias")
      return fn(zimg, ztxt, logit_scale, logit_bias)
    return fn(zimg, ztxt, logit_scale)

  return loss_fn


# ================================================================================================
# Distillation (Hinton et al. 2015; DeiT soft distillation; TLEG auxiliary model)
# ================================================================================================

def soft_distillation_loss(student_logits, teacher_logits, labels, *, alpha: float,
                           temperature: float):
  """(1 - α)·CE(y, s) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), mean over the batch.

  student_logits, teacher_logits: [B, C]; labels: [B] ints. The teacher gets no gradient.
  τ² keeps the soft term's gradient scale independent of τ (Hinton et al. 2015, sec. 2).
  DeiT's code divides its summed KL by B·C (outputs.numel()); we use the per-example mean the
  formula states, which only rescales the loss by C (and α = 1 in TLEG, so nothing else moves).
  Exactly 0 when student == teacher and α = 1: identical log-softmaxes cancel term by term.
  """
  chex.assert_rank(student_logits, 2)
  chex.assert_equal_shape([student_logits, teacher_logits])
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1).mean()
  ce = -jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), labels[:, None], axis=-1).mean()
  loss = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
  agree = jnp.mean(jnp.argmax(s, -1) == jnp.argmax(t, -1))
  return loss, {"ce": ce, "kl": kl, "teacher_agreement": agree}


# ================================================================================================
# Self-supervised (Barlow Twins)
# ================================================================================================

def barlow_twins_loss(z1, z2, offdiag_weight: float = 5e-3, eps: float = 1e-5):
  """Barlow Twins (Zbontar et al. 2021, eq. 1). z1, z2: [B, D] embeddings of two views.

  Each dimension is standardised over the batch, C = z1ᵀz2 / B is their [D, D]
  cross-correlation, and the loss is Σ_i (1 - C_ii)² + offdiag_weight · Σ_{i≠j} C_ij²:
  invariance to the augmentation on the diagonal, redundancy reduction off it. Computed in
  float32 on the global (batch-sharded) arrays; XLA reduces over the batch axes."""
  chex.assert_equal_shape((z1, z2))
  chex.assert_rank(z1, 2)
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  standardise = lambda z: (z - z.mean(0)) / (z.std(0) + eps)
  c = standardise(z1).T @ standardise(z2) / z1.shape[0]  # [D, D]
  diag = jnp.diagonal(c)
  on = jnp.sum((1.0 - diag) ** 2)
  off = jnp.sum(c ** 2) - jnp.sum(diag ** 2)
  loss = on + offdiag_weight * off
  return loss, {"bt_on_diag": on, "bt_off_diag": off, "bt_mean_diag": diag.mean()}


# ================================================================================================
# Kernel ridge regression (KRR-ST, Lee et al. 2024)
# ================================================================================================
# λ convention: KRR-ST sets λ = reg_ratio · tr(K_ss) with reg_ratio = 1e-6 (KIP / FRePo use
# tr(K)/n; not used here). Features get an appended column of ones (an unpenalised-in-effect
# bias), so K = f fᵀ + 1. scikit-learn's KernelRidge(alpha=λ, kernel='linear') on the same
# bias-augmented features solves the same problem (tests/test_distill.py checks it).
#
# Why QR, and which side (issue #16 item 3). With Φ = the bias-augmented support features
# [n, p] (p = F + 1), the prediction is Φ_t W with W = (ΦᵀΦ + λI)⁻¹ΦᵀY = Φᵀ(ΦΦᵀ + λI)⁻¹Y (the
# push-through identity: one function, two forms). λ = 1e-6·tr(K_ss) is tiny, so ΦΦᵀ + λI
# (or ΦᵀΦ + λI) has a condition number up to ~1e6 whenever Φ has singular values below √λ:
# always when n > p (K_ss [n, n] has rank ≤ p), and in practice also when n ≤ p, since
# learned features have a decaying spectrum. Forming that Gram and solving it by Cholesky in
# float32 costs up to cond·eps ~ 1e-3..1e-2 relative error: the former krr_predict (dual
# form, now krr_predict_cholesky) was off by 1e-2 / 5e-3 / 4e-3 in values and 7e-2 / 2e-2 /
# 6e-3 in gradients at n / F = 40 / 9, 200 / 64, 1000 / 512 (ReLU features); the primal
# Cholesky form, fine for n > p on such features, loses ~3e-3 when n ≤ p, and both lose
# ~1e-3 on decaying spectra (1e-3 / 2e-3 for the dual at the pod config's 1000 / 2048).
# The regularised Gram is instead factorised without being formed: it is MᵀM for the
# augmented matrix M = [Φ; √λ I_p] (primal) or M = [Φᵀ; √λ I_n] (dual), so M = QR gives its
# Cholesky factor R at √cond·eps (≤ 1e3·eps), and W = R⁻¹Q₁ᵀY (primal) or Q₁R⁻ᵀY (dual) never
# squares Φ. The side is picked by shape only (static, so jit-friendly): primal (R is
# [p, p]) when n > p, dual (R is [n, n]) when n ≤ p. That is the smaller factorisation,
# O((n + p) min(n, p)²), and the one whose backward is accurate (on the other side the
# hand-written cotangents below subtract nearly equal terms and lose ~1e-3; values agree
# either way). Float32 vs float64 on the picked side: ≤ 1e-5 relative in values and ≤ 3e-5 in
# gradients, on both sides of n = p, at n ≈ p and on decaying spectra (tests/test_distill.py).
# The backward pass is written by hand (custom_vjp) with the same R: autodiff through the QR
# would differentiate the QR itself (triangular solves with [n + p, p] tangents), tens of
# times the forward's cost on CPU; the closed-form cotangents need only triangular solves
# with D right-hand sides and matmuls. All matmuls here run at HIGHEST precision:
# accelerators default float32 dots to bf16 (TPU) or TF32 (GPU), 3 significant digits, which
# no ridge of 1e-6·tr(K) survives (not measured here: no accelerator).

def _with_bias(f):
  f = f.astype(jnp.float32)
  return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)


def _mm(a, b):
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _tri(r, b, trans=False):
  """R⁻¹b (R⁻ᵀb with trans) for the upper-triangular factor R."""
  return jax.scipy.linalg.solve_triangular(r, b, trans=1 if trans else 0, lower=False)


def krr_form(n_support: int, width: int) -> str:
  """'primal' (factorise the [width, width] side) when n_support > width, else 'dual'
  ([n, n]): the side whose regularised Gram is full rank. width = the feature width including
  the bias column (F + 1): K_ss = ΦΦᵀ has rank ≤ F + 1, so n > F + 1 makes it singular."""
  return "primal" if n_support > width else "dual"


def _ridge_lambda(phi, reg_ratio):
  """λ = reg_ratio · tr(K_ss) = reg_ratio · ‖Φ‖²_F (the same number for either form)."""
  return reg_ratio * jnp.sum(phi * phi)


def _ridge_fwd(phi, y, reg_ratio, form):
  n, p = phi.shape
  lam = _ridge_lambda(phi, reg_ratio)
  if form == "primal":  # M = [Φ; √λ I_p]: MᵀM = ΦᵀΦ + λI = RᵀR, W = R⁻¹Q₁ᵀY.
    q, r = jnp.linalg.qr(jnp.concatenate([phi, jnp.sqrt(lam) * jnp.eye(p, dtype=phi.dtype)]))
    w = _tri(r, _mm(q[:n].T, y))
    return w, (phi, y, w, r, jnp.zeros((0,), phi.dtype), jnp.zeros((0,), phi.dtype))
  # M = [Φᵀ; √λ I_n]: MᵀM = ΦΦᵀ + λI = RᵀR, Q₁ = ΦᵀR⁻¹, W = Φᵀ(RᵀR)⁻¹Y = Q₁R⁻ᵀY.
  q, r = jnp.linalg.qr(jnp.concatenate([phi.T, jnp.sqrt(lam) * jnp.eye(n, dtype=phi.dtype)]))
  z = _tri(r, y, trans=True)
  q1 = q[:p]
  w = _mm(q1, z)
  return w, (phi, y, w, r, q1, _tri(r, z))  # The last: α = K_λ⁻¹Y = R⁻¹R⁻ᵀY.


def _ridge_bwd(reg_ratio, form, res, w_bar):
  """With A = ΦᵀΦ + λI, Z = A⁻¹W̄, U = ΦZ (= K_λ⁻¹ΦW̄) and residual E = Y - ΦW (= λα):
  Ȳ = U,  Φ̄ = E Zᵀ - U Wᵀ - 2·reg_ratio·⟨Z, W⟩ Φ  (the last term from λ's dependence on Φ).
  Dual: U = R⁻¹Q₁ᵀW̄ and E Zᵀ = α (W̄ - ΦᵀU)ᵀ, since λZ = W̄ - ΦᵀU; ⟨Z, W⟩ = ⟨U, α⟩."""
  phi, y, w, r, q1, alpha = res
  if form == "primal":
    z = _tri(r, _tri(r, w_bar, trans=True))
    u = _mm(phi, z)
    left, right, zw = y - _mm(phi, w), z, jnp.sum(z * w)
  else:
    u = _tri(r, _mm(q1.T, w_bar))
    left, right, zw = alpha, w_bar - _mm(phi.T, u), jnp.sum(u * alpha)
  phi_bar = _mm(left, right.T) - _mm(u, w.T) - 2.0 * reg_ratio * zw * phi
  return phi_bar, u


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ridge_weights(phi, y, reg_ratio, form):
  return _ridge_fwd(phi, y, reg_ratio, form)[0]


_ridge_weights.defvjp(_ridge_fwd, _ridge_bwd)


def krr_weights(phi_s, y_s, reg_ratio: float = 1e-6, form: str = "auto"):
  """W [p, D] = (ΦᵀΦ + λI)⁻¹ΦᵀY_s for bias-augmented support features Φ [n, p], λ =
  reg_ratio · tr(ΦΦᵀ), by QR of the augmented matrix on the side `form` picks ('auto':
  krr_form(n, p); 'primal' / 'dual' force one). Differentiable in Φ and Y_s."""
  chex.assert_rank((phi_s, y_s), 2)
  if form == "auto":
    form = krr_form(*phi_s.shape)
  if form not in ("primal", "dual"):
    raise ValueError(f"krr form {form!r}; allowed: auto, primal, dual")
  return _ridge_weights(phi_s.astype(jnp.float32), y_s.astype(jnp.float32), float(reg_ratio),
                        form)


def krr_predict(f_t, f_s, y_s, reg_ratio: float = 1e-6, form: str = "auto"):
  """KRR-ST sec. 3: ŷ_t = K_ts (K_ss + λI)⁻¹ Y_s, computed as f_t W (krr_weights; the
  comment above this section says why and which form 'auto' picks).

  f_t: [B, F] features of the real (target) batch; f_s: [n, F] features of X_s; y_s: [n, D].
  Returns [B, D]."""
  chex.assert_rank((f_t, f_s, y_s), 2)
  return _mm(_with_bias(f_t), krr_weights(_with_bias(f_s), y_s, reg_ratio, form))


def krr_predict_cholesky(f_t, f_s, y_s, reg_ratio: float = 1e-6, form: str = "dual"):
  """The normal-equations forms krr_predict replaced (kept as the reference the tests and
  benchmarks/krr_step.py compare against): form the regularised Gram (K_ss + λI [n, n] for
  'dual', F_sᵀF_s + λI [F+1, F+1] for 'primal') and Cholesky-solve it. Same function,
  float32 error ~ cond · eps."""
  ft, fs = _with_bias(f_t), _with_bias(f_s)
  lam = _ridge_lambda(fs, reg_ratio)
  solve = lambda g, b: jax.scipy.linalg.cho_solve(
      jax.scipy.linalg.cho_factor(g + lam * jnp.eye(g.shape[0], dtype=g.dtype)), b)
  y = y_s.astype(jnp.float32)
  if form == "primal":
    return _mm(ft, solve(_mm(fs.T, fs), _mm(fs.T, y)))
  return _mm(_mm(ft, fs.T), solve(_mm(fs, fs.T), y))


def krr_loss(f_t, f_s, y_s, y_t, reg_ratio: float = 1e-6, form: str = "auto"):
  """KRR-ST outer objective (sec. 3): MSE(K_ts (K_ss + λI)⁻¹ Y_s, g(x_t)), y_t = g(x_t) [B, D].
  Mean over examples and target dimensions. krr_predict picks the form by shape."""
  pred = krr_predict(f_t, f_s, y_s, reg_ratio, form)
  loss = jnp.mean((pred - y_t.astype(jnp.float32)) ** 2)
  return loss, {"krr_mse": loss}
