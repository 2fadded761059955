"""Data: TFDS catalogue (embedded offline builders in builders.py) + grain pipelines."""
from jax_transfer.data.builders import default_data_dir, ensure_embedded, EMBEDDED  # noqa: F401
from jax_transfer.data.pipeline import (  # noqa: F401
    DatasetNotPreparedError, dataset_info, get_source, image_shape, make_eval_iterator, make_train_iterator)
from jax_transfer.data.preprocess import host_normalise, normaliser  # noqa: F401
