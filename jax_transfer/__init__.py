"""jax_transfer: config-driven JAX pretraining and transfer."""


def load_pretrained(export_dir: str, adapter_dir: str | None = None):
  """Export dir (a run's `python -m jax_transfer.export`, or an imported checkpoint's
  `python -m jax_transfer.tools.import_checkpoint`) -> Pretrained(model, params, tokenizer,
  preprocess, config), a NamedTuple:

    model, params, tokenizer, preprocess, config = jax_transfer.load_pretrained(DIR)
    zimg = model.apply({"params": params}, preprocess(images), None)[0][0]

  tokenizer: the export's (None if it has none); preprocess: the image preprocessing of the
  model's eval recipe (data.preprocess.ImagePreprocess). adapter_dir: an `--adapter_only`
  export of a PEFT run trained on `export_dir`, applied onto it (another base is refused).
  See checkpoint.load_pretrained_all.
  """
  from jax_transfer import checkpoint
  return checkpoint.load_pretrained_all(export_dir, adapter_dir)
