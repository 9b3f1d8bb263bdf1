"""The demo end to end (what `bash scripts/demo.sh` runs after installing): train, attribute, report.

    python jobs/demo.py                          # runs under ./runs/demo/
    python jobs/demo.py --storage /tmp/runs --set train.steps=100

A rerun with the same --storage reuses what is done.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import load_config  # noqa: E402
from pipeline.demo import CONFIG, METHODS, run_demo  # noqa: E402
from pipeline.progress import filter_native_stderr  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="runs", help="where the run folder goes (default: ./runs)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of jobs/configs/demo.yaml, e.g. --set train.steps=100")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to compare")
    parser.add_argument("--verbose", action="store_true", help="Ray's own INFO lines too (also L2R_LOG_LEVEL=debug)")
    args = parser.parse_args(argv)
    config = load_config(CONFIG, args.sets, {"storage": args.storage})
    return run_demo(config, methods=tuple(args.methods.split(",")), ray_logs=args.verbose)


if __name__ == "__main__":
    filter_native_stderr("--verbose" in sys.argv)
    main()
