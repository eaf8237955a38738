"""Names are names: text that names an experiment, a study, a sweep or an output directory never becomes a path
elsewhere or part of a query.

- :func:`name_problem`: why text cannot name an MLflow experiment or an Optuna study. An experiment's name is
  a directory under the store's ``mlruns/``, so a name that is a path (``/abs``, ``../x``) is refused rather
  than mapped: the store never writes outside itself, and the name in the UI is the name typed.
- :func:`text_problem`: why any such text (a path too) cannot be searched for in MLflow.
- :func:`filter_value`: text as a string literal of an MLflow ``filter_string``. Every filter built from text
  goes through it.
"""

from __future__ import annotations

import re
from typing import Optional

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTES = ("'", '"')


def text_problem(text: str) -> Optional[str]:
    """Why ``text`` cannot be stored and searched for as a tag value (a control character, both quote
    characters, a final backslash), or None."""
    if _CONTROL.search(text):
        return f"holds a control character ({_CONTROL.search(text).group()!r})"
    if all(quote in text for quote in _QUOTES):
        return "holds both ' and \", which no MLflow search can quote: drop one of them"
    if text.endswith("\\"):  # MLflow's parser reads a backslash before the closing quote as escaping it
        return "ends with a backslash, which no MLflow search can quote"
    return None


def name_problem(text: str) -> Optional[str]:
    """Why ``text`` cannot be a name (an MLflow experiment, an Optuna study), or None."""
    if not text.strip():
        return "is empty"
    if "/" in text or "\\" in text:
        return "holds a path separator ('/' or '\\'): a name is not a path"
    if ".." in text:
        return "holds '..': a name is not a path"
    return text_problem(text)


def filter_value(text: str) -> str:
    """``text`` as a string literal of an MLflow filter string (``search_runs(filter_string=...)``).

    MLflow's parser keeps the characters between the quotes as they are: it unescapes nothing (``\\'`` stays two
    characters, ``''`` too). So the literal is quoted with a quote character the text does not hold; text that
    holds both, or ends with a backslash, cannot be searched for, and :func:`text_problem` refuses it where such
    text is given.
    """
    quote = next((q for q in _QUOTES if q not in text), None)
    if quote is None or text.endswith("\\"):
        raise ValueError(f"{text!r} {text_problem(text)}")
    return f"{quote}{text}{quote}"
