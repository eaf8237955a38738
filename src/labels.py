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


# Labels that may be typos of one another (:func:`label_notes`): a warning, since real label sets have rare classes.
RARE_ROWS = 2  # a class with at most this many train rows is named
MIN_EDIT_LENGTH = 4  # shorter labels are codes (A1, neg, pos), one character apart by design
MAX_CLASSES_COMPARED = 2_000  # past this the one-character check (pairs of labels) is skipped, and a note says so
MAX_NOTES = 20


def _rows(count: int) -> str:
    return f"{count} train row{'' if count == 1 else 's'}"


def _squeezed(label: str) -> str:
    """What two labels share when they differ only in case, spacing or punctuation."""
    return "".join(c for c in label.casefold() if c.isalnum())


def _how_alike(group: Sequence[str]) -> str:
    """How labels with one :func:`_squeezed` form differ: in case, in spacing or punctuation, or in both."""
    if len({label.casefold() for label in group}) == 1:
        return "case"
    if len({"".join(c for c in label if c.isalnum()) for label in group}) == 1:
        return "spacing or punctuation"
    return "case, spacing or punctuation"


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether distinct ``a`` and ``b`` are one insertion, deletion or substitution apart (Levenshtein 1)."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) > 1:
        return False
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i + 1 :] == b[i + 1 :] if len(a) == len(b) else a[i:] == b[i + 1 :]


def _edit_candidates(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of labels one character apart, both at least MIN_EDIT_LENGTH long. Two such labels share a form with
    one character deleted (or one is the other with one deleted), so only labels sharing one are compared. An
    edit to a digit is a numbering (LABEL_1, LABEL_10), and a number's digits are its value: neither is a typo."""
    by_deletion: dict[str, list[str]] = {}
    for label in sorted(labels):
        if len(label) >= MIN_EDIT_LENGTH and not _DECIMAL_LABEL.fullmatch(label):
            for form in {label, *(label[:i] + label[i + 1 :] for i in range(len(label)))}:
                by_deletion.setdefault(form, []).append(label)
    pairs = set()
    for group in by_deletion.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if _one_edit_apart(a, b) and re.sub(r"[0-9]", "", a) != re.sub(r"[0-9]", "", b):
                    pairs.add((a, b))
    return sorted(pairs)


def label_notes(counts: dict[str, int]) -> list[str]:
    """Warnings about labels that may be typos, one line per finding: classes with at most RARE_ROWS train rows,
    labels that differ only in case, spacing or punctuation, and labels one character apart. ``counts``: each
    class's train rows. The one-character check is skipped past MAX_CLASSES_COMPARED classes."""
    notes = []
    rare = sorted((n, label) for label, n in counts.items() if n <= RARE_ROWS)
    if rare:
        shown = ", ".join(f"{label!r} ({_rows(n)})" for n, label in rare[:MAX_NOTES])
        more = f", ... ({len(rare)} in all)" if len(rare) > MAX_NOTES else ""
        notes.append(f"note: class(es) with {RARE_ROWS} or fewer train rows: {shown}{more}; a typo of another label?")
    groups: dict[str, list[str]] = {}
    for label in sorted(counts):
        key = _squeezed(label)
        if any(c.isalpha() for c in key):  # "-1" and "1" are two values, not one label spelled twice
            groups.setdefault(key, []).append(label)
    found = [
        f"labels {', '.join(f'{label!r} ({_rows(counts[label])})' for label in group)} differ only in "
        f"{_how_alike(group)}; spell each class one way"
        for group in groups.values()
        if len(group) > 1
    ]
    if len(counts) > MAX_CLASSES_COMPARED:
        notes.append(
            f"note: {len(counts)} classes: labels one character apart were not looked for (over {MAX_CLASSES_COMPARED})"
        )
    else:
        same = {label: key for key, group in groups.items() for label in group}
        found += [
            f"labels {a!r} ({_rows(counts[a])}) and {b!r} ({_rows(counts[b])}) differ by one character; a typo?"
            for a, b in _edit_candidates(list(counts))
            if a not in same or same.get(a) != same.get(b)
        ]
    notes += [f"note: {line}" for line in found[:MAX_NOTES]]
    if len(found) > MAX_NOTES:
        notes.append(f"note: ... {len(found) - MAX_NOTES} more pair(s) of labels alike")
    return notes
