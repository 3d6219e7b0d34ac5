"""Datasets and input pipelines of the one train loop: tfds builders (ArrayRecord, no TensorFlow) + grain.

Entry points
------------
    build_iterator(data_cfg, *, split, seq_len, batch_size, seed, train, shard_index=0, shard_count=1)
    modality(data_cfg) -> 'text' | 'image'   # which batch format build_iterator yields
    num_classes(data_cfg) -> int             # label values of an image dataset; 0 = no labels
    vocab_size(data_cfg) -> int              # token ids of the text (documents, or captions)
    get_tokenizer(data_cfg)   # encode, decode, vocab_size, pad_id, bos_id, eos_id
    default_data_config(name) -> ml_collections.ConfigDict
    eval_probe_config(task, *, seq_len, data_dir=None)   # a synthetic recall probe sized to seq_len

Datasets (`data.name`)
----------------------
    pydoc_text          CPython's documentation topics, English text, built offline from the
                        running interpreter (splits train / validation). The default corpus.
    mqar                multi-query associative recall (Zoology), as byte text      } synthetic,
    passkey             pass key in filler text (needle in a haystack), byte text   } splits train /
    selective_copy      letters among noise, copied after a marker (Mamba), bytes  } validation
    shapes              images of 1..max_objects coloured circles/squares/triangles with a
                        label (shape x colour of the largest object: 18 classes, chance
                        1/18) and a caption ('a small red circle left of a large blue
                        square'); generated, splits train / validation (builders/shapes)
    tfds:<name>         any tfds dataset prepared as array_record in data.data_dir, e.g.
                        tfds:lm1b, tfds:wikitext/wikitext-103-raw-v1, tfds:c4/en:3.1.0, or an
                        image dataset: tfds:cifar10, tfds:imagenet2012, tfds:coco_captions;
                        never downloaded at run time (a clear error says how to prepare it)

A tfds:<name> dataset is an image dataset when it has the feature data.image_key;
then batches are image batches (below). Encoded (PNG/JPEG) images need PIL or
OpenCV installed to decode; a dataset storing raw uint8 tensors needs neither.

Our datasets are built lazily on first use into data.data_dir (once; concurrent
processes wait on a lock and the result appears with one atomic rename) and
read back with `builder.as_data_source(split)`.

Config fields (`data.*`; every config has all of them, see config.py)
--------------------------------------------------------------------
    name               str    one of the names above
    data_dir           str    where tfds datasets live; default $ATTENTION_ZOO_DATA_DIR or
                              ~/.cache/attention_zoo/tfds ('' means that default too)
    tokenizer          str    'bytes' (pad 0, bos 1, eos 2, byte b -> b+3; 259 ids) or the path of
                              a SentencePiece .model or Hugging Face tokenizer.json file.
                              Synthetic tasks require 'bytes'.
    text_key           str    the text feature of a tfds:<name> dataset ('text')
    train_split        str    split name the loop trains on ('train')
    eval_split         str    split name the loop evaluates on ('validation'; lm1b has 'test')
    packing            bool   pack several documents/examples per row; None (default) = True for
                              text, False for synthetic tasks so per-row metrics are per example
    add_bos, add_eos   bool   wrap each text document in the tokenizer's bos/eos (True, True)
    shuffle_window     int    training only: shuffle packed rows in windows of this many rows,
                              so rows cut from one long document spread over batches;
                              None (default) = 128 for text, 0 (off) for synthetic tasks
    read_threads       int    grain reader threads (2; 0 reads in the calling thread)
    num_examples       int    synthetic: examples in the train split (20000)
    num_eval_examples  int    synthetic: examples in the validation split (1000)
    generation_seed    int    synthetic: seed of the examples themselves (0); the `seed`
                              argument of build_iterator only orders them
    mqar.num_pairs, mqar.num_queries, mqar.key_length, mqar.value_length   (16, 16, 2, 2)
    passkey.length (tokens per example, 1024), passkey.depth (0..1, <0 = random; 0.5)
    selective_copy.num_tokens (16), selective_copy.length (tokens per example, 256)
    shapes.image_size (32, >= 24), shapes.max_objects (2, 1..4), shapes.noise (std of the
                       background noise as a fraction of 255; 0.03)
    image_key          str    images: the image feature ('image'); '' reads a tfds dataset as text
    label_key          str    images: the integer/ClassLabel label feature ('label'; '' = none,
                              then `label` is -1)
    caption_key        str    images: the caption Text feature; nested features by path
                              ('captions/text' for coco_captions, first caption of several);
                              None (default) = 'caption' for shapes, none for tfds:<name>;
                              '' = none (then `text` is all padding)
    image_size         int    images: side of the square images yielded; the shorter side is
                              resized to it and the longer centre-cropped; None (default) =
                              as stored (images stored at one square size only)

Each setting of a synthetic task or of shapes (its sub-config, num_examples,
num_eval_examples, generation_seed) is its own tfds config, in its own directory.

Batches
-------
`build_iterator` yields dicts of numpy arrays, each [batch_size, seq_len]
(batch_size is the per-host batch):

    inputs       int32    token ids; pad id (0 for bytes) where nothing is packed
    targets      int32    inputs shifted left by one *within each segment*; pad on the last token
                          of each segment and on padding
    segment_ids  int32    1, 2, ... per document/example in the row; 0 on padding
    positions    int32    0, 1, ... within each segment (a continuation of a document cut at a
                          row end starts again at 0)
    weights      float32  loss weight of predicting targets: 0 on padding and on the last token of
                          each segment; text: 1 elsewhere; synthetic tasks: 1 only where the
                          target is an answer token

Image datasets (modality 'image') yield instead

    image        float32  [batch_size, S, S, 3], RGB scaled to [-1, 1] (S: data.image_size,
                          or the stored size; grey repeated to RGB, alpha dropped)
    label        int32    [batch_size]; -1 when the dataset has no labels
    text         int32    [batch_size, seq_len]: the caption as bos, tokens, eos (data.add_bos,
                          data.add_eos), then pad id (0 for bytes); all pad without captions
    weights      float32  [batch_size]: 1 for real examples, 0 for padding rows

shapes' captions are never cut: a caption longer than seq_len is an error
naming the data.shapes settings; captions of tfds:<name> datasets longer than
seq_len are cut to seq_len.

Documents longer than a row are cut and continue in the next row, which
starts with the last token of the previous piece, so every next-token pair
of a document is trained exactly once. Synthetic examples are never cut; if
a task's settings give examples longer than seq_len that is an error naming
the settings.

train=True: shuffled by seed, repeated forever (reshuffled every epoch).
train=False: one deterministic pass in storage order; the last batch is
padded with all-zero rows (weight 0; text rows hold the pad id). Host shards
of an eval split can hold different numbers of batches.

The iterator has `get_state()` / `set_state(state)`: the state is JSON,
and a new iterator built with the same arguments and given a saved state
yields exactly the batches the old one would have yielded next.
"""

from __future__ import annotations

from zoo.data.config import default_data_config, eval_probe_config
from zoo.data import config as _config
from zoo.data import pipeline as _pipeline
from zoo.data import sources as _sources


def build_iterator(data_cfg, *, split: str, seq_len: int, batch_size: int, seed: int, train: bool,
                   shard_index: int = 0, shard_count: int = 1):
  """Returns an iterator (with get_state()/set_state()) over dicts of numpy arrays, each [batch_size, seq_len].

  (Image datasets: image, label, text, weights instead; see the module docstring.)

  inputs int32, targets int32 (inputs shifted by one within each document),
  segment_ids int32 (>=1 for real tokens, 0 for padding), positions int32
  (position within its document, restarting at 0 per segment), weights
  float32 (loss weight: 0 on padding and on the last token of each document,
  and for synthetic tasks 1 only where the target is an answer token).
  train=True: shuffled by seed, repeated forever. train=False: one
  deterministic pass, last batch padded with weight-0 rows.
  """
  return _pipeline.build_iterator(data_cfg, split=split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                  train=train, shard_index=shard_index, shard_count=shard_count)


def get_tokenizer(data_cfg):
  """The tokenizer `data_cfg` names: encode(str)->list[int], decode(list[int])->str, vocab_size, pad/bos/eos ids."""
  return _pipeline.get_tokenizer(_config.complete(data_cfg))


def vocab_size(data_cfg) -> int:
  """Number of token ids the model's embedding and output layers need for this data (text or captions)."""
  return int(get_tokenizer(data_cfg).vocab_size)


def modality(data_cfg) -> str:
  """'image' when `build_iterator` yields image batches (image, label, text, weights), else 'text'.

  For tfds:<name> it reads the prepared dataset's features (not its records),
  so a missing dataset is reported here, before any model is built.
  """
  return _sources.modality(_config.complete(data_cfg))


def num_classes(data_cfg) -> int:
  """Number of label values of an image dataset (shapes: 18); 0 when it has none (text, data.label_key='')."""
  return _sources.num_classes(_config.complete(data_cfg))


def class_names(data_cfg) -> list:
  """Names of the label values (shapes: 'red circle', ...), e.g. for zero-shot text prompts."""
  return _sources.class_names(_config.complete(data_cfg))


__all__ = ["build_iterator", "class_names", "default_data_config", "eval_probe_config",
           "get_tokenizer", "modality", "num_classes", "vocab_size"]
