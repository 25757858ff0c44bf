"""Text prompts per label: the one format every ``--prompts`` option reads.

A prompts file is a JSON object. Two shapes, which may be mixed in one file:

- a template ensemble for every label, ``{disease}`` standing for the label's name in
  lower case::

      {"templates": {"positive": ["a chest x-ray showing {disease}", "{disease}"],
                     "negative": ["no {disease}"]}}

  (or, the same, as a pair: ``{"templates": [["a chest x-ray showing {disease}",
  "{disease}"], "no {disease}"]}``);

- per label, a ``[positive, negative]`` pair, each side one prompt or a list of them, or
  the long form ``{"positive": [...], "negative": [...]}``::

      {"Edema": ["pulmonary edema", "no edema"],
       "Pleural_Thickening": {"positive": ["pleural thickening"], "negative": ["normal pleura"]}}

Per-label entries win over the file's templates, the file wins over what it is merged
onto (the store's prompts, then the defaults: ``"a chest x-ray showing <label>"`` vs
``"no <label>"`` for any label name). Label names match ignoring case, ``_`` and spaces;
``No Finding`` may be given a positive prompt (stored by encode; zero-shot ignores it).
Several prompts on one side are an ensemble (zero-shot averages their unit embeddings).
Every malformed file raises :class:`~cxrembed.errors.PromptsError`.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from cxrembed.errors import PromptsError
from cxrembed.labels import LABELS, NO_FINDING, NO_FINDING_PROMPT

#: ``{label: ([positive prompts], [negative prompts])}``
Prompts = dict[str, tuple[list[str], list[str]]]
PromptsSpec = Union[None, Mapping, str, os.PathLike]

POSITIVE_TEMPLATES: tuple[str, ...] = ("a chest x-ray showing {disease}",)
NEGATIVE_TEMPLATES: tuple[str, ...] = ("no {disease}",)
TEMPLATES_KEY = "templates"


def _key(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _disease(label: str) -> str:
    return " ".join(label.replace("_", " ").split()).lower()


def default_pair(label: str) -> tuple[list[str], list[str]]:
    """The default ``(positive, negative)`` prompts of any label name."""
    return ([t.format(disease=_disease(label)) for t in POSITIVE_TEMPLATES],
            [t.format(disease=_disease(label)) for t in NEGATIVE_TEMPLATES])


def default_prompts(labels: Sequence[str] = LABELS) -> Prompts:
    """Per label, the default prompt pair (CheXzero style)."""
    return {name: default_pair(name) for name in labels}


def _side(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p.strip()
                                                       for p in items):
        raise PromptsError(f"{where}: expected a prompt or a list of non-empty prompts, got "
                           f"{json.dumps(value)[:80]}")
    return list(items)


def _pair(value: Any, where: str) -> tuple[list[str], list[str]]:
    """``[pos, neg]`` / ``[[pos...], [neg...]]`` / ``{"positive": .., "negative": ..}``."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"positive", "negative"}
        if unknown or "positive" not in value:
            raise PromptsError(f"{where}: expected {{\"positive\": [...], \"negative\": [...]}}"
                               f", got keys {sorted(value)}")
        pos, neg = _side(value["positive"], where), _side(value.get("negative", []), where)
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        pos, neg = _side(value[0], where), _side(value[1], where)
    else:
        raise PromptsError(f"{where}: expected a [positive, negative] pair or {{\"positive\": "
                           f"[...], \"negative\": [...]}}, got {json.dumps(value)[:80]}")
    if not pos:
        raise PromptsError(f"{where}: give at least one positive prompt")
    return pos, neg


def _templates(value: Any, where: str) -> tuple[list[str], list[str]]:
    pos, neg = _pair(value, where)
    for template in pos + neg:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            if not fields - {"disease"}:
                template.format(disease="effusion")  # a bad format spec fails only here
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            raise PromptsError(f"{where}: template {template!r} is not a format string with "
                               f"{{disease}} ({exc}); write braces as {{{{ and }}}}") from None
        if fields - {"disease"}:
            raise PromptsError(f"{where}: template {template!r} uses {sorted(fields)}; the "
                               "only placeholder is {disease}")
    if not neg:
        raise PromptsError(f"{where}: give at least one negative template")
    return pos, neg


def parse_prompts(obj: Any, labels: Sequence[str] = LABELS, source: str = "prompts"
                  ) -> Prompts:
    """The prompts an object (parsed JSON) gives, keyed by the canonical label names.

    Only labels it names (or all of ``labels``, with ``templates``) are returned; merge
    with :func:`merge_prompts` to fill in the rest.
    """
    if not isinstance(obj, Mapping) or not obj:
        raise PromptsError(f"{source}: expected a non-empty JSON object of label prompts "
                           f"and/or \"templates\", got {type(obj).__name__}")
    by_key = {_key(name): name for name in labels}
    out: Prompts = {}
    if TEMPLATES_KEY in obj:
        pos, neg = _templates(obj[TEMPLATES_KEY], f"{source}: \"templates\"")
        for name in labels:
            out[name] = ([t.format(disease=_disease(name)) for t in pos],
                         [t.format(disease=_disease(name)) for t in neg])
    for key, value in obj.items():
        if key == TEMPLATES_KEY:
            continue
        where = f"{source}: {key!r}"
        if _key(key) == _key(NO_FINDING):
            pos, neg = _pair(value, where)
            out[NO_FINDING] = (pos, neg)
            continue
        if _key(key) not in by_key:
            raise PromptsError(f"{where} is not a label; expected \"templates\", "
                               f"{NO_FINDING!r} or one of: {', '.join(labels)}")
        pos, neg = _pair(value, where)
        if not neg:
            raise PromptsError(f"{where}: give at least one negative prompt")
        out[by_key[_key(key)]] = (pos, neg)
    return out


def load_prompts(path: str | os.PathLike, labels: Sequence[str] = LABELS) -> Prompts:
    """Read a prompts JSON file (format: this module's docstring)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptsError(f"prompts file {path} does not exist") from None
    except OSError as exc:
        raise PromptsError(f"cannot read prompts file {path}: {exc}") from None
    except ValueError as exc:
        raise PromptsError(f"prompts file {path} is not valid JSON: {exc}") from None
    return parse_prompts(obj, labels, source=str(path))


def read_prompts(spec: PromptsSpec, labels: Sequence[str] = LABELS) -> Prompts:
    """Prompts from a file path, a dict (file-shaped, or ``{label: (pos, neg)}``) or None."""
    if spec is None:
        return {}
    if isinstance(spec, (str, os.PathLike)):
        return load_prompts(spec, labels)
    return parse_prompts(spec, labels)


def merge_prompts(*layers: Prompts | None, labels: Sequence[str] = LABELS,
                  keep_no_finding: bool = False) -> Prompts:
    """Every label's prompts: the defaults, then each layer on top, in order.

    Layers are parsed prompts (:func:`read_prompts`) or a store's. ``No Finding`` is kept
    only with ``keep_no_finding`` (encode stores it; zero-shot has no column for it).
    """
    merged = default_prompts(labels)
    if keep_no_finding:
        merged[NO_FINDING] = ([NO_FINDING_PROMPT], [])
    for layer in layers:
        for name, (pos, neg) in (layer or {}).items():
            if name in merged:
                merged[name] = (list(pos), list(neg))
    return merged


def class_prompts(spec: PromptsSpec = None, labels: Sequence[str] = LABELS) -> Prompts:
    """What an encode stores: every label's prompts and ``No Finding``'s."""
    return merge_prompts(read_prompts(spec, labels), labels=labels, keep_no_finding=True)


def distinct_prompts(prompts: Prompts) -> list[str]:
    """Every prompt once, in first-seen order (the store's ``text/prompt`` order)."""
    return list(dict.fromkeys(p for pair in prompts.values() for side in pair for p in side))
