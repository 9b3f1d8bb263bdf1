"""Train an explainer with Ray Train.

    python jobs/train.py --config jobs/configs/demo.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --config jobs/configs/cifar10.yaml --workers 2 --storage /abs/runs \\
        --set data.train=/abs/shared/data/cifar10/train-*.tar --set objective.chunk_size=512

Precedence: defaults < --config YAML < --set key.sub=value (repeatable) < explicit flags.
Relative paths resolve against the current directory (under `ray job submit` that is the
uploaded copy of the working dir: give data, checkpoints and --storage as absolute paths
or URLs). A rerun with the same --storage and --name resumes from the last checkpoint.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.train import run  # noqa: E402
from pipeline.progress import filter_native_stderr  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (jobs/configs/*.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set objective.chunk_size=256")
    parser.add_argument("--workers", type=int, help="Ray Train workers (run.workers)")
    parser.add_argument("--gpus", action="store_const", const=True, help="one GPU per worker, bf16 autocast (run.gpus)")
    parser.add_argument("--storage", help="run storage: local folder or s3://bucket/prefix (run.storage)")
    parser.add_argument("--storage-options", type=json.loads, metavar="JSON",
                        help="fsspec options for the storage, data and checkpoint URLs, e.g. credentials or "
                             "endpoint_url (run.storage_options; never written to the run's files)")
    parser.add_argument("--name", help="run name; a rerun with the same name resumes (default: the config's)")
    parser.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    parser.add_argument("--batch-size", type=int, help="images per worker per step (train.batch_size)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (train.checkpoint_every)")
    parser.add_argument("--val-every", type=int, help="steps between exact held-out AUCs (val.every)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own INFO lines too (also L2R_LOG_LEVEL=debug); default: warnings and errors")
    args = parser.parse_args(argv)
    flags = {k: getattr(args, k) for k in ("name", "workers", "gpus", "storage", "storage_options", "steps", "batch_size",
                                           "checkpoint_every", "val_every")}
    try:
        config = load_config(args.config, args.sets, flags)
    except (ConfigError, FileNotFoundError) as e:  # one line naming the key or file, not a traceback
        sys.exit(f"error: {e}")
    return run(config, ray_logs=args.verbose)


if __name__ == "__main__":
    filter_native_stderr("--verbose" in sys.argv)
    main()
