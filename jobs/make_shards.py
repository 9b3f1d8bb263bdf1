"""Write WebDataset shards from an ImageFolder tree, a CSV, or synthetic data.

    python jobs/make_shards.py --folder /data/imagenette/train --output s3://bucket/imagenette/train --max-count 1000
    python jobs/make_shards.py --csv labels.csv --output shards/ --max-size 200MB
    python jobs/make_shards.py --synthetic 2000 --size 64 --output shards/synth --prefix train
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from l2r import storage  # noqa: E402
from l2r.shards import make_shards  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="ImageFolder root: one sub-folder per class")
    source.add_argument("--csv", help="CSV of path,label (paths relative to the CSV)")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic samples with masks")
    parser.add_argument("--size", type=int, default=32, help="synthetic image size (pixels)")
    parser.add_argument("--num-classes", type=int, default=10, help="synthetic classes")
    parser.add_argument("--output", required=True, help="output folder or fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-0000.tar")
    parser.add_argument("--max-count", type=int, default=5000, help="samples per shard (0: no limit)")
    parser.add_argument("--max-size", default=None, help="bytes per shard, e.g. 200MB or 64MiB")
    parser.add_argument("--seed", type=int, default=0, help="sample order (and synthetic content)")
    parser.add_argument("--storage-options", default=None, help="JSON options for the fsspec filesystem")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    options = json.loads(args.storage_options) if args.storage_options else None
    filesystem = storage.filesystem_for(args.output, options)
    shards = make_shards(
        args.output,
        folder=args.folder,
        csv_file=args.csv,
        synthetic=args.synthetic,
        size=args.size,
        num_classes=args.num_classes,
        prefix=args.prefix,
        max_count=args.max_count or None,
        max_size=args.max_size,
        seed=args.seed,
        filesystem=filesystem,
        progress=not args.no_progress,
    )
    print(f"wrote {len(shards)} shards: {shards[0]} .. {shards[-1]}")


if __name__ == "__main__":
    main()
