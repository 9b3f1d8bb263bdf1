"""Attribute every image of a set of shards with one or more methods; write Parquet + manifest.json.

    python jobs/attribute.py --shards 'data/test-{0000..0001}.tar' --output runs/attr \\
        --model l2r.zoo.resnet20:resnet20 --checkpoint resnet20.th --input-size 32 \\
        --explainer runs/explainer --methods l2r,gradcam,ig,rise,random --steps 21 --reference black

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/attribute.py \\
        --shards 's3://bucket/imagenet/val-*.tar' --output s3://bucket/attr/run1 ...

A rerun with the same arguments skips finished shards (resume after a crash).
The last line printed is the summary as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from l2r.metrics import TARGET_RULES, Protocol  # noqa: E402
from l2r.perturbation import REFERENCES  # noqa: E402
from l2r.target_spec import TargetSpec  # noqa: E402
from pipeline.attribute import AttributeConfig, all_methods, run_attribution  # noqa: E402
from pipeline.attribute_config import DEVICES, FAST_PATHS, PRECISIONS, defaults  # noqa: E402
from pipeline.progress import filter_native_stderr  # noqa: E402
from l2r.sanity import DEFAULT_STAGES  # noqa: E402

# Every default and choice below is the configuration's own (pipeline.attribute_config, l2r.metrics).
CONFIG = defaults(AttributeConfig)
PROTOCOL = defaults(Protocol)
TARGET = defaults(TargetSpec)


def _floats(text):
    return tuple(float(v) for v in text.split(",")) if text else None


def _size(text):
    if not text:
        return None
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else tuple(parts[:2])


def _target(args, parser) -> TargetSpec | None:
    """The target flags as one TargetSpec; None (no --model): the explainer's own target."""
    fields = dict(checkpoint=args.checkpoint, random_init=args.random_init, background_logit=args.background_logit,
                  kwargs=args.model_kwargs, mean=_floats(args.mean), std=_floats(args.std),
                  input_size=_size(args.input_size), crop_pct=args.crop_pct)
    if args.model is None:
        given = [name for name, value in fields.items() if value != TARGET[name]]
        if given:
            parser.error(f"{', '.join(given)} describe the target model: give --model too "
                         "(without it the target is the one the explainer records)")
        return None
    return TargetSpec(spec=args.model, **fields)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+",
                   help="shard files, folders, globs or brace patterns; local or fsspec URLs")
    p.add_argument("--output", required=True, help="output folder or fsspec URL")
    p.add_argument("--model", help="target spec: timm:NAME or package.module:callable "
                   "(default: the model the explainer was trained for, from its artifact)")
    p.add_argument("--checkpoint", help="target weights file, local or a URL (s3://, gs://, https://); "
                   "for timm:NAME it replaces the pretrained weights")
    p.add_argument("--random-init", action="store_true",
                   help="explain an untrained model on purpose (timm:NAME otherwise means pretrained weights)")
    p.add_argument("--background-logit", action="store_true",
                   help="the model's logit 0 is a background class (TensorFlow ImageNet models): drop it")
    p.add_argument("--allow-target-mismatch", action="store_true",
                   help="use the explainer with a target other than its own (recorded in the manifest)")
    p.add_argument("--model-kwargs", type=json.loads, default=TARGET["kwargs"], metavar="JSON", help="JSON kwargs for the model constructor")
    p.add_argument("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", help="normalisation std")
    p.add_argument("--input-size", help="H,W or one side (needed for a user's model)")
    p.add_argument("--crop-pct", type=float, default=TARGET["crop_pct"], help="centre-crop fraction (timm eval: 0.875)")
    p.add_argument("--explainer", help="explainer artifact folder or URL (model.safetensors + explainer.json), "
                   "or a shipped explainer's name (l2r/explainers/: cifar10-resnet20, cifar10-vit, imagenet-sample-mobilenet)")
    p.add_argument("--methods", default=",".join(CONFIG["methods"]), help=f"comma-separated, from {','.join(all_methods())}")
    p.add_argument("--method-options", type=json.loads, default=CONFIG["method_options"], metavar="JSON", help='JSON per method, e.g. \'{"rise": {"n_masks": 500}}\'')
    p.add_argument("--refine-steps", type=int, default=CONFIG["refine_steps"], help="test-time refinement steps for l2r (0: off)")
    p.add_argument("--steps", type=int, default=PROTOCOL["steps"], help="fractions K of the curves (ends included)")
    p.add_argument("--reference", default=PROTOCOL["reference"], choices=REFERENCES,
                   help="what removed pixels become; impute: ROAD's noisy linear imputation from the kept pixels")
    p.add_argument("--impute-noise", type=float, default=PROTOCOL["impute_noise"], help="noise sigma of the impute reference")
    p.add_argument("--impute-seed", type=int, default=PROTOCOL["impute_seed"], help="seed of the impute reference's noise")
    p.add_argument("--target", default=PROTOCOL["target"], choices=TARGET_RULES, help="class to explain")
    p.add_argument("--sanity-check", type=int, nargs="?", const=DEFAULT_STAGES, default=CONFIG["sanity_stages"], metavar="STAGES",
                   help="model randomisation sanity check: each map also on the target re-initialised from the top "
                        "in STAGES cascading stages (default 3); Spearman correlation per stage in the output")
    p.add_argument("--holdout-every", type=int, default=CONFIG["holdout_every"],
                   help="only the samples a training run with data.holdout_every N held back (1 in N per shard)")
    p.add_argument("--masks", action="store_true",
                   help="read each sample's mask.png (synthetic shards) and add pointing_hit and mask_auroc")
    p.add_argument("--device", default=CONFIG["device"], choices=DEVICES)
    p.add_argument("--actors", type=int, help="actor pool size (default: one per GPU, or one per CPU)")
    p.add_argument("--actor-cpus", type=float, help="CPUs per actor (fractions allowed)")
    p.add_argument("--actor-gpus", type=float, default=CONFIG["actor_gpus"], help="GPUs per actor")
    p.add_argument("--actor-resources", type=json.loads, default=CONFIG["actor_resources"], metavar="JSON",
                   help='custom Ray resources per actor, to place actors on chosen nodes, e.g. \'{"gpu_node": 1}\'')
    p.add_argument("--threads", type=int, help="torch threads per actor")
    p.add_argument("--batch-size", type=int, help="images per actor call (default CPU 64, 16 above 64x64 px; GPU 256)")
    p.add_argument("--forward-batch", type=int, help="perturbed images per target forward (CPU 64, 16 above 64x64 px; GPU 1024)")
    p.add_argument("--precision", default=CONFIG["precision"], choices=PRECISIONS,
                   help="bf16: autocast the model passes (GPU fast path); recorded in the manifest")
    p.add_argument("--fast-path", default=CONFIG["fast_path"], choices=("auto", *FAST_PATHS),
                   help="how actors run the target for predictions and curves (auto: the measured default per device)")
    p.add_argument("--read-cpus", type=float, default=CONFIG["read_cpus"], help="CPUs per shard read task")
    p.add_argument("--storage-options", help="JSON options for the fsspec filesystem of URL inputs/outputs")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --output and start over")
    p.add_argument("--progress-interval", type=float, default=CONFIG["progress_interval"], help="seconds between progress lines")
    p.add_argument("--ray-progress", action="store_true", help="show Ray Data's progress bars")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local instance)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    config = AttributeConfig(
        shards=args.shards if len(args.shards) > 1 else args.shards[0],
        output=args.output,
        target=_target(args, parser),
        allow_target_mismatch=args.allow_target_mismatch,
        explainer=args.explainer,
        methods=args.methods,
        method_options=args.method_options,
        refine_steps=args.refine_steps,
        protocol=Protocol(steps=args.steps, reference=args.reference, target=args.target,
                          impute_noise=args.impute_noise, impute_seed=args.impute_seed),
        with_mask=args.masks,
        sanity_stages=args.sanity_check,
        holdout_every=args.holdout_every,
        device=args.device,
        actors=args.actors,
        actor_cpus=args.actor_cpus,
        actor_gpus=args.actor_gpus,
        actor_resources=args.actor_resources,
        fast_path=args.fast_path,
        threads=args.threads,
        batch_size=args.batch_size,
        forward_batch=args.forward_batch,
        precision=args.precision,
        read_cpus=args.read_cpus,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
        overwrite=args.overwrite,
        progress_interval=args.progress_interval,
        ray_progress_bars=args.ray_progress,
        address=args.address,
    )
    summary = run_attribution(config)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    filter_native_stderr("--verbose" in sys.argv)
    main()
