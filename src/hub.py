"""Whether a model named by a hub id can be read here, decided in seconds, without loading anything.

Kept apart from :mod:`src.guards`, which imports transformers' Trainer (and through peft, bitsandbytes, which starts
CUDA): ``src.plan`` and the sweeper use this and must stay CUDA-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from src.errors import UserError

HUB_PROBE_SECONDS = 5.0


class ModelUnavailable(UserError, OSError):
    """A hub model that is neither a local directory nor in the local hub cache, and cannot be downloaded now."""


def in_hub_cache(name_or_path: str, revision: Optional[str]) -> bool:
    """Whether the local hub cache holds the model's config.json; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id: the caller's own load says so
        return False


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> Optional[str]:
    """Why the hub cannot be reached now, or None: one request, bounded in time (proxy settings honoured). The
    hub client would retry a dead connection for over a minute before failing with a traceback."""
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
        except Exception as exc:  # DNS, refused, TLS, proxy: each means no download
            failure.append(exc)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return f"the hub ({constants.ENDPOINT}) gave no answer in {timeout:g} s"
    if failure:
        reason = str(failure[0]).strip().splitlines()
        return (
            f"the hub ({constants.ENDPOINT}) cannot be reached ({reason[0] if reason else type(failure[0]).__name__})"
        )
    return None


def looks_local(name_or_path: str) -> bool:
    """A path (``/``, ``./``, ``../``, ``~``) or an existing file, rather than a hub id."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).expanduser().exists()


def model_source_problem(name_or_path: str, revision: Optional[str], may_download: bool) -> Optional[str]:
    """Why ``model.name_or_path`` cannot be read on this machine, in one line, or None; in seconds.

    A builtin name or an existing path is not judged here (its loader says what is wrong with it). A hub id is
    fine in the local hub cache, or, where ``may_download``, when the hub answers now. ``src.plan`` (which never
    downloads) and the model and tokenizer loading (:mod:`src.modeling`) share this rule."""
    from src.tiny import BUILTIN_PREFIX

    if name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).expanduser().exists():
        return None
    if looks_local(name_or_path):  # a path, not a hub id: nothing to download
        return f"model.name_or_path={name_or_path!r}: no such directory"
    if in_hub_cache(name_or_path, revision):
        return None
    where = f"model.name_or_path={name_or_path}: not a local directory and not in the local hub cache"
    if not may_download:
        return where
    offline = hub_unreachable()
    return f"{where}, and {offline}" if offline else None
