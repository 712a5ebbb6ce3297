"""`python -m orchestra.cli.prepare` end to end on a tiny files corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_prepare(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.prepare", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_prepare_cli_files_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"part{i}.jsonl").write_text(
            "\n".join(
                json.dumps({"text": f"record {j} of part {i}: all the world's a stage"}) for j in range(5)
            )
        )
    cache = tmp_path / "cache"
    args = ("data=files", f"data.paths=[{corpus}/*.jsonl]", f"data.cache_dir={cache}", "data.vocab_size=300")
    proc = run_prepare(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = json.loads((cache / "files-bpe300" / "manifest.json").read_text())
    assert manifest["documents"] == 60 and manifest["data_config"]["source"] == "files"
    for expected in ("documents", "tokens", "shards", "files-bpe300", "built in"):
        assert expected in proc.stdout
    assert f"{manifest['splits']['train']['tokens']:,}" in proc.stdout
    assert (tmp_path / "outputs" / "prepare").is_dir()  # Hydra's run dir, under the cwd

    again = run_prepare(tmp_path, *args)
    assert again.returncode == 0 and "already prepared" in again.stdout

    changed = run_prepare(tmp_path, *args[:-1], "data.vocab_size=400", "data.name=files-bpe300")
    assert changed.returncode == 2
    assert "error:" in changed.stdout and "force=true" in changed.stdout and "Traceback" not in changed.stderr


def test_prepare_cli_reports_a_missing_path(tmp_path: Path) -> None:
    proc = run_prepare(
        tmp_path, "data=files", f"data.paths=[{tmp_path}/none/*.txt]", f"data.cache_dir={tmp_path}"
    )
    assert proc.returncode == 2
    assert "matches no" in proc.stdout and "none/*.txt" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
