"""Published checkpoints -> jax_transfer models: one module per format (open_clip,
hugging_face, big_vision, augreg, timm_vit) over the shared mapping core (core.py). The
command is `python -m jax_transfer.tools.import_checkpoint`."""
