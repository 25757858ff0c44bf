"""Heads on cached vectors, one interface: ``fit(X, Y, X_val, Y_val)`` / ``predict(X)``.

``zeroshot`` (CheXzero text prompts), ``mlp`` (the paper's head on the shots), ``linear``
(one-vs-rest logistic regression), ``knn`` (FAISS neighbours among the shots), ``tip``
(Tip-Adapter). Make one by name with :func:`make_head`; see :mod:`cxrembed.heads.base`.
"""

from cxrembed.heads.base import HEADS, Head, available_heads, make_head, register_head

__all__ = ["HEADS", "Head", "available_heads", "make_head", "register_head"]
