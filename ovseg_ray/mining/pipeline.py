"""Distributed (masked region, noun) pair mining on Ray Data (OVSeg section 3.2).

Pipeline, one row per image::

    coco: from_items(images of the shards still to do)    parquet / webdataset: Ray Data's
      |                                                   read_parquet / read_webdataset of the
      |                                                   files of those shards -> items (tasks)
      -> map_batches(prepare_images)            tasks: caption nouns (nltk), decode image
      -> map_batches(ProposalStage)              actor pool 1: MaskFormer -> masks at image size
      -> map_batches(MatchingStage)              actor pool 2: masked CLIP, noun -> best mask
      -> map_batches(write_parts)                tasks: each batch's rows as part files per shard
      -> driver: (shard, images, part) counts only; commit tasks merge a shard's parts once all
         its images are in (a file shard's size is counted by a worker task, alongside)

Every image leaves the pipeline as exactly one row, with its pairs or its error (missing or
corrupt image, caption without nouns, no valid proposal, ...): bad input never stops the run. A
whole input file that is not a readable Parquet/tar stops it with a one-line error naming the file
(the shards committed so far are kept).

The output layout and commit protocol are :mod:`ovseg_ray.data.pair_store`'s; the part files and
commits are :mod:`ovseg_ray.mining.shards`'. Resume and idempotence: deterministic per-shard output
names, not Ray Data's checkpointing. A shard counts as done when its marker exists; a re-run skips
done shards and redoes the others, so each pair is written exactly once. Ray Data's built-in
checkpointing (``DataContext.checkpoint_config``) does not fit this job: it needs an id column that
is unique per output row and survives every operator, but mining turns one image into zero or many
pair rows plus rows of a second (errors) table; it commits per write task, so an image whose rows
straddle two write tasks can be marked done with half its pairs lost; and an image that yields no
pair would never be checkpointed and would be recomputed on every resume. ``manifest.json`` makes
a re-run with different output-changing settings fail instead of mixing.

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
from dataclasses import dataclass

from ..config import ConfigError
from ..data import storage
from ..data.image_text import UnreadableInput, count_images
from ..data.pair_store import OutputLayout
from .config import MiningConfig
from .shards import commit_shard, write_parts
from .sources import (InputPlan, ShardPlan, coco_items, parquet_items, plan_input, strip_scheme,
                      webdataset_items)
from .stages import MatchingStage, ProposalStage, load_model_config, prepare_images
from .summary import InjectedFailure, MiningInterrupted, MiningResult, RunProgress, summarize

__all__ = ["InjectedFailure", "MiningInterrupted", "MiningResult", "PoolPlan", "mine_pairs", "plan_pools"]

logger = logging.getLogger(__name__)

COUNTS_IN_FLIGHT = 8  # file shards being counted at once (small tasks, 0 CPUs: never wait on the pools)
WRITE_NUM_CPUS = 0.05  # the part-writing tasks: IO, a few milliseconds per batch


@dataclass(frozen=True)
class PoolPlan:
    """An actor pool as it will be requested from Ray (GPUs resolved on the driver)."""

    name: str
    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    initial_actors: int | None = None
    max_tasks_in_flight_per_actor: int | None = None

    def strategy(self):
        """Ray Data's ``ActorPoolStrategy`` of the pool."""
        import ray.data

        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                          initial_size=self.initial_actors,
                                          max_tasks_in_flight_per_actor=self.max_tasks_in_flight_per_actor)

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
                 stage.batch_size, stage.initial_actors, stage.max_tasks_in_flight_per_actor)
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


def _arrow_filesystem(files: list[str]):
    """The files for Ray Data's readers: s3:// through our s3fs settings (AWS_* variables), wrapped
    for pyarrow; local paths as they are."""
    if not files or not storage.is_remote(files[0]):
        return None, files
    import pyarrow.fs

    fs, _ = storage.filesystem(files[0])
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), [strip_scheme(f) for f in files]


def read_items(config: MiningConfig, plan: InputPlan, todo: list[ShardPlan], batch_size: int):
    """The lazy dataset of the items of the shards still to do (:data:`ITEM_SCHEMA` rows)."""
    import ray.data

    from ..raycluster import items_dataset

    if config.format == "coco":
        return items_dataset(coco_items(plan, todo, config.shard_size), batch_size)
    files = [file for shard in todo for file in shard.files]
    shard_of = {strip_scheme(file): (shard.index, file) for shard in todo for file in shard.files}
    filesystem, paths = _arrow_filesystem(files)
    columns = config.columns
    if config.format == "parquet":
        wanted = list(dict.fromkeys(c for c in (columns.image, columns.caption, columns.key) if c))
        ds = ray.data.read_parquet(paths, filesystem=filesystem, include_paths=True).select_columns([*wanted, "path"])
        convert, kwargs = parquet_items, {"image_column": columns.image, "caption_column": columns.caption,
                                          "key_column": columns.key, "images_root": config.images}
    else:
        ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None, include_paths=True)
        convert, kwargs = webdataset_items, {"caption_field": columns.caption,
                                             "image_extensions": list(columns.image_extensions)}
    return ds.map_batches(convert, batch_format="pyarrow", num_cpus=config.load_num_cpus,
                          fn_kwargs={"shard_of": shard_of, "captions_per_image": config.captions_per_image, **kwargs})


def build_pipeline(config: MiningConfig, plan: InputPlan, todo: list[ShardPlan], threshold: float,
                   pools: tuple[PoolPlan, PoolPlan], output: str):
    """The lazy Ray Data dataset of the shards' images, one small count row per part file written."""
    import ray.data

    context = ray.data.DataContext.get_current()
    for name, value in config.autoscaling.ray_data_settings().items():
        setattr(context.autoscaling_config, name, value)
    batch_size = min(config.proposals.batch_size, config.matching.batch_size)
    ds = read_items(config, plan, todo, batch_size)
    # The memory reservation also keeps Ray Data from fusing loading into the proposal actors (it
    # fuses operators whose resource requests are identical), so images decode on spare CPUs in
    # parallel with the models rather than inside the proposal actors.
    ds = ds.map_batches(
        prepare_images, batch_size=batch_size, batch_format="pyarrow", num_cpus=config.load_num_cpus,
        memory=config.load_memory_mb * 2**20 or None,
        fn_kwargs={"compounds": config.nouns.compounds, "extra_blocklist": list(config.nouns.extra_blocklist),
                   "max_image_pixels": config.max_image_pixels},
    )
    stages = (
        (ProposalStage, config.proposals, {"threshold": threshold, "min_pixels": config.min_mask_pixels}),
        (MatchingStage, config.matching, {"min_score": config.min_score, "filters": config.filters.model_dump()}),
    )
    for (stage_cls, stage, extra), pool in zip(stages, pools):
        kwargs = {"preset": stage.preset, "weights": stage.weights, "seed": config.seed, "precision": stage.precision,
                  "device": "cuda" if pool.num_gpus > 0 else "cpu", "threads": int(pool.num_cpus), **extra}
        ds = ds.map_batches(
            stage_cls, batch_size=pool.batch_size, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
            compute=pool.strategy(),
            num_gpus=pool.num_gpus, num_cpus=pool.num_cpus,
        )
    return ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow", num_cpus=WRITE_NUM_CPUS,
                          fn_kwargs={"output": output})


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


def count_shard(files: tuple[str, ...]) -> int | str:
    """Worker task: the images of a file shard, or the one-line reason its input is unreadable."""
    try:
        return sum(count_images(file) for file in files)
    except UnreadableInput as exc:
        return str(exc)


class ShardCommitter:
    """Driver side of the commit protocol: per-shard counts only (images seen, part names, size).

    A file shard's size comes from a counting task started here; a shard whose images are all in
    is committed by a worker task (:func:`commit_shard`)."""

    def __init__(self, todo: list[ShardPlan], layout: OutputLayout, provenance: dict[str, str],
                 config: MiningConfig, progress: RunProgress):
        import ray

        self.plans = {shard.index: shard for shard in todo}
        self.expected = {shard.index: shard.expected for shard in todo}
        self.seen = dict.fromkeys(self.plans, 0)
        self.parts: dict[int, list[str]] = {index: [] for index in self.plans}
        self.to_count = [shard for shard in todo if shard.expected is None]
        self.counting: dict = {}  # ObjectRef -> shard index
        self.committing: dict = {}
        self.layout, self.provenance, self.config, self.progress = layout, provenance, config, progress
        self._count = ray.remote(num_cpus=0)(count_shard)
        self._commit = ray.remote(num_cpus=0, max_retries=3)(commit_shard)
        self.poll()

    def add(self, shard: int, images: int, part: str) -> None:
        if shard not in self.expected:
            raise RuntimeError(f"{images} images arrived for shard {shard}, which is not being mined or is complete")
        expected = self.expected[shard]
        if expected is not None and self.seen[shard] + images > expected:
            raise RuntimeError(f"{images} more images arrived for shard {shard} than its {expected}")
        self.seen[shard] += images
        self.parts[shard].append(part)
        self.progress.batch_out(images)

    def poll(self, wait: bool = False) -> None:
        """Take in finished counts and commits, start new ones; ``wait`` blocks for at least one."""
        import ray

        while self.to_count and len(self.counting) < COUNTS_IN_FLIGHT:
            shard = self.to_count.pop(0)
            self.counting[self._count.remote(shard.files)] = shard.index
        pending = [*self.counting, *self.committing]
        if pending:
            done, _ = ray.wait(pending, num_returns=1 if wait else len(pending), timeout=None if wait else 0)
            for ref in done:
                if ref in self.counting:
                    self._counted(self.counting.pop(ref), ray.get(ref))
                else:
                    self._committed(self.committing.pop(ref), ray.get(ref))
        for index in [i for i, n in self.expected.items() if n is not None and self.seen[i] == n]:
            self._start_commit(index)

    def _counted(self, index: int, result: int | str) -> None:
        if isinstance(result, str):
            raise UnreadableInput(f"{result}; the {len(self.progress.written)} shards committed by this run are "
                                  f"kept: fix or remove the file, then re-run")
        self.expected[index] = result

    def _start_commit(self, index: int) -> None:
        plan = self.plans[index]
        del self.expected[index]  # committing: never started twice
        ref = self._commit.remote(self.layout.root, index, self.parts.pop(index), self.provenance, plan.marker())
        self.committing[ref] = index
        if self.config.fail_after_shards is not None:  # testing: commits one at a time, for a precise crash
            import ray

            self._committed(self.committing.pop(ref), ray.get(ref))

    def _committed(self, index: int, counts: dict) -> None:
        self.progress.written.append(index)
        logger.info("shard %d committed: %d images, %d pairs, %d errors (%d of %d shards of this run)", index,
                    counts["images"], counts["pairs"], counts["errors"], len(self.progress.written), len(self.plans))
        limit = self.config.fail_after_shards
        if limit is not None and len(self.progress.written) >= limit:
            raise InjectedFailure(f"injected failure after {len(self.progress.written)} shards "
                                  f"(fail_after_shards={limit})")

    def finish(self) -> None:
        """After the stream: wait for the last counts and commits; every shard must be complete."""
        while self.counting or self.committing or self.to_count:
            self.poll(wait=True)
        missing = {i: f"{self.seen[i]} of {n}" for i, n in self.expected.items()}
        if missing:
            raise RuntimeError(f"the pipeline ended with shards incomplete ({missing} images); re-run to finish them")


def _stream(ds, committer: ShardCommitter) -> None:
    """Driver loop: the pipeline's count rows in, commits out."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            for row in batch.to_pylist():
                committer.add(row["shard"], row["images"], row["part"])
            committer.poll()
    except Exception:
        # A reader failing on a damaged file: report the file if its count names it.
        deadline = time.time() + 60
        while committer.counting and time.time() < deadline:
            committer.poll(wait=True)
        raise
    finally:
        batches.close()  # shuts the streaming executor (and its actors) down, on success or failure
    committer.finish()


def mine_pairs(config: MiningConfig) -> MiningResult:
    """Run (or resume) mining; Ray must already be initialised (see :func:`ovseg_ray.raycluster.init_ray`)."""
    from .nouns import load_nltk_resources

    start = time.perf_counter()
    layout = OutputLayout(config.output)
    layout.check_output()
    load_nltk_resources()  # a missing resource fails here, with the download command, not in a worker
    proposal_preset = load_model_config(config.proposals.preset)
    load_model_config(config.matching.preset)
    threshold = proposal_preset.mask_threshold if config.mask_threshold is None else config.mask_threshold

    plan = plan_input(config)
    settings = config.output_settings(threshold, plan.fingerprint, plan.size)
    layout.check_manifest(settings)
    done = layout.completed_shards()
    todo = [shard for shard in plan.shards if shard.index not in done]
    logger.info("%d shards (%s); %d already done, %d to mine", len(plan.shards),
                f"{plan.size} images" if config.format == "coco" else f"{plan.size} files",
                len(plan.shards) - len(todo), len(todo))

    progress = RunProgress(started=start)
    stats = ""
    pools = plan_pools(config) if todo else ()
    layout.write_manifest(settings)  # only once the run can start: a refused run leaves no trace
    if todo:
        for pool in pools:
            logger.info("actor pool %s", pool.describe())
        ds = build_pipeline(config, plan, todo, threshold, pools, layout.root)
        try:
            _stream(ds, ShardCommitter(todo, layout, config.provenance(), config, progress))
        except KeyboardInterrupt:
            # counted on storage: a worker may have committed a shard the driver has not heard of yet
            committed = set(layout.completed_shards())
            raise MiningInterrupted(len(committed), len(plan.shards), len(committed - set(done)),
                                    layout.root) from None
        stats = "".join(f"actor pool {pool.describe()}\n" for pool in pools) + "\n" + _verbose_stats(ds)
        storage.write_text(layout.path("ray_data_stats.txt"), stats)

    summary = summarize(layout, plan.images, len(plan.shards), len(plan.shards) - len(todo), progress,
                        time.perf_counter() - start)
    storage.write_text(layout.path("summary.json"), json.dumps(summary, indent=2))
    return MiningResult(summary=summary, stats=stats, shards_written=progress.written)
