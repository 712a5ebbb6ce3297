"""Hub ids as bases: ``model.path=Qwen/Qwen2.5-0.5B`` resolves to a folder of huggingface_hub's cache.

huggingface_hub's cache is the one users already have (shared with transformers, vLLM and the
``hf download`` command), so a model fetched once is found here too and we never download into a
cache of our own. HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE mean what they mean to
huggingface_hub; they are read when a path is resolved, not when this module is imported, so a
job that sets them late (a test, a launcher) is honoured. Only the files a base needs are
fetched: configs, tokenizer files and safetensors weights (never pickled ``*.bin``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
]
# huggingface_hub's repo id rule: [org/]name of letters, digits, '-', '_', '.', at most 96 chars.
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


class HubError(ValueError):
    """A Hub id that cannot be resolved to a local folder; the message says how to get it."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, at call time."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return _truthy(env) if env is not None else bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_hub_id(value: str) -> bool:
    """Whether ``value`` reads as ``org/name`` (optionally ``@revision``) rather than a local path."""
    repo, _, _ = value.partition("@")
    if value.startswith(("/", "./", "../", "~")) or "\\" in value or len(repo) > 96:
        return False
    if "/" not in repo or repo.count("/") != 1:
        return False  # a bare name is a relative path far more often than a Hub id
    return bool(_REPO_ID.match(repo)) and ".." not in repo and "--" not in repo


def resolve_model_path(path_or_id: str | os.PathLike[str], what: str = "model.path") -> Path:
    """An existing local path as it is; a Hub id as its snapshot folder in huggingface_hub's cache.

    Offline (HF_HUB_OFFLINE=1) only the cache is looked at; online a missing snapshot is fetched.
    Anything that cannot be resolved is one :class:`HubError` naming the value and what to do.
    """
    path = Path(path_or_id)
    if path.exists():
        return path
    value = str(path_or_id)
    if not is_hub_id(value):
        raise HubError(
            f"{what}: {value!r} is neither an existing path nor a Hugging Face Hub id (org/name[@revision])"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, _, revision = value.partition("@")
    cache, is_offline = cache_dir(), offline()
    fetch = (
        f"fetch it on a machine with network (`hf download {repo_id}` or `huggingface-cli download {repo_id}`) "
        "into the same HF_HOME, point HF_HOME at a cache that has it, or give a local folder"
    )
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=str(cache),
            local_files_only=is_offline,
            allow_patterns=ALLOW_PATTERNS,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        state = "offline (HF_HUB_OFFLINE=1)" if is_offline else "the Hub could not be reached"
        raise HubError(
            f"{what}: {value!r} is not in the Hugging Face cache {cache} and {state}; {fetch}"
        ) from err
    except HfHubHTTPError as err:
        raise HubError(f"{what}: {value!r} could not be fetched from the Hub ({err}); {fetch}") from err
    except (OSError, ValueError) as err:
        raise HubError(f"{what}: {value!r}: {err}; {fetch}") from err
    return Path(folder)
