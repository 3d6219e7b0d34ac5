"""`shapes`: procedural RGB images of coloured geometric shapes, each with a class label and a caption.

The embedded image(-text) dataset: like the synthetic recall tasks it is
generated offline from a seed, so image models, classification and
contrastive/captioning runs need no download. An example:

    image     uint8 [S, S, 3]   S = image_size; a dark grey background (one grey
                                level per image, plus Gaussian noise of std
                                `noise` * 255) with 1..max_objects shapes
    label     int64 (ClassLabel) shape x colour of the *largest* object:
                                label = shape_id * len(COLOURS) + colour_id,
                                class names 'red circle', 'green circle', ...
    caption   text              'a small red circle left of a large blue square'
    shapes    int32 [n]         index into SHAPES, per object
    colours   int32 [n]         index into COLOURS, per object
    sizes     int32 [n]         index into SIZES (0 small, 1 large), per object
    centres   float32 [n, 2]    (x, y) in pixels from the top-left corner, y down
    radii     float32 [n]       half the extent of the object's bounding box
    relation  int32             index into RELATIONS: object 0 <relation> object 1;
                                -1 when the image holds one object

Classes: 3 shapes x 6 colours = 18, balanced (the largest object's shape and
colour are drawn uniformly), so chance is 1/18 = 5.6%. The label object is
unambiguous: in an image with several objects exactly one is large (its
radius is at least 1.5x any small one's) and the others are small; a lone
object is small or large. Telling its colour needs only pixel statistics, its
shape needs local structure, which is what makes it a small but real vision
task: a two-layer CNN (a scratch check, not project code) reached 75% on the
validation split after one epoch of the default 20k images and 98% after
three, about four minutes on two busy CPU cores.

Captions name every object as 'a <size> <colour> <shape>'. Objects 0 and 1
are joined by their spatial relation ('left of', 'right of', 'above',
'below'); further objects follow as ', with a ... and a ...'. The relation is
chosen first and the two objects are then placed so that it is clearly true:
along the relation's axis their bounding boxes are apart by a gap, and the
offset along the other axis is at most half the offset along it, so no other
relation could be meant. No two objects overlap (bounding boxes at least a
gap apart), and no two objects share a description, so every phrase of a
caption names one object.

Rasterisation is plain numpy on a pixel-centre grid (about 0.1 ms per 32x32
image), so the default 20k examples build in seconds.

Settings (`data.shapes.*`): image_size (32), max_objects (2, at most 4: more
small objects do not fit with clear gaps), noise (0.03). They, the split sizes
and the generation seed name the tfds config
(`shapes/size32-objects2-noise0.03-train20000-val1000-seed0`), and each
example is seeded on its own (see `synthetic.py`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.builders import synthetic

SHAPES = ("circle", "square", "triangle")
# Saturated and far apart in RGB, so that colour jitter never makes one
# colour look like another, and all of them bright against the dark background.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES)

DEFAULTS = {"image_size": 32, "max_objects": 2, "noise": 0.03}
MIN_IMAGE_SIZE = 24
MAX_OBJECTS = 4

# Radii as fractions of image_size. The smallest large radius is >= 1.5x the
# largest small one, so which object is large (the label object) is never in doubt.
_RADIUS = {0: (0.09, 0.12), 1: (0.19, 0.23)}
_GAP = 0.05  # least distance between bounding boxes, as a fraction of image_size
_MARGIN = 1.0  # pixels kept free at the image border
_COLOUR_JITTER = 20  # per channel, +-
_BACKGROUND = (10, 70)  # grey level range of the background
_CANDIDATES = 64  # positions tried at once by the vectorised rejection sampler
_ATTEMPTS = 100


def _describe(size: int, colour: int, shape: int) -> str:
  return f"a {SIZES[size]} {COLOUR_NAMES[colour]} {SHAPES[shape]}"


def caption(shapes, colours, sizes, relation: int) -> str:
  """The caption of objects (shapes[i], colours[i], sizes[i]) whose objects 0 and 1 stand in `relation`."""
  names = [_describe(s, c, h) for h, c, s in zip(shapes, colours, sizes)]
  if len(names) == 1:
    return names[0]
  text = f"{names[0]} {RELATIONS[relation]} {names[1]}"
  if len(names) > 2:
    text += ", with " + " and ".join(names[2:])
  return text


def caption_length(s: Mapping[str, Any]) -> int:
  """The longest caption `s` can give, in bytes (each word slot filled with its longest word)."""
  longest = lambda words: max(range(len(words)), key=lambda i: len(words[i]))
  n = s["max_objects"]
  return len(caption([longest(SHAPES)] * n, [longest(COLOUR_NAMES)] * n, [longest(SIZES)] * n,
                     longest(RELATIONS)))


def example_length(s: Mapping[str, Any]) -> int:
  # bos + the longest caption's bytes + eos: what the byte tokenizer makes of it.
  return caption_length(s) + 2


def check(s: Mapping[str, Any]) -> None:
  if s["image_size"] < MIN_IMAGE_SIZE:
    raise ValueError(f"data.shapes.image_size={s['image_size']} must be >= {MIN_IMAGE_SIZE} (smaller, a small "
                     "shape is a few pixels and circle, square and triangle look alike)")
  if not 1 <= s["max_objects"] <= MAX_OBJECTS:
    raise ValueError(f"data.shapes.max_objects={s['max_objects']} must be in [1, {MAX_OBJECTS}] (more objects do "
                     "not fit without overlapping)")
  if not 0.0 <= s["noise"] <= 0.5:
    raise ValueError(f"data.shapes.noise={s['noise']} must be in [0, 0.5] (std of the background noise as a "
                     "fraction of 255)")


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  centres = np.arange(size, dtype=np.float32) + 0.5
  return centres[None, :], centres[:, None]  # x [1, S], y [S, 1]


def _mask(shape: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
  """Pixels (by their centres) inside the shape whose bounding box is centre +- r."""
  x, y = _grid(size)
  dx, dy = x - cx, y - cy
  if SHAPES[shape] == "circle":
    return dx * dx + dy * dy <= r * r
  if SHAPES[shape] == "square":
    # A side of 1.7 r gives about the circle's area, so size reads the same for both.
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  # Triangle, apex up: half-width grows from 0 at the apex to r at the base.
  return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _apart(a: np.ndarray, ra, b: np.ndarray, rb, gap: float) -> np.ndarray:
  """Whether bounding boxes centred at a and b (radii ra, rb) are at least `gap` apart along x or y."""
  return np.max(np.abs(a - b), axis=-1) >= ra + rb + gap


def _place(rng: np.random.Generator, radii: np.ndarray, relation: int, size: int) -> np.ndarray | None:
  """Centres [n, 2] with object 0 <relation> object 1 clearly, no overlaps; None if this draw found none."""
  gap = _GAP * size
  low, high = _MARGIN + radii, size - _MARGIN - radii
  centres = np.zeros((len(radii), 2), np.float32)
  if len(radii) == 1:
    centres[0] = rng.uniform(low[0], high[0], size=2)
    return centres
  pair = rng.uniform(low[:2, None], high[:2, None], size=(_CANDIDATES, 2, 2))
  offset = pair[:, 1] - pair[:, 0]  # from object 0 to object 1, (dx, dy); y grows downwards
  axis, sign = {0: (0, 1), 1: (0, -1), 2: (1, 1), 3: (1, -1)}[relation]
  along, across = sign * offset[:, axis], np.abs(offset[:, 1 - axis])
  ok = (along >= radii[0] + radii[1] + gap) & (across <= along / 2)
  if not ok.any():
    return None
  centres[:2] = pair[np.argmax(ok)]
  for k in range(2, len(radii)):
    candidates = rng.uniform(low[k], high[k], size=(_CANDIDATES, 2))
    ok = np.ones(_CANDIDATES, bool)
    for j in range(k):
      ok &= _apart(candidates, radii[k], centres[j], radii[j], gap)
    if not ok.any():
      return None
    centres[k] = candidates[np.argmax(ok)]
  return centres


def _objects(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """shapes, colours, sizes of n objects: one large (the label object) among the first two, no two alike."""
  sizes = np.zeros(n, np.int32)
  if n == 1:
    sizes[0] = rng.integers(2)
  else:
    sizes[int(rng.integers(2))] = 1
  shapes, colours = np.zeros(n, np.int32), np.zeros(n, np.int32)
  taken = set()
  for i in range(n):
    # Small objects must differ in (shape, colour) so each caption phrase names one object;
    # the large one differs from all of them by its size already.
    choices = [c for c in range(NUM_CLASSES) if sizes[i] == 1 or c not in taken]
    pick = choices[int(rng.integers(len(choices)))]
    shapes[i], colours[i] = divmod(pick, len(COLOURS))
    if sizes[i] == 0:
      taken.add(pick)
  return shapes, colours, sizes


def make_example(rng: np.random.Generator, s: Mapping[str, Any]) -> dict[str, Any]:
  size = s["image_size"]
  n = int(rng.integers(1, s["max_objects"] + 1))
  shapes, colours, sizes = _objects(rng, n)
  relation = int(rng.integers(len(RELATIONS))) if n > 1 else -1
  for _ in range(_ATTEMPTS):
    radii = np.array([rng.uniform(*_RADIUS[int(z)]) for z in sizes], np.float32) * size
    centres = _place(rng, radii, relation, size)
    if centres is not None:
      break
  else:  # Not reached for valid settings (the checks keep every layout feasible).
    raise RuntimeError(f"could not place {n} objects in a {size}x{size} image")
  image = np.full((size, size, 3), rng.integers(*_BACKGROUND), np.float32)
  if s["noise"] > 0:
    image += rng.normal(0.0, s["noise"] * 255.0, size=image.shape).astype(np.float32)
  for i in range(n):
    colour = np.asarray(COLOURS[COLOUR_NAMES[colours[i]]], np.float32)
    colour += rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    image[_mask(int(shapes[i]), *centres[i], radii[i], size)] = colour
  largest = int(np.argmax(radii))
  return {
      "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
      "label": int(shapes[largest]) * len(COLOURS) + int(colours[largest]),
      "caption": caption(shapes, colours, sizes, relation),
      "shapes": shapes, "colours": colours, "sizes": sizes,
      "centres": centres, "radii": radii, "relation": np.int32(relation),
  }


TASK = synthetic.Task(
    name="shapes", defaults=DEFAULTS,
    abbreviations={"image_size": "size", "max_objects": "objects", "noise": "noise"},
    example_length=example_length, check=check, make_example=make_example)


class Shapes(synthetic.SyntheticTaskBuilder):
  """Coloured geometric shapes on a dark background: RGB image, shape x colour label, English caption."""

  name = "shapes"
  task = TASK
  num_classes = NUM_CLASSES
  class_names = CLASS_NAMES

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.settings["image_size"]
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Raw pixels, not PNG: encoding PNG needs PIL or TensorFlow, and
            # 3 KB per 32x32 image is small.
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "caption": tfds.features.Text(),
            "shapes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "colours": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "sizes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "centres": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            "radii": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "relation": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
    )
