"""Hub ids resolve through huggingface_hub's own cache, laid out here as huggingface_hub writes it.

No test touches the network: offline mode, or an endpoint on a closed loopback port.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orchestra.model.hub import HubError, is_hub_id, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def fake_cache(home: Path, repo: str, commits: dict[str, dict[str, str]], main: str) -> Path:
    """$HF_HOME/hub/models--org--name/{blobs, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha>}."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(main)
    for commit, files in commits.items():
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, content in files.items():
            sha = hashlib.sha256(content.encode()).hexdigest()
            (root / "blobs" / sha).write_text(content)
            (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return root


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_cache(
        home,
        "Qwen/Qwen2.5-0.5B",
        {
            COMMIT: {"config.json": json.dumps({"model_type": "qwen2"}), "tokenizer.json": "{}"},
            OTHER: {"config.json": json.dumps({"model_type": "qwen2", "old": True})},
        },
        main=COMMIT,
    )
    return home


def test_cached_id_resolves_offline_to_its_snapshot(hub_home: Path) -> None:
    folder = resolve_model_path("Qwen/Qwen2.5-0.5B")
    assert folder == hub_home / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / COMMIT
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "qwen2"}
    old = resolve_model_path(f"Qwen/Qwen2.5-0.5B@{OTHER}")
    assert json.loads((old / "config.json").read_text())["old"] is True


def test_uncached_id_offline_is_one_clear_error(hub_home: Path) -> None:
    with pytest.raises(
        HubError,
        match=r"finetune.init_from: 'meta-llama/Llama-3.2-1B' is not in the Hugging Face "
        r"cache .*hf-home/hub and offline .*hf download meta-llama/Llama-3.2-1B",
    ):
        resolve_model_path("meta-llama/Llama-3.2-1B", "finetune.init_from")


def test_unreachable_hub_uses_the_cache_or_says_so(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B").name == COMMIT
    with pytest.raises(HubError, match=r"'org/missing' .*hf download org/missing"):
        resolve_model_path("org/missing")


def test_local_paths_are_returned_and_bad_values_named(tmp_path: Path, hub_home: Path) -> None:
    assert resolve_model_path(tmp_path) == tmp_path
    for value in ("./nope", str(tmp_path / "nope"), "a//b", "x" * 200 + "/y", "plainname", "../up/down"):
        with pytest.raises(
            HubError, match=r"model.path: .* is neither an existing path nor a Hugging Face Hub id"
        ):
            resolve_model_path(value)


def test_is_hub_id() -> None:
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("google/gemma-2-2b@main")
    assert not any(is_hub_id(v) for v in ("/abs/x", "./x", "~/x", "a/b/c", "name", "a/../b", "a--b/c"))
