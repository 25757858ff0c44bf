"""Encoding images into a store: reader -> mapper -> writer, composed by a runner.

- :mod:`~cxrembed.encode.reader`: store rows -> batches of pixels (pixel cache or PNGs),
  read ahead by threads; unreadable images skipped on request.
- :mod:`~cxrembed.encode.mapper`: pixels -> joint-space vectors and head logits.
- :mod:`~cxrembed.encode.output`: the store to write (created, or reopened and matched to
  the images selected now); :class:`~cxrembed.store.StoreWriter` writes it in chunks.
- :mod:`~cxrembed.encode.runner`: the loop, timing read / infer / write per batch.
- :mod:`~cxrembed.encode.pipeline`: :func:`encode_dataset`, the one entry point.
"""

from cxrembed.encode.mapper import ClipMapper, encode_texts
from cxrembed.encode.output import encoder_attrs
from cxrembed.encode.pipeline import CHUNK_ROWS, EncodeResult, encode_dataset, select_rows
from cxrembed.encode.reader import Batch, BatchReader
from cxrembed.encode.runner import StageSeconds, run_pipeline

__all__ = ["CHUNK_ROWS", "Batch", "BatchReader", "ClipMapper", "EncodeResult", "StageSeconds",
           "encode_dataset", "encode_texts", "encoder_attrs", "run_pipeline", "select_rows"]
