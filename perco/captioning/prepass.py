"""``perco-caption``: caption a dataset once, so training and evaluation never run the
captioner twice over the same image.

    perco-caption images/ -o captions.jsonl                 # a folder -> JSON lines
    perco-caption 'shards/train-{0000..0099}.tar' -o captioned/   # shards -> shards + txt
    perco-caption 'shards/train-{0000..0099}.tar' -o captions.jsonl

A folder gives ``{"id": relative path, "caption": ...}`` lines, read back by
:func:`perco.io.read_captions` (so ``data.captions=`` and ``eval.captions=`` take the file).
Shards give either JSON lines keyed by the sample's ``__key__`` or, with an output
folder, a copy of each shard whose samples gain a ``txt`` field.

Resumable: a JSONL file is appended batch by batch (a torn last line from a crash is
dropped on the next run) and ids already in it are skipped; an output shard is written to
a temporary file and renamed when complete, and existing output shards are skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..io import IMAGE_SUFFIXES, atomic_write
from .captioners import Captioner, load_captioner

__all__ = ["caption_folder", "caption_shards", "done_ids", "main"]

log = logging.getLogger(__name__)


def done_ids(path: Path) -> set[str]:
    """Ids already captioned in a JSONL file; a torn last line is cut off the file."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(data):
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - len(keep))
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return {json.loads(line)["id"] for line in keep.decode("utf-8").splitlines() if line}


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _append(out: Path, keys: list[str], captions: list[str | None]) -> None:
    lines = "".join(
        json.dumps({"id": k, "caption": c}, ensure_ascii=False) + "\n"
        for k, c in zip(keys, captions, strict=True)
    )
    with open(out, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def caption_folder(
    captioner: Captioner, root: str | os.PathLike, out: str | os.PathLike, batch_size: int = 8
) -> int:
    """Caption every image under ``root`` (recursively) into ``out`` (JSONL); returns how
    many were captioned by this call."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    todo = [p for p in files if p.relative_to(root).as_posix() not in done]
    log.info("%d images, %d already captioned", len(files), len(files) - len(todo))
    with tqdm(total=len(todo), desc="perco-caption", unit="img") as bar:
        for batch in _batches(todo, batch_size):
            keys = [p.relative_to(root).as_posix() for p in batch]
            images = [Image.open(p).convert("RGB") for p in batch] if captioner.needs_images else []
            _append(out, keys, captioner(images, keys))
            bar.update(len(batch))
    return len(todo)


def _image_field(sample: dict) -> str:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            return ext
    raise ValueError(f"sample {sample.get('__key__')} has no image field")


def caption_shards(
    captioner: Captioner, urls: list[str], out: str | os.PathLike, batch_size: int = 8
) -> int:
    """Caption webdataset shards: into ``out`` as JSONL (``.jsonl``) keyed by ``__key__``,
    or, when ``out`` is a folder, as copies of the shards with a ``txt`` field added."""
    import webdataset as wds

    out = Path(out)
    as_jsonl = out.suffix == ".jsonl"
    done = done_ids(out) if as_jsonl else set()
    if not as_jsonl:
        out.mkdir(parents=True, exist_ok=True)
    count = 0
    for url in tqdm(urls, desc="perco-caption", unit="shard"):
        target = out / Path(url).name
        if not as_jsonl and target.exists():
            continue
        samples = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
        todo = [s for s in samples if s["__key__"] not in done] if as_jsonl else samples
        captions: list[str | None] = []
        for batch in _batches(todo, batch_size):
            keys = [s["__key__"] for s in batch]
            images = [Image.open(io.BytesIO(s[_image_field(s)])) for s in batch]
            caps = captioner(images if captioner.needs_images else [], keys)
            if as_jsonl:
                _append(out, keys, caps)
            captions += caps
        if not as_jsonl:

            def write(tmp: str, todo=todo, captions=captions) -> None:
                with wds.TarWriter(tmp) as sink:
                    for sample, caption in zip(todo, captions, strict=True):
                        sample = {k: v for k, v in sample.items() if k != "__url__"}
                        if caption is not None:
                            sample["txt"] = caption
                        sink.write(sample)

            atomic_write(target, write)
        count += len(todo)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="perco-caption", description="Caption a folder or webdataset shards once."
    )
    parser.add_argument("source", help="an image folder, or shard URLs (brace notation)")
    parser.add_argument("-o", "--out", required=True, help="a .jsonl file, or a folder for shards")
    parser.add_argument(
        "--captioner", default="blip2", help="blip2[:name] | vlm:name | file:path | none"
    )
    parser.add_argument("--prompt", help="prompt for instruction-following models (vlm:)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", help="default: cuda when available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        kwargs = {}
        if args.captioner.startswith(("blip2", "vlm:")):
            kwargs = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
            kwargs["device"] = args.device
            if args.prompt is not None:
                kwargs["prompt"] = args.prompt
        captioner = load_captioner(args.captioner, **kwargs)
        source = Path(args.source)
        if source.is_dir():
            if Path(args.out).suffix != ".jsonl":
                raise ValueError(f"a folder is captioned into a .jsonl file, not {args.out}")
            n = caption_folder(captioner, source, args.out, args.batch_size)
        else:
            from webdataset.shardlists import expand_urls

            urls = expand_urls(args.source)
            missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"no such folder or shard: {missing[0]}")
            n = caption_shards(captioner, urls, args.out, args.batch_size)
    except (OSError, ValueError) as e:
        print(f"perco-caption: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("captioned %d images with %s", n, json.dumps(captioner.settings))


if __name__ == "__main__":
    main()
