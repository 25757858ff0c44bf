"""The embedding store: an HDF5 file of vectors + metadata, and a FAISS index beside it.

Public API::

    from cxrembed.store import EmbeddingStore, check_same_encoder, build_index
    store = EmbeddingStore.open("nih.h5")          # read-only, complete stores only
    rows = store.select(split="test", view="PA")
    x = store.embeddings(rows)                     # float32 unit vectors, only those rows

The file layout is documented in :mod:`cxrembed.store.schema`.
"""

from cxrembed.store.index import (INDEX_KINDS, IndexBuilder, IndexInfo, LoadedIndex,
                                  PreparedIndex, build_index, extend_index, has_index,
                                  index_path, load_index, search_index)
from cxrembed.store.reader import EmbeddingStore, check_same_encoder
from cxrembed.store.schema import FORMAT_VERSION
from cxrembed.store.writer import StoreWriter

__all__ = [
    "EmbeddingStore", "StoreWriter", "check_same_encoder", "FORMAT_VERSION",
    "INDEX_KINDS", "IndexBuilder", "IndexInfo", "LoadedIndex", "PreparedIndex", "build_index",
    "extend_index", "has_index", "index_path", "load_index", "search_index",
]
