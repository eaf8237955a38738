"""The one rule for what class a label names, which labels are too alike to keep apart, and their metric names.

A label is its value, however the file spells it (``1``, ``1.0``, ``"1"``), and its text as a reader sees it
(NFC, no invisible characters at its ends). Labels that differ only in ways a reader cannot see or that
Unicode calls compatible (``Ａ`` and ``A``, ``ﬁ`` and ``fi``, a zero-width space inside) are refused, not
merged: which one was meant is the user's call. Each label gets one MLflow metric-name suffix, unique
within its label set.
"""

from __future__ import annotations

import decimal
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

# A label that reads as a plain decimal number; no leading zeros, so a code such as "01" stays text.
_DECIMAL_LABEL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")
# What MLflow accepts in a metric name on every platform, less "/" (a name must not change under normpath: "a/"
# and "a/../b" are refused) and ":" (refused on Windows).
_METRIC_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. ]")
# MLflow keys are at most 250 characters; this leaves room for the prefix and a hash.
_MAX_SUFFIX = 180


def _invisible(char: str) -> bool:
    """Whitespace, or a format character (category Cf: zero-width space and joiners, BOM, bidi marks)."""
    return char.isspace() or unicodedata.category(char) == "Cf"


def canonical_label(text: str) -> str:
    """The class a label's text names: NFC, without invisible characters at its ends, a plain number as the number.

    A label is its value, however the file spells it: CSV readers give "1", JSON may give 1, 1.0 or "1", and a
    spreadsheet export "1.0". All of them are the class "1" (and "2.50" is "2.5"), so one label never becomes
    several classes. Text that is not a plain decimal number ("01", "1e3", "nan") is kept as it is: "01" and "1"
    are two classes. Composed and decomposed accents (café in NFC and NFD) are one class; whitespace and format
    characters (category Cf, e.g. U+200B) at either end are dropped, so a label of only those is "" (empty).
    """
    text = unicodedata.normalize("NFC", text)
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    text = text[start:end]
    if not _DECIMAL_LABEL.fullmatch(text):
        return text
    value = decimal.Decimal(text)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def lookalike_key(label: str) -> str:
    """What two labels share when they only look alike: the NFKC form without format characters. Two distinct
    canonical labels with one key (``Ａ`` and ``A``; ``ab`` with a U+200B inside and ``ab``) are refused."""
    return "".join(c for c in unicodedata.normalize("NFKC", label) if unicodedata.category(c) != "Cf")


def _metric_safe(label: str) -> str:
    """The label in the characters MLflow allows: accents dropped (café -> cafe), anything else as "_"."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", label) if not unicodedata.combining(c))
    return _METRIC_UNSAFE.sub("_", plain)[:_MAX_SUFFIX]


def metric_suffixes(labels: Sequence[str]) -> dict[str, str]:
    """One unique, valid MLflow metric-name suffix per label, the same for the same label set in any order.

    A label MLflow accepts as it is keeps its name; another keeps its safe spelling when no other label has it.
    When spellings collide (``R&D`` and ``R+D`` are both ``R_D``), each changed label gets a short hash of its
    text appended (``R_D_58ae9caf`` for ``R&D``). The mapping is logged with every run as ``metric_names.json``.
    """
    safe = {label: _metric_safe(label) for label in labels}
    counts = Counter(safe.values())
    out = {label: s for label, s in safe.items() if s == label or counts[s] == 1}
    used = set(out.values())
    for label in sorted(set(labels) - set(out)):
        digest = hashlib.sha1(label.encode("utf-8")).hexdigest()
        width = 8
        while f"{safe[label]}_{digest[:width]}" in used:
            width += 4
        out[label] = f"{safe[label]}_{digest[:width]}"
        used.add(out[label])
    return {label: out[label] for label in labels}
