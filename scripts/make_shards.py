"""Pack a folder of images into webdataset shards with captions attached.

    python scripts/make_shards.py IMAGES/ data/openimages/train-%06d.tar --captions captions.tsv
    python scripts/make_shards.py IMAGES/ data/latents/train-%06d.tar --latents-from tiny --crop 512

Captions come from a captions file (JSON ``{name or stem: caption}`` or
``name<TAB>caption`` lines); images without one are stored without a ``txt`` field and
train with the null text. ``--latents-from`` runs the latent pre-pass instead: centre
crops of ``--crop`` pixels are encoded once by the frozen autoencoder of a PerCo
checkpoint folder, a Stable Diffusion folder or hub id (its ``vae/``), or ``tiny``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perco.data import ImageFolder, write_latent_shards, write_shards


def load_autoencoder(spec: str):
    from perco import PerCo
    from perco.models import SDAutoencoder

    if spec == "tiny":
        from perco.testing import tiny_components

        return tiny_components()["vae"]
    if (Path(spec) / "perco.json").is_file():
        return PerCo.from_pretrained(spec).autoencoder
    return SDAutoencoder.from_pretrained(spec, subfolder="vae")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("pattern", help="shard names, e.g. out/train-%%06d.tar")
    parser.add_argument("--captions", help="captions file")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--latents-from", help="autoencoder for the latent pre-pass")
    parser.add_argument("--crop", type=int, default=512, help="centre-crop size (pre-pass)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        if args.latents_from:
            data = ImageFolder(args.folder, args.crop, args.captions, random_crop=False)
            autoencoder = load_autoencoder(args.latents_from).eval()
            n = write_latent_shards(
                autoencoder, data, args.pattern, args.batch_size, args.max_count
            )
        else:
            n = write_shards(args.folder, args.pattern, args.captions, args.max_count)
    except (OSError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} samples to {args.pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
