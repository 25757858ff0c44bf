"""cxrembed: label-efficient chest X-ray diagnosis on cached CLIP embeddings.

One expensive step (partial CLIP adaptation on a GPU) and one pass over the archive
(encoding every image into an HDF5 store with a FAISS index); everything else runs in
seconds on the cached vectors.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# OpenMP threads that spin while waiting make torch on a small, shared CPU 10-40x slower
# whenever another process holds a core (measured: a cxr-tiny training step took 2.3 s
# with spinning, 0.06 s with passive waits, on 2 cores with one busy). Only a default:
# set OMP_WAIT_POLICY yourself to override; no effect once torch is imported.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cxrembed.errors import CxrembedError  # noqa: E402
from cxrembed.labels import LABELS  # noqa: E402

__all__ = ["CxrembedError", "LABELS", "__version__"]
