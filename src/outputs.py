"""Output directories that no two runs share, even two started in the same second.

Hydra's default ``hydra.run.dir`` and ``hydra.sweep.dir`` are time-stamped to the second. ``conf/config.yaml``
wraps them in ``${unique_dir:...}``, which creates the directory exclusively and, when another process took
that name first, takes ``<name>-2``, ``<name>-3``, ... instead. A directory given on the command line
(``hydra.run.dir=outputs/RUN``, to resume a run) is used as it is.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

_allocated: dict[str, str] = {}
_lock = threading.Lock()


def allocate_dir(base: str) -> str:
    """Create a directory that no other caller holds and return its path: ``base``, else ``base-2``, ``base-3``...

    ``mkdir`` without ``exist_ok`` is atomic: of two processes asking for one name, one gets it and the other
    moves on to the next."""
    path = Path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise AssertionError("unreachable")


def unique_dir(base: str) -> str:
    """The ``unique_dir`` resolver: one directory per ``base`` and process, however often the config is resolved
    (Hydra reads ``hydra.run.dir`` more than once, and a sweep's jobs read its ``hydra.sweep.dir``)."""
    with _lock:
        if base not in _allocated:
            _allocated[base] = allocate_dir(base)
        return _allocated[base]
