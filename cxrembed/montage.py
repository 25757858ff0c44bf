"""The montage of a search: the query and its neighbours in one PNG, with their labels."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrembed.errors import ConfigError, DataError
from cxrembed.store import EmbeddingStore

if TYPE_CHECKING:
    from cxrembed.search import Query, SearchHit

log = logging.getLogger(__name__)

def stored_image_path(store: EmbeddingStore, row: int, data_root: Path) -> Path | None:
    """Where the image of stored ``row`` lies under ``data_root`` now (its recorded path,
    else its id), or None. The path comes from the store only, never from a caller; a
    link leading out of ``data_root`` is followed only for a store encoded with
    ``--follow-links`` (its ``follow_links`` attribute)."""
    from cxrembed.data.tabular import inside

    rel = str(store.image_path[row])
    candidates = [data_root / rel] if rel else []
    candidates.append(data_root / str(store.image_id[row]))
    root = os.path.realpath(data_root)
    # encoded with --follow-links: links inside the data folder are followed (the path
    # itself must still lie inside it: no '..', not absolute)
    linked_root = os.path.abspath(data_root) if store.attrs.get("follow_links") else None
    for path in candidates:
        if path.is_file():
            if inside(root, os.path.realpath(path)) or (
                    linked_root and inside(linked_root, os.path.normpath(os.path.abspath(path)))):
                return path
            # a store's paths come from outside too: never read (or serve) a file elsewhere
            log.warning("store %s names %s for row %d, outside the data folder %s: not read",
                        store.path, path, row, data_root)
    return None


def _image_for(store: EmbeddingStore, row: int, data_root: Path) -> np.ndarray | None:
    from cxrembed.data.images import decode

    path = stored_image_path(store, row, data_root)
    if path is None:
        return None
    try:
        return decode(path, size=224)
    except DataError:
        return None


def save_montage(store: EmbeddingStore, query: Query, hits: list[SearchHit],
                 out: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 columns: int = 6) -> Path:
    """One PNG: the query, then each neighbour with its similarity, id and labels.

    Images are read from ``data_root`` (default: the folder they were encoded from); one
    not found there is drawn as a grey "image not found" tile, and a warning says how many
    and where to point ``data_root`` (``--data``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("--montage needs matplotlib: pip install matplotlib") from None
    from cxrembed.data.images import decode

    root = Path(data_root or store.attrs.get("dataset_root") or ".")
    panels: list[tuple[np.ndarray | None, str, str]] = []
    if query.kind == "text":
        panels.append((None, "query (text)", query.value))
    elif query.kind == "image":
        panels.append((decode(query.value, size=224), "query", Path(query.value).name))
    else:
        names = [store.label_names[j] for j in np.flatnonzero(store.labels[query.row])]
        panels.append((_image_for(store, query.row, root), "query",
                       f"{query.value}\n{', '.join(names) or 'No Finding'}"))
    for hit in hits:
        labels = ", ".join(hit.labels) or "No Finding"
        panels.append((_image_for(store, hit.row, root),
                       f"#{hit.rank}  sim {hit.similarity:.4f}",
                       f"{hit.image_id}\n{labels}"))
    _warn_missing(panels, query, root, data_root is not None)
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2.6 * cols, 3.1 * rows))
    FigureCanvasAgg(fig)  # draws without pyplot: the caller's matplotlib backend is untouched
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, title, caption) in zip(axes.flat, panels):
        ax.imshow(pixels if pixels is not None else np.full((224, 224), 215, np.uint8),
                  cmap="gray", vmin=0, vmax=255)
        if pixels is None:
            note = textwrap.fill(caption, 24) if query.kind == "text" and title.startswith(
                "query") else "image not found"
            ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=9,
                    transform=ax.transAxes)
        ax.set_title(title, fontsize=9, color="tab:red" if title.startswith("query") else "k")
        ax.text(0.5, -0.02, caption, ha="center", va="top", fontsize=7, transform=ax.transAxes)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _warn_missing(panels: list[tuple[np.ndarray | None, str, str]], query: Query, root: Path,
                  root_given: bool) -> None:
    images = panels[1:] if query.kind == "text" else panels
    missing = sum(pixels is None for pixels, _, _ in images)
    if not missing:
        return
    where = "the folder given" if root_given else "the folder the store was encoded from"
    log.warning("montage: %d of %d images not found under %s (%s); they are drawn as "
                "'image not found' tiles. If the images have moved, pass --data DIR "
                "(data_root=DIR) with the folder they are in now.", missing, len(images),
                root, where)
