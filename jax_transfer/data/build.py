"""Builds the embedded offline datasets.

  python -m jax_transfer.data.build [--data_dir=DIR] [--no_domains]

The TFDS builders of builders.EMBEDDED (digits, shapes_captions, shapes_jpeg), the webdataset
shards DIR/shapes_wds/ (builders.ensure_shapes_wds), then the shifted domains of
builders.SHIFTED (digits_rotated, ..., shapes_captions_lowcontrast; jax_transfer/data/
domains.py) unless --no_domains (a run builds a domain on first use anyway). DIR defaults to
$JAX_TRANSFER_DATA_DIR, else ~/tensorflow_datasets. Needs no network and no TensorFlow; takes
about 20 s, plus about 35 s for the domains (what is present is kept).
"""

import argparse

from jax_transfer.data import builders


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (default: %(default)s -> '
                      '$JAX_TRANSFER_DATA_DIR or ~/tensorflow_datasets).')
  parser.add_argument('--no_domains', action='store_true',
                      help='Skip the shifted domains (builders.SHIFTED).')
  args = parser.parse_args(argv)
  data_dir = args.data_dir or builders.default_data_dir()
  for name in builders.EMBEDDED:
    print(f'{name}: {builders.ensure_embedded(name, data_dir)}', flush=True)
  print(f'{builders.WDS_NAME}: {builders.ensure_shapes_wds(data_dir)}', flush=True)
  if not args.no_domains:
    for name in builders.SHIFTED:
      print(f'{name}: {builders.ensure_embedded(name, data_dir)}', flush=True)


if __name__ == '__main__':
  main()
