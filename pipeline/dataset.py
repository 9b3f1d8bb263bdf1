"""The jobs' Ray Data reader of WebDataset shards: one Ray task per shard, rows as `l2r.shard_reader` makes them."""

from __future__ import annotations

from l2r.shard_reader import expand_urls, read_shard_batches, size_pair


def read_shards(
    urls: str | list[str],
    image_size,
    crop_pct: float = 1.0,
    with_mask: bool = False,
    filesystem=None,
    num_cpus: float = 1.0,
    rows_per_batch: int = 256,
    holdout_every: int = 0,
    part: str = "all",
):
    """A streaming ``ray.data.Dataset`` of decoded rows (columns: ``l2r.shard_reader``'s docstring).

    ``holdout_every`` and ``part`` select one side of the train/holdout rule (``l2r.shard_reader.in_part``).

    ``urls`` is anything ``expand_urls`` accepts. One Ray task reads one shard
    (``num_cpus`` each; use a fraction on small machines so consumers are not
    starved). ``filesystem`` is an fsspec filesystem (e.g. ``s3fs`` with a custom
    endpoint); by default it is inferred from each URL.
    """
    import ray

    shard_urls = expand_urls(urls, filesystem)
    items = ray.data.from_items([{"url": u} for u in shard_urls], override_num_blocks=len(shard_urls))
    return items.map_batches(
        read_shard_batches,
        batch_size=1,
        batch_format="numpy",
        num_cpus=num_cpus,
        fn_kwargs=dict(
            image_size=size_pair(image_size),
            crop_pct=crop_pct,
            with_mask=with_mask,
            filesystem=filesystem,
            rows_per_batch=rows_per_batch,
            holdout_every=int(holdout_every),
            part=part,
        ),
    )
