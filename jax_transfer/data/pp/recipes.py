"""Standard preprocessing recipes (jax_transfer/data/pp/ pipe strings), one copy for every
pod config. Each function takes the image size.

- ImageNet training as big_vision's vit_i1k.py ("medium2" when randaug): Inception crop
  (area 5-100 %), horizontal flip, RandAugment(2, 15); evaluation resizes the smaller side to
  size / 0.875 (256 for 224) and takes the central crop.
- CLIP training as open_clip's image transform: random-resized crop with area 90-100 %,
  bicubic, no flip; evaluation: smaller side to size (bicubic), central crop.
- Transfer fine-tuning as big_vision's transfer configs: Inception crop + flip for training,
  a plain resize for evaluation.
"""


def imagenet_train(size: int, randaug: bool = True) -> str:
  ra = "|randaug(2, 15)" if randaug else ""
  return f"decode_jpeg_and_inception_crop({size})|flip_lr{ra}|value_range(-1, 1)"


def imagenet_eval(size: int) -> str:
  return f"decode|resize_small({round(size / 0.875)})|central_crop({size})|value_range(-1, 1)"


def clip_train(size: int) -> str:
  return (f'decode_jpeg_and_inception_crop({size}, area_min=90, method="bicubic")'
          "|value_range(-1, 1)")


def clip_eval(size: int) -> str:
  return f'decode|resize_small({size}, method="bicubic")|central_crop({size})|value_range(-1, 1)'


def transfer_train(size: int) -> str:
  return f"decode|inception_crop({size})|flip_lr|value_range(-1, 1)"


def transfer_eval(size: int) -> str:
  return f"decode|resize({size})|value_range(-1, 1)"
