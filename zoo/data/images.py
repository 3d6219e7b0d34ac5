"""Images as the model sees them: RGB, a fixed square size, float32 in [-1, 1]; numpy only.

Stored images come as uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]`.
`to_model_input` makes every one of them `[size, size, 3]` float32:

- grey is repeated into three channels and an alpha channel is dropped, so
  one model reads MNIST, CIFAR and photos alike;
- when the stored size is not `size`, the shorter side is resized to `size`
  and the longer one centre-cropped (the usual evaluation transform: the
  aspect ratio is kept, the centre of the picture is what is seen);
- pixel values v become v / 127.5 - 1.

The resize is a separable linear (triangle) filter, widened by the
downscaling factor so that shrinking averages over every source pixel instead
of sampling a few: PIL's `Image.resize(..., BILINEAR)`, which it matches to
within PIL's rounding to uint8 (tested where PIL is installed). It is two
small matrix products per image, built for the exact output pixels, so the
crop costs nothing extra. Doing it in numpy keeps TensorFlow and PIL out of
the pipeline.
"""

from __future__ import annotations

import functools

import numpy as np


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] from a grey ([H, W] or [H, W, 1]), RGB or RGBA image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[:, :, :3]


@functools.lru_cache(maxsize=64)
def _resample_matrix(in_size: int, scale: float, offset: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights: output pixel j is pixel j + offset of the input resized by `scale`."""
  # Centre of each output pixel, in input pixel coordinates.
  centre = (np.arange(out_size) + offset + 0.5) / scale - 0.5
  support = max(1.0, 1.0 / scale)  # wider when shrinking: antialiasing
  distance = np.abs(np.arange(in_size)[None, :] - centre[:, None]) / support
  weights = np.maximum(0.0, 1.0 - distance)
  # Near the borders part of the filter falls outside the image; renormalise
  # so that a flat image stays flat.
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_and_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """float32 [size, size, C]: shorter side resized to `size`, longer side centre-cropped."""
  h, w = image.shape[:2]
  # The resized image is a whole number of pixels on each side; each axis is
  # scaled by its own exact ratio (as PIL does), then cropped.
  resized_h, resized_w = (max(size, round(n * size / min(h, w))) for n in (h, w))
  rows = _resample_matrix(h, resized_h / h, (resized_h - size) // 2, size)
  cols = _resample_matrix(w, resized_w / w, (resized_w - size) // 2, size)
  image = np.asarray(image, np.float32)
  return np.einsum("ih,hwc,jw->ijc", rows, image, cols, optimize=True)


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
  """float32 [size, size, 3] in [-1, 1] from a stored uint8 image of any size (see the module docstring)."""
  image = to_rgb(image)
  if image.shape[0] == image.shape[1] == size:
    pixels = image.astype(np.float32)
  else:
    pixels = np.clip(resize_and_centre_crop(image, size), 0.0, 255.0)
  return pixels / np.float32(127.5) - np.float32(1.0)
