"""Distributed (masked region, noun) pair mining on Ray Data (OVSeg section 3.2).

Pipeline, one row per image::

    from_items(images of the shards still to do)
      -> map_batches(prepare_images)            tasks: caption nouns (nltk), read + decode image
      -> map_batches(ProposalStage)              actor pool 1: MaskFormer -> masks at image size
      -> map_batches(MatchingStage)              actor pool 2: masked CLIP, noun -> best mask
      -> driver: collects finished shards, writes each one atomically

Every image leaves the pipeline as exactly one row, with its pairs or its error (missing or
corrupt image, caption without nouns, no valid proposal, ...): bad input never stops the run.

Output layout (local folder or ``s3://`` prefix)::

    OUT/pairs/shard-00000.parquet     PAIR_SCHEMA rows of the shard's images
    OUT/errors/shard-00000.parquet    ERROR_SCHEMA rows ("<reason code>: <detail>")
    OUT/shards/shard-00000.json       commit marker, written last, with the shard's counts
    OUT/manifest.json                 the settings that determine the output
    OUT/summary.json                  totals over all shards, wall time, images/s of this run
    OUT/ray_data_stats.txt            Ray Data's stats of the last run (both actor pools)

Resume and idempotence: deterministic per-shard output names, not Ray Data's checkpointing.
A shard counts as done when its marker exists; a re-run skips done shards and redoes the others,
overwriting whatever a crashed run left of them under the same names, so each pair is written
exactly once. Each file is a single atomic write (rename locally, one PUT on S3). Ray Data's
built-in checkpointing (``DataContext.checkpoint_config``) does not fit this job: it needs an id
column that is unique per output row and survives every operator, but mining turns one image into
zero or many pair rows plus rows of a second (errors) table; it commits per write task, so an
image whose rows straddle two write tasks can be marked done with half its pairs lost; and an
image that yields no pair would never be checkpointed and would be recomputed on every resume.
``manifest.json`` makes a re-run with different output-changing settings fail instead of mixing.

Loading runs as its own task operator: its memory reservation (``load_memory_mb``) keeps Ray Data
from fusing it into the proposal actors, which it does for operators with identical resource
requests.

``fail_after_shards`` stops the run with :class:`InjectedFailure` after that many shards were
committed: a crash switch for testing resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..data import storage
from ..data.coco import CocoCaptions, Shard
from ..data.pair_store import OutputLayout
from .config import MiningConfig
from .stages import MatchingStage, ProposalStage, ShardCollector, load_model_config, prepare_images, reason_code

logger = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by ``fail_after_shards``: simulates a crash part-way through a run."""


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class MiningResult:
    summary: dict[str, Any]
    stats: str = ""  # Ray Data's stats of this run ("" when every shard was already done)
    shards_written: list[int] = field(default_factory=list)

    def summary_line(self) -> str:
        s = self.summary
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_reason"].items())) or "none"
        return (f"mined {s['pairs']} pairs ({s['unique_nouns']} unique nouns) from {s['images_with_pairs']} of "
                f"{s['images_in']} images in {s['shards']} shards ({s['shards_skipped']} already done) in "
                f"{s['wall_time_s']:.1f}s ({s['images_per_s']:.2f} images/s); {s['errors']} errors ({errors}) "
                f"-> {s['output']}")


@dataclass(frozen=True)
class PoolPlan:
    """An actor pool as it will be requested from Ray (GPUs resolved on the driver)."""

    name: str
    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int

    def describe(self) -> str:
        return (f"{self.name}: {self.min_actors}-{self.max_actors} actors, {self.num_cpus:g} CPU + "
                f"{self.num_gpus:g} GPU each, batches of {self.batch_size} images")


def plan_pools(config: MiningConfig) -> tuple[PoolPlan, PoolPlan]:
    """Resolve ``num_gpus: auto`` against the cluster and check that the pools can start.

    The minimum actors of both pools plus one loading task must fit the cluster at once, or Ray
    Data would wait forever for resources that never free up.
    """
    from ..raycluster import check_capacity, resolve_num_gpus

    pools = tuple(
        PoolPlan(name, stage.min_actors, stage.max_actors, stage.num_cpus, resolve_num_gpus(stage.num_gpus),
                 stage.batch_size)
        for name, stage in (("ProposalStage", config.proposals), ("MatchingStage", config.matching))
    )
    need_cpus = sum(p.min_actors * p.num_cpus for p in pools) + config.load_num_cpus
    need_gpus = sum(p.min_actors * p.num_gpus for p in pools)
    what = (f"the actor pools (proposals {pools[0].min_actors} x {pools[0].num_cpus:g} CPU + "
            f"{pools[0].num_gpus:g} GPU, matching {pools[1].min_actors} x {pools[1].num_cpus:g} CPU + "
            f"{pools[1].num_gpus:g} GPU, plus {config.load_num_cpus:g} CPU for a loading task)")
    try:
        check_capacity(need_cpus, need_gpus, what, "lower proposals/matching num_cpus (fractions are fine), "
                       "num_gpus or min_actors")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return pools


def build_pipeline(config: MiningConfig, shards: list[Shard], threshold: float,
                   pools: tuple[PoolPlan, PoolPlan]):
    """The lazy Ray Data dataset of the shards' images, one output row per image."""
    import ray.data

    from ..raycluster import items_dataset

    items = [{"shard": shard.index, "image_id": image.image_id, "image_uri": image.uri,
              "captions": list(image.captions)} for shard in shards for image in shard.images]
    ds = items_dataset(items, min(config.proposals.batch_size, config.matching.batch_size))
    # The memory reservation also keeps Ray Data from fusing loading into the proposal actors (it
    # fuses operators whose resource requests are identical), so images decode on spare CPUs in
    # parallel with the models rather than inside the proposal actors.
    ds = ds.map_batches(
        prepare_images, batch_size=None, batch_format="pyarrow", num_cpus=config.load_num_cpus,
        memory=config.load_memory_mb * 2**20 or None,
        fn_kwargs={"compounds": config.nouns.compounds, "extra_blocklist": list(config.nouns.extra_blocklist),
                   "max_image_pixels": config.max_image_pixels},
    )
    stages = (
        (ProposalStage, config.proposals, {"threshold": threshold, "min_pixels": config.min_mask_pixels}),
        (MatchingStage, config.matching, {"min_score": config.min_score}),
    )
    for (stage_cls, stage, extra), pool in zip(stages, pools):
        kwargs = {"preset": stage.preset, "weights": stage.weights, "seed": config.seed, "precision": stage.precision,
                  "device": "cuda" if pool.num_gpus > 0 else "cpu", "threads": int(pool.num_cpus), **extra}
        ds = ds.map_batches(
            stage_cls, batch_size=pool.batch_size, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.num_gpus, num_cpus=pool.num_cpus,
        )
    return ds


def _verbose_stats(ds) -> str:
    """``ds.stats()`` with Ray Data's extra per-operator metrics (actor counts of each pool)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = context.verbose_stats_logs
    context.verbose_stats_logs = True
    try:
        return ds.stats()
    finally:
        context.verbose_stats_logs = previous


def summarize(layout: OutputLayout, dataset: CocoCaptions, num_shards: int, skipped: int,
              processed_images: int, wall_time: float) -> dict[str, Any]:
    """Totals over every committed shard (read back from the Parquet files) plus this run's speed."""
    done = layout.completed_shards()  # listed once: each listing is a round trip on S3
    pairs = layout.read_table("pairs", shards=done, columns=["image_id", "noun"])
    errors = layout.read_table("errors", shards=done, columns=["image_id", "reason"])
    by_reason = Counter(reason_code(r) for r in errors.column("reason").to_pylist())
    return {
        "output": layout.root,
        "images_in": len(dataset),
        "shards": num_shards,
        "shards_done": len(done),
        "shards_skipped": skipped,
        "complete": len(done) >= num_shards,
        "images_with_pairs": len(set(pairs.column("image_id").to_pylist())),
        "pairs": pairs.num_rows,
        "unique_nouns": len(set(pairs.column("noun").to_pylist())),
        "errors": errors.num_rows,
        "errors_by_reason": dict(sorted(by_reason.items())),
        "images_processed": processed_images,
        "wall_time_s": round(wall_time, 3),
        "images_per_s": round(processed_images / wall_time, 3) if wall_time > 0 else 0.0,
    }


@dataclass
class _RunProgress:
    written: list[int] = field(default_factory=list)
    processed: int = 0
    first_output: float | None = None  # perf_counter of the first batch out of the pipeline
    first_batch_rows: int = 0
    last_output: float | None = None

    def steady_rate(self) -> float | None:
        """Images/s after the first batch came out (start-up excluded), if more batches followed."""
        if self.first_output is None or self.last_output <= self.first_output:
            return None
        return (self.processed - self.first_batch_rows) / (self.last_output - self.first_output)


def _collect_and_write(ds, collector: ShardCollector, layout: OutputLayout, config: MiningConfig,
                       progress: _RunProgress) -> None:
    """Driver loop: stream the pipeline's rows, write every shard as soon as its last image is in."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            progress.last_output = time.perf_counter()
            if progress.first_output is None:
                progress.first_output, progress.first_batch_rows = progress.last_output, batch.num_rows
            for row in batch.to_pylist():
                shard = collector.add(row)
                progress.processed += 1
                if shard is None:
                    continue
                pairs, errors = collector.pop(shard)
                counts = {"shard": shard.index, "images": len(shard.images), "pairs": pairs.num_rows,
                          "errors": errors.num_rows, "first_image_id": shard.image_ids[0],
                          "last_image_id": shard.image_ids[-1]}
                layout.write_shard(shard, pairs, errors, counts)
                progress.written.append(shard.index)
                logger.info("%s written: %d images, %d pairs, %d errors (%d of %d shards of this run)", shard.name,
                            len(shard.images), pairs.num_rows, errors.num_rows, len(progress.written),
                            len(collector.shards))
                if config.fail_after_shards is not None and len(progress.written) >= config.fail_after_shards:
                    raise InjectedFailure(f"injected failure after {len(progress.written)} shards "
                                          f"(fail_after_shards={config.fail_after_shards})")
    finally:
        batches.close()  # shuts the streaming executor (and its actors) down, on success or failure
    missing = [index for index, left in collector.remaining.items() if left]
    if missing:
        raise RuntimeError(f"the pipeline ended with shards {missing} incomplete; re-run to finish them")


def mine_pairs(config: MiningConfig) -> MiningResult:
    """Run (or resume) mining; Ray must already be initialised (see :func:`ovseg_ray.raycluster.init_ray`)."""
    from .nouns import load_nltk_resources

    start = time.perf_counter()
    load_nltk_resources()  # a missing resource fails here, with the download command, not in a worker
    proposal_preset = load_model_config(config.proposals.preset)
    load_model_config(config.matching.preset)
    threshold = proposal_preset.mask_threshold if config.mask_threshold is None else config.mask_threshold

    dataset = CocoCaptions(config.images, config.captions, config.captions_per_image, config.max_images)
    if len(dataset) == 0:
        raise ValueError(f"captions file {config.captions} lists no images")
    shards = dataset.shards(config.shard_size)
    layout = OutputLayout(config.output)
    layout.check_manifest(config.output_settings(threshold, dataset.fingerprint(), len(dataset)))
    done = layout.completed_shards()
    todo = [shard for shard in shards if shard.index not in done]
    logger.info("%d images in %d shards; %d shards already done, %d to mine", len(dataset), len(shards),
                len(shards) - len(todo), len(todo))

    progress = _RunProgress()
    stats = ""
    if todo:
        pools = plan_pools(config)
        for pool in pools:
            logger.info("actor pool %s", pool.describe())
        ds = build_pipeline(config, todo, threshold, pools)
        _collect_and_write(ds, ShardCollector(todo, config.provenance()), layout, config, progress)
        stats = "".join(f"actor pool {pool.describe()}\n" for pool in pools) + "\n" + _verbose_stats(ds)
        storage.write_text(layout.path("ray_data_stats.txt"), stats)

    summary = summarize(layout, dataset, len(shards), len(shards) - len(todo), progress.processed,
                        time.perf_counter() - start)
    if progress.first_output is not None:
        # Start-up (models loading in the actors) vs the rate once images flow: what a long run sees.
        summary["startup_s"] = round(progress.first_output - start, 3)
        steady = progress.steady_rate()
        summary["steady_images_per_s"] = None if steady is None else round(steady, 3)
    storage.write_text(layout.path("summary.json"), json.dumps(summary, indent=2))
    return MiningResult(summary=summary, stats=stats, shards_written=progress.written)
