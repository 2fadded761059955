"""Builds the embedded offline datasets.

  python -m jax_transfer.data.build [--data_dir=DIR]

The TFDS builders of builders.EMBEDDED (digits, shapes_captions, shapes_jpeg)
and the webdataset shards DIR/shapes_wds/ (builders.ensure_shapes_wds). DIR
defaults to $JAX_TRANSFER_DATA_DIR, else ~/tensorflow_datasets. Needs no
network and no TensorFlow; takes about 20 s (what is present is kept).
"""

import argparse

from jax_transfer.data import builders


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (default: %(default)s -> '
                      '$JAX_TRANSFER_DATA_DIR or ~/tensorflow_datasets).')
  args = parser.parse_args(argv)
  data_dir = args.data_dir or builders.default_data_dir()
  for name in builders.EMBEDDED:
    print(f'{name}: {builders.ensure_embedded(name, data_dir)}', flush=True)
  print(f'{builders.WDS_NAME}: {builders.ensure_shapes_wds(data_dir)}', flush=True)


if __name__ == '__main__':
  main()
