"""tfds builders that build offline into ArrayRecord (no TensorFlow, no download).

One package per dataset, because tfds looks for a builder's metadata next to
its module and fails for a builder defined in a bare `.py` file
(STACK-NOTES.md, "tfds without TensorFlow"); each builder also returns its
`DatasetInfo` directly, so no metadata files are needed at all.

- `pydoc_text`: the CPython documentation topics (English text).
- `mqar`, `passkey`, `selective_copy`: synthetic recall tasks in the byte
  vocabulary, one tfds config per setting (see `synthetic.py`).
- `shapes`: generated images of coloured shapes with a label and a caption;
  a `synthetic.Task` too (settings, config names, per-example seeds), with
  its own features.

`preparation.prepare` builds any of them lazily, once, into a data_dir.
"""
