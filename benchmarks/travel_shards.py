"""Shards small enough to travel to a lent GPU machine (64 MiB a device call, wheels and code included).

Every sample stays in its place (the position rule of `data.holdout_every` selects the same photos), its
photo re-encoded as the centre square the jobs decode anyway: shorter side image_size / crop_pct
(183 px for 160 px at 0.875), JPEG quality --quality. Object masks are dropped unless --masks
(training does not read them). `--max-count N` keeps the first N samples of a shard (a validation
shard of which training reads only the first val.images rows).

    python benchmarks/travel_shards.py --output .gpudata ../shared/data/imagenet-sample/val-0000.tar \
        '../shared/data/duts/train-{0000..0011}.tar'

Each shard lands at <output>/<its folder's name>/<its file name>. The last line is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2r.images import _open_image  # noqa: E402
from l2r.shard_reader import expand_urls  # noqa: E402

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def centre_square(data: bytes, side: int, quality: int, what: str) -> bytes:
    image = _open_image(data, what).convert("RGB")
    scale = side / min(image.size)
    width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - side) // 2, (height - side) // 2
    out = io.BytesIO()
    image.crop((left, top, left + side, top + side)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def travel_shard(source: Path, target: Path, side: int, quality: int, masks: bool, max_count: int) -> int:
    """Write the re-encoded copy of one shard; returns how many samples it holds."""
    keys = []
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as archive, tarfile.open(target, "w") as out:
        for member in archive:
            if not member.isreg():
                continue
            key, _, suffix = member.name.partition(".")
            if key not in keys[-1:]:
                if max_count and len(keys) == max_count:
                    break
                keys.append(key)
            data = archive.extractfile(member).read()
            if suffix == "mask.png" and not masks:
                continue
            name = member.name
            if "." + suffix.lower() in PHOTO_SUFFIXES:
                data, name = centre_square(data, side, quality, f"{source}:{member.name}"), f"{key}.jpg"
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), member.mtime
            out.addfile(info, io.BytesIO(data))
    return len(keys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard specs (files, globs, brace patterns)")
    p.add_argument("--output", required=True)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--masks", action="store_true", help="keep the .mask.png members")
    p.add_argument("--max-count", type=int, default=0, help="samples per shard (0: all)")
    args = p.parse_args(argv)
    side = round(args.image_size / args.crop_pct)
    written = {}
    for url in expand_urls(args.shards):
        source = Path(url)
        target = Path(args.output) / source.parent.name / source.name
        count = travel_shard(source, target, side, args.quality, args.masks, args.max_count)
        written[str(target)] = {"samples": count, "bytes": target.stat().st_size}
        print(f"{target}: {count} samples, {target.stat().st_size / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    total = sum(v["bytes"] for v in written.values())
    print(json.dumps({"side": side, "quality": args.quality, "shards": written, "total_mib": round(total / 2**20, 1)}))


if __name__ == "__main__":
    main()
