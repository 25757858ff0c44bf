"""cxrembed: label-efficient chest X-ray diagnosis on cached CLIP embeddings.

One expensive step (partial CLIP adaptation on a GPU) and one pass over the archive
(encoding every image into an HDF5 store with a FAISS index); everything else runs in
seconds on the cached vectors.
"""

__version__ = "0.1.0"

from cxrembed.errors import CxrembedError
from cxrembed.labels import LABELS

__all__ = ["CxrembedError", "LABELS", "__version__"]
