"""``torchrun -m cxrembed encode``: each rank encodes its share into a shard; rank 0 joins.

Every rank selects the same images and takes a contiguous share of them, cut at whole
batches (so every batch is the batch one process would encode, and the vectors are the
same). Its share goes into ``STORE.h5.shard-R-of-W.h5``, an ordinary store of those rows,
written and resumed exactly as a one-process encode writes and resumes a store. When a
shard is complete its rank writes ``...shard-R-of-W.h5.done`` and is finished. Rank 0,
once its own shard is done, waits for every marker, joins the shards into ``STORE.h5``
(:func:`cxrembed.store.join.join_stores`), builds the index and removes the shards.
The shard files, markers and the wait are :mod:`cxrembed.sharding`'s (shared with
``cache``).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from cxrembed import sharding
from cxrembed.distributed import Launch, rank_share
from cxrembed.errors import ConfigError, StoreError
from cxrembed.sharding import done_path, shard_path

log = logging.getLogger(__name__)

#: True while encode_dataset runs for one shard (it must not shard again).
IN_SHARD: ContextVar[bool] = ContextVar("cxrembed_in_shard", default=False)


def encode_shards(options: dict[str, Any], here: Launch) -> Any:
    """Run :func:`~cxrembed.encode.pipeline.encode_dataset` (called with ``options``) as
    rank ``here.rank`` of a sharded encode; rank 0 returns the joined store's result, the
    others their shard's (with ``shard`` set). Every rank must see ``out``'s folder on one
    shared file system: rank 0 waits for the others' shards and markers there."""
    from cxrembed.encode.pipeline import EncodeResult, _check_options, select_rows

    out = Path(options["out"])
    if options["append"]:
        raise ConfigError("encode --append runs in one process: run it without torchrun")
    batch_size = options["batch_size"]
    _check_options(out, batch_size, options["index"], options["resume"],
                   options["overwrite"])
    dataset = options["dataset"]
    rows = select_rows(dataset, options["splits"], options["limit"])
    start, stop = rank_share(len(rows), here.world_size, here.rank, batch_size)
    shard = shard_path(out, here.rank, here.world_size)
    marker = done_path(shard)

    def check() -> str | None:  # rank 0, before any rank starts its shard
        if options["overwrite"]:
            _remove_joined(out)
        else:
            _refuse_other_world_shards(out, here.world_size)
        return sharding.joined_state(out, thing="store", one_process="encode",
                                     error=StoreError)

    joined = sharding.agree_on_start(here, marker, check, StoreError)
    if joined == "complete":  # rank 0 checks it (and builds a missing index), alone
        if not here.main:
            return EncodeResult(out, None, 0, 0, 0, 0.0, 0.0)
        token = IN_SHARD.set(True)
        try:
            from cxrembed.encode.pipeline import encode_dataset

            return encode_dataset(**options)
        finally:
            IN_SHARD.reset(token)
    encoder = _load_checked(options, dataset)
    began = time.perf_counter()
    result = EncodeResult(out, None, 0, 0, 0, 0.0, 0.0)
    if stop > start:
        log.info("%s: rows %d-%d of %d into %s", here, start, stop - 1, len(rows), shard)
        token = IN_SHARD.set(True)
        try:
            result = _encode_part(options, dataset.subset(rows[start:stop]), shard, encoder,
                                  here)
        finally:
            IN_SHARD.reset(token)
    sharding.write_marker(marker, here, stop - start,
                          result.to_dict() if stop > start else None)
    if not here.main:
        result.shard = str(shard) if stop > start else None
        return result
    shards = sharding.wait_for_shards(out, here.world_size, StoreError)
    return _join_and_index(options, out, shards, encoder.fingerprint, began)


def _refuse_other_world_shards(out: Path, world_size: int) -> None:
    """Shards left by a sharded encode with another number of processes cover other rows:
    they can only be continued by that number, or removed (--overwrite)."""
    sharding.refuse_other_world_shards(out, world_size, what="encode", resume=" --resume",
                                       error=StoreError)


def _load_checked(options: dict, dataset: Any) -> Any:
    """The encoder, loaded once the cheap checks have passed; an adapted run's data
    identity is checked on the whole dataset (a shard is only part of it)."""
    encoder = options["encoder"]
    if callable(encoder) and not hasattr(encoder, "encode_image"):
        encoder = encoder()
    if getattr(encoder, "run", None) and not options["allow_other_data"]:
        from cxrembed.model.run_state import check_run_data

        check_run_data(encoder.run, dataset)
    return encoder


def _encode_part(options: dict, part: Any, shard: Path, encoder: Any, here: Launch) -> Any:
    from cxrembed.encode.pipeline import encode_dataset

    return encode_dataset(
        part, shard, encoder, pixel_cache=options["pixel_cache"],
        batch_size=options["batch_size"], resume=options["resume"],
        overwrite=options["overwrite"], prompts=options["prompts"], index=None,
        workers=options["workers"], chunk_rows=options["chunk_rows"],
        progress=options["progress"] and here.main, allow_other_data=True,
        skip_bad=options["skip_bad"])


def _join_and_index(options: dict, out: Path, shards: list[dict], fingerprint: dict,
                    began: float) -> Any:
    """Join the shards into ``out`` (finished as any store is), build the index, remove
    the shards; the result adds up the shards'."""
    from cxrembed.encode.pipeline import EncodeResult, _build_index

    world = len(shards)
    parts = [shard_path(out, s["rank"], world) for s in shards if s["rows"]]
    results = [s["result"] for s in shards if s["result"] is not None]
    join_began = time.perf_counter()
    attrs = finish_joined(out, parts, fingerprint, {"selection": {
        "splits": list(options["splits"]) if options["splits"] else None,
        "limit": options["limit"]}})
    join_seconds = time.perf_counter() - join_began
    for r in range(world):
        shard_path(out, r, world).unlink(missing_ok=True)
    sharding.remove_markers(out, world)
    log.info("joined %d shards into %s in %.1f s", len(parts), out, join_seconds)
    built = _build_index(out, options["index"], options["progress"], options["centre"])
    seconds = time.perf_counter() - began
    encoded = sum(r["encoded"] for r in results)
    timed = [r["stage_seconds"] for r in results if r["stage_seconds"]]
    stages = {k: round(sum(t[k] for t in timed), 4) for k in ("read", "infer", "write")}
    return EncodeResult(
        out, built, int(attrs["num_rows"]), encoded, sum(r["resumed_from"] for r in results),
        seconds, encoded / max(seconds, 1e-9), stages if timed else {},
        attrs.get("embedding_health"), [x for r in results for x in r["skipped"]],
        decode_bound=any(r["decode_bound"] for r in results),
        search_centring=attrs.get("search_centring"),
        shards=[dict(r, rank=s["rank"]) for s, r in zip(shards, results)],
        join_seconds=round(join_seconds, 3))


def finish_joined(out: Path, parts: list[Path], fingerprint: dict, attrs: dict) -> dict:
    """Join ``parts`` into ``STORE.h5.joining``, finish it as an encode finishes a store
    (health and search figures over all its rows, then the complete flag) and rename it
    to ``out``; returns its attributes."""
    import os

    from cxrembed.encode.output import remove_store_files
    from cxrembed.encode.pipeline import _centring, _health
    from cxrembed.store import StoreWriter
    from cxrembed.store.join import join_stores

    joining = out.with_name(out.name + ".joining")
    join_stores(joining, parts, attrs)
    try:
        writer = StoreWriter.resume(joining, fingerprint=fingerprint)
        with writer:
            writer.finish({"embedding_health": _health(writer), **_centring(writer)})
            finished = writer.attrs
        remove_store_files(out)
        os.replace(joining, out)
    except BaseException:
        joining.unlink(missing_ok=True)
        raise
    return finished


def _remove_joined(out: Path) -> None:
    """``--overwrite``: the store, its index and every shard of any earlier sharded run."""
    from cxrembed.encode.output import remove_store_files

    remove_store_files(out)
    sharding.remove_all_shards(out)
