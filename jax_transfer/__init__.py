"""jax_transfer: config-driven JAX pretraining and transfer."""


def load_pretrained(export_dir: str):
  """Export dir -> (model, params, config). See jax_transfer.checkpoint.load_pretrained."""
  from jax_transfer import checkpoint
  return checkpoint.load_pretrained(export_dir)
