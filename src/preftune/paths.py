"""Where inputs and caches are: a path on this machine or a hub id, and the cache folder.

A name is a *local path* when it exists, starts with `./`, `../`, `/` or `~`, ends in a file
extension preftune reads (`.jsonl`, `.parquet`, `.safetensors`, ...), has more than one `/`, or is
`FOLDER/NAME` with an existing `FOLDER`. Anything else that fits the hub's `org/name` or `name`
pattern may be a hub id. A local path that does not exist is reported at once; a hub id is only
looked up when the hub answers (or offline mode is on, where the libraries read their own cache), so
a typo never waits on network retries.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from preftune.errors import ConfigError

# `org/name` or `name`: what the Hugging Face hub accepts as a repository id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_SUFFIXES = frozenset(
    ".jsonl .ndjson .json .parquet .csv .tsv .txt .arrow .gz .zip .yaml .yml "
    ".safetensors .bin .pt .pth .gguf".split()
)
HUB_TIMEOUT_S = 3.0
_ON = ("1", "true", "yes", "on")


def is_local_path(text: str) -> bool:
    """True when `text` can only name something on this machine (see the module docstring)."""
    path = Path(text).expanduser()
    if path.exists() or text.startswith(("./", "../", "/", "~", ".\\")) or text in (".", ".."):
        return True
    if not HUB_ID.match(text) or path.suffix.lower() in LOCAL_SUFFIXES:
        return True
    return "/" in text and path.parent.is_dir()


def looks_like_file(text: str) -> bool:
    """True when `text`, though it may be read as a hub id, ends in what looks like a file extension
    (`prefs.jsnl`, a typo of `.jsonl`): a message then names the local path that does not exist first."""
    return bool(re.search(r"\.[A-Za-z][A-Za-z0-9]{0,9}$", Path(text).name))


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def offline() -> bool:
    """Offline mode of the Hugging Face libraries (they then read only what they downloaded before)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in _ON for n in names)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub's host accepts a connection within HUB_TIMEOUT_S (name lookup included)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((hub_host(), 443), timeout=HUB_TIMEOUT_S).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S)
    return bool(answer and answer[0])


def hub_unreachable() -> str | None:
    """Why a hub id cannot be looked up now (None when it can, or offline mode reads the local cache)."""
    if offline() or hub_reachable():
        return None
    return f"the hub ({hub_host()}) cannot be reached"


def pretrained_source(text: str | Path, what: str = "model") -> str:
    """The name to give `from_pretrained` for `text`: an existing folder, or a hub id that can be
    looked up now; otherwise a one-line `ConfigError` that says which of the two was meant and why
    it failed. `what` names the thing in the message ("model", "tokenizer", ...)."""
    name = str(text)
    local = Path(name).expanduser()
    if local.exists():
        return str(local)
    if is_local_path(name):
        raise ConfigError(
            f"no such {what} folder '{name}' — check the path (a folder written by save_pretrained), "
            "or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct"
        )
    why = hub_unreachable()
    if why:
        raise ConfigError(
            f"no {what} folder '{name}' here, and {why} to download '{name}' as a hub id — check the "
            "path (a local folder: ./NAME), or connect to the network (a model downloaded before "
            "loads with HF_HUB_OFFLINE=1)"
        )
    return name


def is_pipeline_folder(name: str | Path | None) -> bool:
    """True when `name` is a local `diffusers` pipeline folder (it holds model_index.json)."""
    return bool(name) and (Path(str(name)).expanduser() / "model_index.json").is_file()


def cache_root() -> Path:
    """The cache folder: `$PREFTUNE_CACHE`, else `~/.cache/preftune`. Tokenized data lives in
    `tokenized/` under it, reference log-probs in `reference/`. `$PREFTUNE_CACHE_DIR` is a deprecated
    spelling of `$PREFTUNE_CACHE` (same meaning, a warning once per process)."""
    value = os.environ.get("PREFTUNE_CACHE")
    old = os.environ.get("PREFTUNE_CACHE_DIR")
    if old:
        _warn_old_variable(bool(value))
    value = value or old
    return Path(value).expanduser() if value else Path.home() / ".cache" / "preftune"


@functools.lru_cache(maxsize=2)
def _warn_old_variable(ignored: bool) -> None:
    import logging

    logging.getLogger("preftune").warning(
        "$PREFTUNE_CACHE_DIR is deprecated"
        + (" and ignored: $PREFTUNE_CACHE is set" if ignored else "; set $PREFTUNE_CACHE instead")
        + " (the cache root; tokenized data goes to its tokenized/ folder)"
    )
