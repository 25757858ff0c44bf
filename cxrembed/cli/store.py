"""Store commands: ``encode``, ``index``, ``search``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from cxrembed.cli.common import (AllowMissingOpt, CsvOpt, DataArg, DeviceOpt, JsonOpt,
                                 NoProgressOpt, ReaderOptions, SplitSeedOpt, StoreArg,
                                 TestListOpt, TrainValListOpt, ValFractionOpt, ViewOpt, app,
                                 console, load_dataset, print_json, reader_options)
from cxrembed.store.index import INDEX_KINDS

if TYPE_CHECKING:
    from cxrembed.encode import EncodeResult

CentreOpt = Annotated[str, typer.Option(
    "--centre", "--center", help="Centre vectors for search (subtract the store's mean, "
    "re-normalise): auto (as the figure measured on the store at encode time decides), on, "
    "or off.")]


@app.command()
@reader_options
def encode(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Store file to write.")] = Path("store.h5"),
    model: Annotated[Optional[str], typer.Option(
        "--model", help="open_clip architecture (default ViT-B-32; the run's with --checkpoint).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        "--pretrained", help="Weights: open_clip tag (default openai), local file, or none.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="An adapted run folder (`cxrembed adapt`): its encoder and head.")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        "--pixel-cache", "--cache", help="Pixel cache of DATA (`cxrembed cache`); PNGs are decoded without.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")] = 64,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted store.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
    append: Annotated[bool, typer.Option(
        "--append", help="Add the images of DATA the finished store lacks, after its rows "
        "(same encoder; its index extended; rerun to continue).")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Encode only the first N images.")] = None,
    split: Annotated[Optional[list[str]], typer.Option(
        "--split", help="Encode only this split (repeat for several): train, val, test.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="JSON file of prompts: {label: [positive, negative]} and/or "
        "{\"templates\": ...} (see cxrembed.prompts).")] = None,
    index: Annotated[str, typer.Option(
        "--index", help=f"FAISS index to build at the end: {', '.join(INDEX_KINDS)} or none.")] = "flat",
    workers: Annotated[int, typer.Option("--workers", help="Threads reading ahead of the model.")] = 2,
    device: DeviceOpt = "auto",
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow weights files that need pickle (only files you trust).")] = False,
    csv: CsvOpt = None,
    train_val_list: TrainValListOpt = None,
    test_list: TestListOpt = None,
    view: ViewOpt = "all",
    val_fraction: ValFractionOpt = 0.1,
    split_seed: SplitSeedOpt = 7,
    allow_missing: AllowMissingOpt = False,
    allow_other_data: Annotated[bool, typer.Option(
        "--allow-other-data", help="With --checkpoint: encode data split unlike the run's "
        "(refused otherwise: its val/test could hold images the run trained on).")] = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Leave out unreadable images (listed in the output and the "
        "store) instead of stopping at the first.")] = False,
    centre: CentreOpt = "auto",
    no_progress: NoProgressOpt = False,
    json_out: JsonOpt = False,
    source: ReaderOptions = None,
) -> None:
    """Encode every image once into an HDF5 store (vectors, labels, metadata) + FAISS index."""
    from cxrembed.distributed import launch
    from cxrembed.encode import encode_dataset
    from cxrembed.model import load_encoder

    dataset = load_dataset(data, csv, train_val_list, test_list, view, val_fraction, split_seed,
                           allow_missing, source=source)

    def encoder():  # loaded by encode_dataset once the cheap checks have passed
        return load_encoder(model, pretrained, checkpoint=checkpoint, device=device,
                            trust_pickle=trust_pickle)

    result = encode_dataset(dataset, out, encoder, pixel_cache=cache, batch_size=batch_size,
                            resume=resume, overwrite=overwrite, limit=limit, splits=split,
                            prompts=prompts, index=None if index == "none" else index,
                            workers=workers, progress=not no_progress,
                            allow_other_data=allow_other_data, skip_bad=skip_bad,
                            append=append, centre=centre)
    if launch().rank > 0:
        return  # under torchrun, rank 0 prints the joined store's result
    if json_out:
        print_json(result.to_dict())
        return
    _print_encoded(result)


def _print_encoded(result: "EncodeResult") -> None:
    """The encode's result for a person: skipped images, rows and speed, stage times,
    health and centring."""
    for skipped in result.skipped:
        console.print(f"[yellow]skipped[/] {skipped['image_id']}: {skipped['reason']}",
                      highlight=False, soft_wrap=True)
    done = (f"{result.encoded:,} images encoded in {result.seconds:.1f} s "
            f"({result.images_per_s:,.1f} images/s)")
    if result.resumed_from:
        done += f", {result.resumed_from:,} were already done"
    console.print(f"[green]store[/] {result.store}: {result.rows:,} rows; {done}"
                  + (f"; index {result.index}" if result.index else ""))
    if result.shards:
        console.print(f"{len(result.shards)} torchrun shards joined in "
                      f"{result.join_seconds:.1f} s (times below add up the processes')")
    stages = result.stage_seconds
    if stages:
        console.print(f"time per stage: read (waiting for images) {stages['read']:.1f} s, "
                      f"infer {stages['infer']:.1f} s, write {stages['write']:.1f} s")
    if result.decode_bound:
        console.print("[yellow]decode-bound:[/] the model waited longer for PNG decoding than "
                      "it computed; build the pixel cache first (`cxrembed cache DATA --out "
                      "pixels.h5`) and pass `--pixel-cache pixels.h5`", highlight=False)
    health = result.embedding_health
    if health and health.get("mean_cosine") is not None:
        style = "bold red" if health["collapsed"] else "dim"
        console.print(f"[{style}]embedding health: mean cosine {health['mean_cosine']:.3f}, "
                      f"effective rank {health['effective_rank']:.1f} "
                      f"({health['sample_size']:,} images)[/]")
    centring = result.search_centring
    if centring:
        console.print(f"[dim]search centring: {'centred' if centring['centre'] else 'not centred'}"
                      f" ({centring['why']})[/]", highlight=False)


@app.command("index")
def index_command(
    store: StoreArg,
    kind: Annotated[str, typer.Option("--kind", "--index", help=(
        f"One of {', '.join(INDEX_KINDS)}. Memory per 512-d vector: flat 2,048 bytes, ivf "
        "2,056, hnsw ~1,160, ivfpq and opq 72 (64 PQ codes + an 8-byte id; for 10M+ "
        "vectors, re-ranked from the store)."))] = "flat",
    nlist: Annotated[Optional[int], typer.Option("--nlist", help="ivf: k-means cells.")] = None,
    nprobe: Annotated[Optional[int], typer.Option("--nprobe", help="ivf: cells visited per query.")] = None,
    m: Annotated[Optional[int], typer.Option("--hnsw-m", help="hnsw: links per node.")] = None,
    ef_search: Annotated[Optional[int], typer.Option("--ef-search",
                                                     help="hnsw: candidates per query.")] = None,
    pq_m: Annotated[Optional[int], typer.Option(
        "--pq-m", help="ivfpq/opq: sub-quantizers M, bytes of code per vector at 8 bits "
        "(default D/8: 64 for 512-d).")] = None,
    pq_bits: Annotated[Optional[int], typer.Option("--pq-bits", help="ivfpq/opq: bits per code (8).")] = None,
    rerank: Annotated[Optional[int], typer.Option(
        "--rerank", min=0, help="ivfpq/opq: candidates k' re-scored exactly from the store per "
        "query (default 100; 0: PQ scores only).")] = None,
    gpu: Annotated[Optional[bool], typer.Option(
        "--gpu/--cpu", help="Build on the GPU (default: when faiss-gpu sees one; ivfpq/opq "
        "are sharded over every GPU).")] = None,
    centre: CentreOpt = "auto",
    no_progress: NoProgressOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """(Re)build the FAISS index beside a store: STORE.h5 -> STORE.faiss."""
    from cxrembed.errors import ConfigError
    from cxrembed.store import build_index, load_index
    from cxrembed.store.reader import EmbeddingStore

    pq_kind = kind in ("ivfpq", "opq")
    if (m is not None and pq_kind) or (pq_m is not None and not pq_kind):
        raise ConfigError("--hnsw-m is hnsw's links per node, --pq-m ivfpq/opq's "
                          f"sub-quantizers: give the one of --kind {kind}")
    given = {"nlist": nlist, "nprobe": nprobe, "M": m if pq_m is None else pq_m,
             "nbits": pq_bits, "rerank": rerank, "efSearch": ef_search}
    params = {key: value for key, value in given.items() if value is not None}
    path = build_index(store, kind, params=params, gpu=gpu, progress=not no_progress,
                       centre=centre)
    with EmbeddingStore.open(store) as opened:
        info = load_index(opened).info
    if json_out:
        print_json({"index": path, "kind": kind, "params": params, "centred": info.centred,
                    "bytes_per_vector": info.bytes_per_vector})
        return
    console.print(f"[green]index[/] ({kind}{', centred' if info.centred else ''}) {path} "
                  f"({path.stat().st_size / 2**20:,.1f} MiB, {info.bytes_per_vector:,.0f} "
                  "bytes per vector)")


@app.command("search")
def search_command(
    store: StoreArg,
    image: Annotated[Optional[Path], typer.Option(
        "--image", help="Query with a new image (encoded with the store's own encoder).")] = None,
    image_id: Annotated[Optional[str], typer.Option("--id", help="Query with a stored image id.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Query with text (joint space).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of neighbours.")] = 10,
    split: Annotated[Optional[str], typer.Option("--split", help="Search only train, val or test.")] = None,
    exclude_same_patient: Annotated[bool, typer.Option(
        "--exclude-same-patient", help="Leave out every image of the query's patient.")] = False,
    include_query: Annotated[bool, typer.Option(
        "--include-query", help="Keep a stored query image among its own neighbours.")] = False,
    index: Annotated[str, typer.Option(
        "--index", help="auto (saved index, else exact scan), index, or exact.")] = "auto",
    centre: CentreOpt = "auto",
    rerank: Annotated[Optional[int], typer.Option(
        "--rerank", min=0, help="ivfpq/opq index: candidates re-scored exactly (default: the "
        "index's own, 100).")] = None,
    montage: Annotated[Optional[Path], typer.Option(
        "--montage", help="Save the query and its neighbours as one PNG.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(
        "--data", help="Where the images are now, for --montage (default: where encoded).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Nearest neighbours of an image, a stored image, or a text, with labels and patient."""
    from cxrembed.search import search

    result = search(store, image=image, image_id=image_id, text=text, k=k, split=split,
                    exclude_same_patient=exclude_same_patient, include_query=include_query,
                    index=index, centre=centre, montage=montage, data_root=data_root,
                    index_params=None if rerank is None else {"rerank": rerank})
    if json_out:
        print_json(result.to_dict())
        return
    hits = result.hits
    query = image_id or (str(image) if image is not None else repr(text))
    table = Table(title=f"{len(hits)} nearest to {query}")
    for column, justify in (("#", "right"), ("similarity", "right"), ("image", "left"),
                            ("patient", "right"), ("split", "left"), ("view", "left"),
                            ("labels", "left")):
        table.add_column(column, justify=justify)
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.similarity:.4f}", hit.image_id, str(hit.patient_id),
                      hit.split, hit.view, ", ".join(hit.labels) or "[dim]No Finding[/]")
    console.print(table)
    centring = result.centring
    console.print(f"[dim]similarity: cosine of {'centred' if centring.centred else 'uncentred'} "
                  f"vectors ({centring.reason})[/]", highlight=False)
    if montage is not None:
        console.print(f"[green]montage[/] {montage}")
