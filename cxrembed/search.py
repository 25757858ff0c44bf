"""Similarity search over a store: by stored image id, by a new image, or by text.

Queries and stored vectors are unit vectors in CLIP's joint space; similarity is their
inner product (cosine). The FAISS index beside the store answers when there is one
(exact ``flat`` by default); without one, an exact scan of the store in blocks does.
Filters (split, the query's own patient) are applied inside the search, so ``k`` results
are returned whenever ``k`` images pass them.

Centring (``centre``: auto | on | off; :mod:`cxrembed.store.centring`): stored vectors and
queries alike have the store's mean vector subtracted and are re-normalised; ``auto``
follows the figure measured on the store when it was encoded. The index beside the store
holds vectors in one of the two spaces: a search in the other scans the store exactly
(``--index auto``, with a warning) or is refused (``--index index``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrembed.data.splits import SPLITS
from cxrembed.errors import ConfigError, DataError, StoreError
from cxrembed.montage import save_montage, stored_image_path  # noqa: F401 (re-exported)
from cxrembed.store import (EmbeddingStore, LoadedIndex, check_same_encoder, has_index,
                            load_index, search_index)
from cxrembed.store.centring import CENTRE_CHOICES, Centring, resolve_centring

log = logging.getLogger(__name__)

INDEX_CHOICES = ("auto", "index", "exact")
SCAN_BLOCK = 32_768  # stored rows compared per step of the exact scan
_NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$", re.IGNORECASE)


@dataclass
class Query:
    """What was searched for."""

    kind: str  # "id" | "image" | "text"
    value: str  # the id, image path or text
    vector: np.ndarray  # float32 unit vector (D,)
    row: int | None = None  # the stored row of an "id" query (or an image already stored)
    patient_id: int | None = None  # the query's patient, when known


@dataclass
class SearchHit:
    """One neighbour."""

    rank: int
    row: int
    image_id: str
    patient_id: int
    split: str
    view: str
    sex: str
    age: float | None
    labels: list[str]
    similarity: float

    def to_dict(self) -> dict:
        # Shallow (dataclasses.asdict deep-copies: a tenth of a served query's time).
        return {**vars(self), "labels": list(self.labels)}


@dataclass
class SearchResult:
    """A query, its neighbours, and how similarity was measured (centred or not).

    Iterating over it (or ``len``, ``[i]``) goes over the hits."""

    query: Query
    hits: list[SearchHit]
    centring: Centring

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i: int) -> SearchHit:
        return self.hits[i]

    def to_dict(self) -> dict:
        """What ``cxrembed search --json`` prints and ``/api/search`` answers."""
        return {"query": query_dict(self.query), "centring": self.centring.to_dict(),
                "hits": [hit.to_dict() for hit in self.hits]}


def query_dict(query: Query) -> dict:
    return {"kind": query.kind, "value": query.value, "row": query.row,
            "patient_id": query.patient_id}


# ---------------------------------------------------------------------------------------
# Queries


def query_vector(store: EmbeddingStore, *, image_id: str | None = None,
                 image: str | os.PathLike | None = None, text: str | None = None,
                 encoder: Any = None) -> Query:
    """The unit query vector of exactly one of ``image_id``, ``image`` or ``text``.

    A new image or a text not stored is encoded with the store's own encoder (loaded from
    its record, or ``encoder`` when given: it must have the store's fingerprint).
    """
    given = [flag for flag, v in (("--id", image_id), ("--image", image), ("--text", text))
             if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one query: --id ID, --image PATH or --text TEXT "
                          "(in Python: image_id=, image= or text=); got "
                          f"{' and '.join(given) or 'none'}")
    if image_id is not None:
        row = store.row_of(image_id)
        return Query("id", image_id, store.embeddings([row])[0], row=row,
                     patient_id=int(store.patient_id[row]))
    if text is not None:
        if not text.strip():
            raise ConfigError("--text is empty; give words to search for")
        vector = store.encode_prompts([text], encoder=encoder)[0]  # refuses image-only stores
        return Query("text", text, vector)
    return _image_query(store, Path(image), encoder)


def _image_query(store: EmbeddingStore, path: Path, encoder: Any) -> Query:
    from cxrembed.data.images import IMAGE_SIZE, decode
    from cxrembed.data.transforms import to_clip_tensor

    if not path.is_file():
        raise DataError(f"query image {path} does not exist")
    pixels = decode(path, size=IMAGE_SIZE)  # DataError when it is not an image
    if encoder is None:
        encoder = store.encoder()
    else:
        check_same_encoder(store, encoder, what=(f"store {store.path}", "the encoder given"))
    import torch

    with torch.inference_mode():
        raw = encoder.encode_image(to_clip_tensor(pixels[None])).float().cpu().numpy()[0]
    vector = raw / max(float(np.linalg.norm(raw)), 1e-12)
    row = patient = None
    try:
        row = store.row_of(path.name)
        patient = int(store.patient_id[row])
    except StoreError:
        match = _NIH_NAME.match(path.name)
        patient = int(match.group(1)) if match else None
    return Query("image", str(path), vector.astype(np.float32), row=row, patient_id=patient)


# ---------------------------------------------------------------------------------------
# Searching


def _allowed_mask(store: EmbeddingStore, split: str | None, exclude_rows: list[int],
                  exclude_patient: int | None) -> np.ndarray | None:
    if split is None and not exclude_rows and exclude_patient is None:
        return None
    mask = np.ones(len(store), dtype=bool) if split is None else store.split == split
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected {', '.join(SPLITS)}")
    if exclude_patient is not None:
        mask &= store.patient_id != exclude_patient
    if exclude_rows:
        mask[np.asarray(exclude_rows, dtype=np.int64)] = False
    return mask


def exact_scan(store: EmbeddingStore, queries: np.ndarray, k: int,
               allowed: np.ndarray | None = None, centring: Centring | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product, reading the store in blocks (no index needed);
    ``centring`` transforms each block of stored vectors (queries come transformed).

    Returns similarities and rows ``(q, k)``, row -1 where fewer than ``k`` rows pass.
    """
    queries = np.asarray(queries, dtype=np.float32)
    q = len(queries)
    best_sim = np.full((q, k), -np.inf, dtype=np.float32)
    best_row = np.full((q, k), -1, dtype=np.int64)
    for start in range(0, len(store), SCAN_BLOCK):
        stop = min(len(store), start + SCAN_BLOCK)
        block = store.embeddings(np.arange(start, stop))
        if centring is not None:
            block = centring.apply(block)
        sims = queries @ block.T
        if allowed is not None:
            sims[:, ~allowed[start:stop]] = -np.inf
        sims = np.concatenate([best_sim, sims], axis=1)
        rows = np.concatenate([best_row, np.broadcast_to(np.arange(start, stop),
                                                         (q, stop - start))], axis=1)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if sims.shape[1] > k else \
            np.broadcast_to(np.arange(sims.shape[1]), (q, sims.shape[1]))
        best_sim = np.take_along_axis(sims, top, axis=1)
        best_row = np.take_along_axis(rows, top, axis=1)
    order = np.argsort(-best_sim, axis=1, kind="stable")
    best_sim = np.take_along_axis(best_sim, order, axis=1)
    best_row = np.take_along_axis(best_row, order, axis=1)
    best_row[~np.isfinite(best_sim)] = -1
    return best_sim, best_row


def search_vectors(store: EmbeddingStore, queries: np.ndarray, k: int = 10, *,
                   split: str | None = None, exclude_rows: list[list[int]] | None = None,
                   exclude_patients: list[int | None] | None = None, index: str = "auto",
                   index_params: dict | None = None, loaded_index: LoadedIndex | None = None,
                   centre: str | Centring = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` stored rows for each unit query vector ``(q, D)``.

    Args:
        split: only rows of this split.
        exclude_rows, exclude_patients: per query, rows and a patient id to leave out.
        index: ``auto`` (the saved index when there is one, else an exact scan),
            ``index`` (the saved index, StoreError when absent) or ``exact``.
        index_params: search-time parameters of an approximate index (``nprobe``,
            ``efSearch``, ``rerank``: candidates re-scored exactly, PQ kinds); the ones
            saved with it otherwise.
        centre: ``auto`` | ``on`` | ``off``, or a resolved :class:`Centring`: queries and
            stored vectors are centred alike (similarities are then cosines of centred
            vectors).
    Returns similarities and rows, ``(q, k)`` each; row -1 where fewer than ``k`` pass.
    """
    if index not in INDEX_CHOICES:
        raise ConfigError(f"unknown index choice {index!r}; expected {', '.join(INDEX_CHOICES)}")
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != store.embed_dim:
        raise ConfigError(f"queries are {queries.shape[1]}-d, store {store.path} holds "
                          f"{store.embed_dim}-d vectors")
    if not 1 <= k <= len(store):
        raise ConfigError(f"-k {k}: must be between 1 and the {len(store)} images of store "
                          f"{store.path}")
    centring = resolve_centring(store, centre)
    queries = centring.apply(queries)
    q = len(queries)
    exclude_rows = exclude_rows or [[] for _ in range(q)]
    exclude_patients = exclude_patients or [None] * q
    loaded = loaded_index if index != "exact" else None
    if loaded is None:
        if index == "index" or (index == "auto" and has_index(store.path)):
            loaded = load_index(store)  # a broken or stale index is an error, not skipped
        elif index == "auto":
            log.info("no index beside %s: exact scan", store.path)
    loaded = usable_index(store, loaded, centring, index)
    params = {**(loaded.info.params if loaded else {}), **(index_params or {})}
    masks = [_allowed_mask(store, split, rows, patient)
             for rows, patient in zip(exclude_rows, exclude_patients)]

    def run(batch: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if loaded is not None and loaded.front is not None:
            return loaded.front.search(batch, k, allowed=mask, params=params)
        if loaded is not None:
            return search_index(loaded.index, batch, k, allowed=mask, params=params,
                                vectors=lambda rows: centring.apply(store.embeddings_at(rows)))
        return exact_scan(store, batch, k, allowed=mask, centring=centring)

    first = masks[0]
    if all(m is None for m in masks) or (first is not None and all(
            m is not None and np.array_equal(m, first) for m in masks)):
        return run(queries, first)  # one filter for every query: one batched call
    sims = np.full((q, k), -np.inf, dtype=np.float32)
    found = np.full((q, k), -1, dtype=np.int64)
    for i, mask in enumerate(masks):
        s, r = run(queries[i:i + 1], mask)
        sims[i], found[i] = s[0], r[0]
    return sims, found


def usable_index(store: EmbeddingStore, loaded: LoadedIndex | None, centring: Centring,
               index: str) -> LoadedIndex | None:
    """The loaded index when it holds vectors as this search transforms them; else None
    (an exact scan) with a warning, or StoreError for ``index="index"``."""
    if loaded is None or loaded.info.centred == centring.centred:
        return loaded
    held = "centred" if loaded.info.centred else "uncentred"
    wanted = "centred" if centring.centred else "uncentred"
    fix = (f"rebuild it with `cxrembed index {store.path} --centre "
           f"{'on' if centring.centred else 'off'}`, or search with --centre "
           f"{'on' if loaded.info.centred else 'off'}")
    if index == "index":
        raise StoreError(f"the index beside {store.path} holds {held} vectors; this search is "
                         f"{wanted} ({centring.reason}): {fix}")
    log.warning("the index beside %s holds %s vectors and this search is %s: scanning the "
                "store exactly (slower); %s", store.path, held, wanted, fix)
    return None


def _hits(store: EmbeddingStore, sims: np.ndarray, rows: np.ndarray) -> list[SearchHit]:
    names = store.label_names
    hits = []
    for sim, row in zip(sims, rows):
        if row < 0:
            continue
        age = float(store.age[row])
        hits.append(SearchHit(
            rank=len(hits) + 1, row=int(row), image_id=str(store.image_id[row]),
            patient_id=int(store.patient_id[row]), split=str(store.split[row]),
            view=str(store.view[row]), sex=str(store.sex[row]),
            age=None if np.isnan(age) else age,
            labels=[names[j] for j in np.flatnonzero(store.labels[row])],
            similarity=float(sim)))
    return hits


def search(store: EmbeddingStore | str | os.PathLike, *, image_id: str | None = None,
           image: str | os.PathLike | None = None, text: str | None = None, k: int = 10,
           split: str | None = None, exclude_same_patient: bool = False,
           include_query: bool = False, index: str = "auto", centre: str = "auto",
           montage: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
           encoder: Any = None, index_params: dict | None = None) -> SearchResult:
    """The ``k`` stored images most similar to one query (see :func:`query_vector`).

    Args:
        split: search only this split's images.
        exclude_same_patient: leave out every image of the query's patient (an ``--id``
            query, or an image whose NIH file name gives its patient).
        include_query: keep a stored query image itself among its neighbours.
        index: ``auto`` | ``index`` | ``exact`` (see :func:`search_vectors`).
        centre: ``auto`` (as the store's measured figure decides) | ``on`` | ``off``.
        montage: write a PNG of the query and its neighbours, with their labels, here.
        data_root: where the images lie now, when not where they were encoded (montage).
        index_params: search-time index parameters (see :func:`search_vectors`).
    Returns a :class:`SearchResult` (iterating over it gives the hits).
    """
    if isinstance(store, (str, os.PathLike)):
        with EmbeddingStore.open(store) as opened:
            return search(opened, image_id=image_id, image=image, text=text, k=k, split=split,
                          exclude_same_patient=exclude_same_patient,
                          include_query=include_query, index=index, centre=centre,
                          montage=montage, data_root=data_root, encoder=encoder,
                          index_params=index_params)
    if not 1 <= k <= len(store):
        raise ConfigError(f"-k {k}: must be between 1 and the {len(store)} images of store "
                          f"{store.path}")
    if not isinstance(centre, Centring) and centre not in CENTRE_CHOICES:
        raise ConfigError(f"--centre {centre!r}: expected one of {', '.join(CENTRE_CHOICES)}")
    query = query_vector(store, image_id=image_id, image=image, text=text, encoder=encoder)
    centring = resolve_centring(store, centre)
    hits = search_query(store, query, k, split=split, exclude_same_patient=exclude_same_patient,
                        include_query=include_query, index=index, centre=centring,
                        index_params=index_params)
    if montage is not None:
        save_montage(store, query, hits, montage, data_root=data_root)
    return SearchResult(query, hits, centring)


def search_query(store: EmbeddingStore, query: Query, k: int = 10, *, split: str | None = None,
                 exclude_same_patient: bool = False, include_query: bool = False,
                 index: str = "auto", loaded_index: LoadedIndex | None = None,
                 centre: str | Centring = "auto", index_params: dict | None = None
                 ) -> list[SearchHit]:
    """The ``k`` stored images most similar to a :class:`Query` from :func:`query_vector`
    (options as in :func:`search`; ``loaded_index`` as in :func:`search_vectors`)."""
    patient = None
    if exclude_same_patient:
        if query.patient_id is None:
            raise ConfigError(f"cannot tell the patient of {query.kind} query {query.value!r} "
                              "(not a stored image, not an NIH file name); drop "
                              "--exclude-same-patient")
        patient = query.patient_id
    skip = [query.row] if query.row is not None and not include_query else []
    sims, rows = search_vectors(store, query.vector[None], k, split=split, exclude_rows=[skip],
                                exclude_patients=[patient], index=index,
                                loaded_index=loaded_index, centre=centre,
                                index_params=index_params)
    hits = _hits(store, sims[0], rows[0])
    if len(hits) < k:
        log.warning("only %d images pass the filters (asked for %d)", len(hits), k)
    return hits
