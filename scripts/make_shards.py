"""Pack a folder of images into webdataset shards with captions attached.

    python scripts/make_shards.py IMAGES/ data/openimages/train-%06d.tar --captions captions.tsv

Captions come from a captions file (JSON ``{name or stem: caption}`` or
``name<TAB>caption`` lines); images without one are stored without a ``txt`` field and
train with the null text.
"""

from __future__ import annotations

import argparse
import sys

from perco.data import write_shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("pattern", help="shard names, e.g. out/train-%%06d.tar")
    parser.add_argument("--captions", help="captions file")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    try:
        n = write_shards(args.folder, args.pattern, args.captions, args.max_count)
    except (OSError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} samples to {args.pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
