"""The shapes dataset and image batches: captions true of the pixels, batch contract, eval, resume, tfds images."""

import json
import re
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data as data
from zoo.data import images
from zoo.data import sources
from zoo.data.builders.shapes import COLOURS, NUM_CLASSES, RELATIONS, SHAPES, SIZES, TASK
from zoo.data.builders.shapes import shapes as shapes_lib
from zoo.data.sources import synthetic_builder

KEYS = {"image": np.float32, "label": np.int32, "text": np.int32, "weights": np.float32}
COLOUR_NAMES = tuple(COLOURS)
_DESC = r"a (small|large) (red|green|blue|yellow|purple|white) (circle|square|triangle)"
_ANY = _DESC.replace("(", "(?:")
_CAPTION = re.compile(rf"{_ANY}(?: (?:left of|right of|above|below) {_ANY}(?:, with {_ANY}(?: and {_ANY})*)?)?")


def _examples(n, stream=0, **overrides):
  settings = TASK.settings(overrides)
  return settings, [TASK.make_example(np.random.default_rng([0, stream, i]), settings) for i in range(n)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _check_batch(batch, batch_size, size, seq_len):
  assert set(batch) == set(KEYS)
  assert batch["image"].shape == (batch_size, size, size, 3)
  assert batch["label"].shape == batch["weights"].shape == (batch_size,)
  assert batch["text"].shape == (batch_size, seq_len)
  for k, dtype in KEYS.items():
    assert batch[k].dtype == dtype, k
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["weights"])) <= {0.0, 1.0}


def _rows(batches):
  """The real rows of image batches, as hashable (image bytes, label, text) tuples."""
  return [(b["image"][i].tobytes(), int(b["label"][i]), tuple(b["text"][i]))
          for b in batches for i in np.flatnonzero(b["weights"])]


# --- the examples themselves -------------------------------------------------


@pytest.mark.parametrize("max_objects,image_size", [(1, 32), (2, 32), (4, 24), (4, 48)])
def test_captions_agree_with_attributes_and_the_relation_holds_of_the_centres(max_objects, image_size):
  settings, examples = _examples(150, max_objects=max_objects, image_size=image_size)
  counts = set()
  for ex in examples:
    n = len(ex["shapes"])
    counts.add(n)
    assert 1 <= n <= max_objects and ex["image"].shape == (image_size, image_size, 3)
    assert ex["image"].dtype == np.uint8
    cap = ex["caption"]
    assert _CAPTION.fullmatch(cap), cap
    assert len(cap) <= shapes_lib.caption_length(settings)
    named = re.findall(_DESC, cap)
    assert named == [(SIZES[z], COLOUR_NAMES[c], SHAPES[s])
                     for z, c, s in zip(ex["sizes"], ex["colours"], ex["shapes"])]
    assert len(set(named)) == n  # every phrase names one object
    # One large object among several (radius >= 1.5x every small one); it is the label.
    large = np.flatnonzero(ex["sizes"] == 1)
    radii, centres = ex["radii"], ex["centres"]
    if n > 1:
      assert len(large) == 1 and large[0] in (0, 1)
      assert radii[large[0]] >= 1.5 * np.delete(radii, large[0]).max()
    big = int(np.argmax(radii))
    assert ex["label"] == ex["shapes"][big] * len(COLOURS) + ex["colours"][big]
    # Inside the image, and no two bounding boxes touch.
    assert np.all(centres - radii[:, None] >= 0) and np.all(centres + radii[:, None] <= image_size)
    for i in range(n):
      for j in range(i):
        assert np.abs(centres[i] - centres[j]).max() > radii[i] + radii[j]
    if n == 1:
      assert ex["relation"] == -1
      continue
    relation = RELATIONS[ex["relation"]]
    assert f" {relation} " in cap
    dx, dy = centres[1] - centres[0]  # from object 0 to object 1; image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    # Clearly true: apart along the stated axis, and mostly along it.
    assert along > radii[0] + radii[1] and abs(across) <= along / 2
  assert counts == set(range(1, max_objects + 1))


def test_the_pixels_show_the_stated_colours_and_shapes():
  # At 128 pixels a probe at 0.78 r towards each corner of an object's box is
  # at least a pixel away from every shape's edge: inside a square at all four,
  # inside a triangle (apex up) only at the bottom two, inside a circle at none.
  settings, examples = _examples(40, image_size=128, max_objects=3, noise=0.1)
  corners = {"circle": (0, 0, 0, 0), "square": (1, 1, 1, 1), "triangle": (0, 0, 1, 1)}
  for ex in examples:
    image = ex["image"].astype(int)
    for s, c, (cx, cy), r in zip(ex["shapes"], ex["colours"], ex["centres"], ex["radii"]):
      colour = np.asarray(COLOURS[COLOUR_NAMES[c]])
      is_object = lambda x, y: bool(np.all(np.abs(image[int(y), int(x)] - colour) <= 20))
      assert is_object(cx, cy)
      probes = [(cx - 0.78 * r, cy - 0.78 * r), (cx + 0.78 * r, cy - 0.78 * r),
                (cx - 0.78 * r, cy + 0.78 * r), (cx + 0.78 * r, cy + 0.78 * r)]
      assert tuple(int(is_object(x, y)) for x, y in probes) == corners[SHAPES[s]], (SHAPES[s], r)


def test_labels_cover_every_class_about_evenly():
  _, examples = _examples(1800)
  labels = np.array([ex["label"] for ex in examples])
  assert labels.min() >= 0 and labels.max() < NUM_CLASSES == 18
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  assert counts.min() > 0.6 * 100 and counts.max() < 1.4 * 100  # 100 expected per class


@pytest.mark.parametrize("overrides,field", [
    ({"image_size": 16}, "data.shapes.image_size"),
    ({"max_objects": 5}, "data.shapes.max_objects"),
    ({"max_objects": 0}, "data.shapes.max_objects"),
    ({"noise": 0.9}, "data.shapes.noise"),
    ({"colours": 3}, "data.shapes"),
])
def test_bad_settings_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    TASK.settings(overrides)


def _records(builder, split):
  src = builder.as_data_source(split)
  return [(src[i]["image"].tobytes(), int(src[i]["label"]), src[i]["caption"]) for i in range(len(src))]


def test_builder_is_deterministic_by_seed_and_settings_do_not_collide(make_cfg, tmp_path):
  builder = synthetic_builder(make_cfg("shapes"))
  assert "size32-objects2-noise0.03-train48-val10-seed0" in builder.info.full_name
  train, validation = _records(builder, "train"), _records(builder, "validation")
  assert len(train) == 48 and len(validation) == 10 and not set(train) & set(validation)
  assert builder.info.features["label"].num_classes == NUM_CLASSES
  assert sorted(_records(synthetic_builder(make_cfg("shapes", data_dir=str(tmp_path / "again"))), "train")) == \
      sorted(train)
  other = synthetic_builder(make_cfg("shapes", generation_seed=1))
  assert other.data_dir != builder.data_dir and set(_records(other, "train")).isdisjoint(train)
  # Example i does not depend on the split size.
  assert set(train) <= set(_records(synthetic_builder(make_cfg("shapes", num_examples=60)), "train"))


# --- image batches -------------------------------------------------------------


def test_batches_follow_the_contract_and_match_the_stored_examples(make_cfg):
  cfg = make_cfg("shapes")
  assert data.modality(cfg) == "image" and data.num_classes(cfg) == 18 and data.vocab_size(cfg) == 259
  assert data.modality(make_cfg("mqar")) == "text" and data.num_classes(make_cfg("mqar")) == 0
  tok = data.get_tokenizer(cfg)
  batch = next(data.build_iterator(cfg, split="train", seq_len=64, batch_size=8, seed=0, train=True))
  _check_batch(batch, 8, 32, 64)
  assert np.all(batch["weights"] == 1)
  stored = {(img, label): caption for img, label, caption in _records(synthetic_builder(cfg), "train")}
  for i in range(8):
    pixels = np.rint((batch["image"][i] + 1) * 127.5).astype(np.uint8)
    caption = stored[(pixels.tobytes(), int(batch["label"][i]))]
    text = batch["text"][i]
    n = len(caption) + 2
    assert text[0] == tok.bos_id and text[n - 1] == tok.eos_id and np.all(text[n:] == tok.pad_id)
    assert tok.decode(text) == caption.decode()


def test_eval_is_one_pass_over_every_example_with_zero_padding_rows(make_cfg):
  cfg = make_cfg("shapes")
  a = list(data.build_iterator(cfg, split="validation", seq_len=64, batch_size=4, seed=0, train=False))
  b = list(data.build_iterator(cfg, split="validation", seq_len=64, batch_size=4, seed=9, train=False))
  assert len(a) == 3 and all(_equal(x, y) for x, y in zip(a, b))
  for batch in a:
    _check_batch(batch, 4, 32, 64)
  last = a[-1]
  assert list(last["weights"]) == [1, 1, 0, 0]
  for k in KEYS:
    assert not last[k][2:].any(), k  # padding rows are all zero
  rows = _rows(a)
  assert len(rows) == len(set(rows)) == 10
  stored = {(img, label) for img, label, _ in _records(synthetic_builder(cfg), "validation")}
  assert {(np.rint((np.frombuffer(img, np.float32) + 1) * 127.5).astype(np.uint8).tobytes(), label)
          for img, label, _ in rows} == stored


def test_host_shards_are_disjoint_and_cover_the_data(make_cfg):
  cfg = make_cfg("shapes")
  run = lambda **kw: _rows(data.build_iterator(cfg, split="train", seq_len=64, batch_size=5, seed=0, train=False, **kw))
  everything = run()
  shards = [run(shard_index=i, shard_count=3) for i in range(3)]
  assert sum(map(len, shards)) == len(everything) == 48
  assert set().union(*map(set, shards)) == set(everything)
  for i, shard in enumerate(shards):
    it = data.build_iterator(cfg, split="train", seq_len=64, batch_size=4, seed=1, train=True, shard_index=i,
                             shard_count=3)
    assert set(_rows(_take(it, 8))) == set(shard)  # 32 draws from 16 examples, every epoch whole


@pytest.mark.parametrize("train,read_threads", [(True, 2), (False, 0)])
def test_resumed_iterator_yields_exactly_the_same_next_batches(make_cfg, train, read_threads):
  cfg = make_cfg("shapes", read_threads=read_threads, num_eval_examples=30)
  kwargs = dict(split="train" if train else "validation", seq_len=64, batch_size=3, seed=7, train=train)
  it = data.build_iterator(cfg, **kwargs)
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = data.build_iterator(cfg, **kwargs)
  resumed.set_state(state)
  assert all(_equal(a, b) for a, b in zip(_take(resumed, 4), expected))
  assert not _equal(first[0], expected[0])
  other = data.build_iterator(make_cfg("shapes", read_threads=read_threads, num_eval_examples=30,
                                       image_size=24), **kwargs)
  with pytest.raises(ValueError, match="image_size: saved 32, now 24"):
    other.set_state(state)


def test_training_order_depends_on_the_seed_and_repeats(make_cfg):
  cfg = make_cfg("shapes")
  first = lambda seed: next(data.build_iterator(cfg, split="validation", seq_len=64, batch_size=4, seed=seed,
                                                train=True))
  assert _equal(first(3), first(3)) and not _equal(first(3), first(4))
  it = data.build_iterator(cfg, split="validation", seq_len=64, batch_size=4, seed=0, train=True)
  rows = _rows(_take(it, 10))
  assert len(rows) == 40 and len(set(rows)) == 10


def test_captions_longer_than_seq_len_and_bad_fields_are_errors_naming_them(make_cfg):
  cfg = make_cfg("shapes")
  # The longest caption at max_objects=2: 'a small yellow triangle right of a small yellow triangle', + bos/eos.
  with pytest.raises(ValueError, match=r"data\.shapes\.max_objects=2.* 58 tokens.*seq_len=57"):
    data.build_iterator(cfg, split="train", seq_len=57, batch_size=2, seed=0, train=True)
  data.build_iterator(cfg, split="train", seq_len=58, batch_size=2, seed=0, train=True)
  # Without captions any seq_len does.
  batch = next(data.build_iterator(make_cfg("shapes", caption_key=""), split="train", seq_len=2, batch_size=2,
                                   seed=0, train=True))
  assert not batch["text"].any()
  with pytest.raises(ValueError, match=r"data\.shapes\.max_objects=9"):
    data.build_iterator(make_cfg("shapes", shapes={"max_objects": 9}), split="train", seq_len=64, batch_size=2,
                        seed=0, train=True)
  with pytest.raises(ValueError, match=r"data\.image_size=0"):
    data.build_iterator(make_cfg("shapes", image_size=0), split="train", seq_len=64, batch_size=2, seed=0,
                        train=True)
  with pytest.raises(ValueError, match=r"data\.caption_key='text'.*caption"):
    data.build_iterator(make_cfg("shapes", caption_key="text"), split="train", seq_len=64, batch_size=2, seed=0,
                        train=True)


def test_image_size_resizes_the_generated_images(make_cfg):
  batch = next(data.build_iterator(make_cfg("shapes", image_size=16), split="validation", seq_len=64,
                                   batch_size=2, seed=0, train=False))
  _check_batch(batch, 2, 16, 64)


# --- resizing ------------------------------------------------------------------


def test_resize_keeps_flat_images_flat_and_crops_the_centre():
  flat = np.full((37, 50, 3), 90, np.uint8)
  out = images.to_model_input(flat, 16)
  assert out.shape == (16, 16, 3) and np.allclose(out, 90 / 127.5 - 1, atol=1e-5)
  # Same height: a plain centre crop, exact.
  wide = np.zeros((8, 16, 3), np.uint8)
  wide[:, 4:12] = 200
  np.testing.assert_allclose(images.resize_and_centre_crop(wide, 8), 200.0, atol=1e-4)
  # Shrinking 2x, the triangle filter is 4 source pixels wide (weights 1/8, 3/8, 3/8, 1/8):
  # a 2x2-block image comes back as the original blurred by (1/8, 3/4, 1/8) along each axis.
  small = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.float32)
  back = images.resize_and_centre_crop(np.kron(small, np.ones((2, 2, 1), np.float32)), 8)
  k = np.array([0.125, 0.75, 0.125])
  expected = sum(k[a] * k[b] * small[a:a + 6, b:b + 6] for a in range(3) for b in range(3))
  np.testing.assert_allclose(back[1:-1, 1:-1], expected, atol=1e-3)
  grey = images.to_rgb(np.arange(6, dtype=np.uint8).reshape(2, 3))
  assert grey.shape == (2, 3, 3) and np.all(grey[..., 0] == grey[..., 2])
  assert images.to_rgb(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)


@pytest.mark.parametrize("h,w,size,resized", [(40, 60, 20, (20, 30)), (37, 50, 16, (16, 22)),
                                               (500, 375, 224, (299, 224)), (20, 30, 45, (45, 68))])
def test_resize_matches_pil_bilinear_then_centre_crop(h, w, size, resized):
  pil = pytest.importorskip("PIL.Image")
  image = np.random.default_rng(1).integers(0, 256, (h, w, 3)).astype(np.uint8)
  ours = images.resize_and_centre_crop(image, size)
  theirs = np.asarray(pil.fromarray(image).resize(resized[::-1], pil.BILINEAR), np.float32)
  top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
  # PIL rounds to uint8; noise images are the hardest case for any mismatch in sampling positions.
  assert np.abs(ours - theirs[top:top + size, left:left + size]).max() <= 1.0 + 1e-3


# --- tfds:<name> image datasets --------------------------------------------------


def _png(image):
  """A PNG file of an RGB uint8 image, written by hand: tfds needs PIL to encode one."""
  h, w, _ = image.shape
  raw = b"".join(b"\x00" + image[i].tobytes() for i in range(h))
  chunk = lambda tag, body: (struct.pack(">I", len(body)) + tag + body
                             + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _tiny_image(i):
  image = np.zeros((6 + i % 3, 9, 3), np.uint8)
  image[...] = (10 * (i % 25), 100, 200)
  return image


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Five to seven images of different sizes, as an image classification / captioning dataset would store them."""

  name = "tiny_images"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
        "grey": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
        "png": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        "caption": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(7), "test": self._generate_examples(5, start=100)}

  def _generate_examples(self, count, start=0):
    for i in range(start, start + count):
      yield i, {"image": _tiny_image(i), "grey": np.full((4, 4, 1), i, np.uint8), "png": _png(_tiny_image(i)),
                "label": i % 3, "caption": f"image number {i}",
                "captions": {"text": [f"first of {i}", f"second of {i}"]}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
  TinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare(file_format="array_record")
  return data_dir


def _tiny(make_cfg, tiny_dir, **overrides):
  return make_cfg("tfds:tiny_images", data_dir=tiny_dir, eval_split="test", **overrides)


def _all(cfg, **kw):
  return list(data.build_iterator(cfg, split="test", seq_len=24, batch_size=2, seed=0, train=False, **kw))


def test_tfds_image_dataset_yields_image_batches(make_cfg, tiny_dir):
  cfg = _tiny(make_cfg, tiny_dir, image_size=6)
  assert data.modality(cfg) == "image" and data.num_classes(cfg) == 3
  batches = _all(cfg)
  assert len(batches) == 3
  for batch in batches:
    _check_batch(batch, 2, 6, 24)
  rows = [(int(b["label"][i]), b["image"][i]) for b in batches for i in np.flatnonzero(b["weights"])]
  assert sorted(label for label, _ in rows) == sorted(i % 3 for i in range(100, 105))
  for label, image in rows:
    # Flat colours survive resizing exactly; the red channel tells which image it was.
    i = 100 + int(round((image[0, 0, 0] + 1) * 127.5 / 10))
    assert label == i % 3
    np.testing.assert_allclose(image, np.broadcast_to(_tiny_image(i)[0, 0] / 127.5 - 1, image.shape), atol=1e-5)
  assert not batches[-1]["text"].any()  # no caption_key: no captions
  tok = data.get_tokenizer(cfg)
  captioned = _all(_tiny(make_cfg, tiny_dir, image_size=6, caption_key="caption"))
  texts = {tok.decode(b["text"][i]) for b in captioned for i in np.flatnonzero(b["weights"])}
  assert texts == {f"image number {i}" for i in range(100, 105)}
  nested = _all(_tiny(make_cfg, tiny_dir, image_size=6, caption_key="captions/text"))
  texts = {tok.decode(b["text"][i]) for b in nested for i in np.flatnonzero(b["weights"])}
  assert texts == {f"first of {i}" for i in range(100, 105)}
  # Outside captions longer than seq_len are cut, not an error.
  cut = list(data.build_iterator(_tiny(make_cfg, tiny_dir, image_size=6, caption_key="caption"), split="test",
                                 seq_len=5, batch_size=2, seed=0, train=False))
  assert {tok.decode(b["text"][i]) for b in cut for i in np.flatnonzero(b["weights"])} == {"imag"}
  unlabelled = _all(_tiny(make_cfg, tiny_dir, image_size=6, label_key=""))
  assert data.num_classes(_tiny(make_cfg, tiny_dir, label_key="")) == 0
  assert all(np.all(b["label"][b["weights"] > 0] == -1) for b in unlabelled)
  grey = _all(_tiny(make_cfg, tiny_dir, image_key="grey"))
  assert grey[0]["image"].shape == (2, 4, 4, 3)


def test_tfds_image_settings_are_checked_before_reading(make_cfg, tiny_dir, monkeypatch):
  def fails(match, error=ValueError, **overrides):
    with pytest.raises(error, match=match):
      _all(_tiny(make_cfg, tiny_dir, **overrides))

  fails(r"tiny_images.*\?x\?.*set data\.image_size")  # sizes vary
  fails(r"data\.label_key='fine_label'.*\['caption', 'captions/text', 'grey', 'image', 'label', 'png'\]",
        image_size=6, label_key="fine_label")
  fails(r"data\.caption_key='captions'.*expected a Text", image_size=6, caption_key="captions")
  fails(r"data\.label_key='grey'.*expected a ClassLabel", image_size=6, label_key="grey")
  # With image_key='' the dataset is read as text, which it has none of.
  assert data.modality(_tiny(make_cfg, tiny_dir, image_key="")) == "text"
  fails(r"data\.text_key='text' is not a feature", image_key="")
  monkeypatch.setattr(sources, "can_decode_images", lambda: False)
  fails(r"data\.image_key='png'.*PIL or OpenCV: pip install pillow", ImportError, image_key="png", image_size=6)


def test_tfds_png_images_decode_like_raw_ones(make_cfg, tiny_dir):
  if not sources.can_decode_images():
    pytest.skip("neither PIL nor OpenCV is installed")
  raw = _all(_tiny(make_cfg, tiny_dir, image_size=6))
  png = _all(_tiny(make_cfg, tiny_dir, image_size=6, image_key="png"))
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(raw, png))


@pytest.mark.parametrize("name", ["tfds:cifar10", "tfds:coco_captions"])
def test_missing_tfds_image_dataset_is_a_one_line_error(make_cfg, name):
  cfg = make_cfg(name)
  for call in (lambda: data.build_iterator(cfg, split="train", seq_len=16, batch_size=2, seed=0, train=True),
               lambda: data.modality(cfg), lambda: data.num_classes(cfg)):
    with pytest.raises(FileNotFoundError) as err:
      call()
    assert "\n" not in str(err.value) and f"data.name={name!r}" in str(err.value)
    assert "download_and_prepare" in str(err.value)
