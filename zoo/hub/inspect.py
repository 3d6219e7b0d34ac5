"""Print a shared checkpoint's config and parameter tree: `python -m zoo.hub.inspect PATH`.

PATH is a directory written by `zoo.hub.save`; only its metadata is read, so
inspecting a large checkpoint is instant and needs no accelerator.
"""

import sys


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m zoo.hub.inspect PATH   (a checkpoint written by zoo.hub.save)",
          file=sys.stderr)
    return 2
  from zoo.hub.checkpoint import describe
  try:
    print(describe(argv[0]))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
