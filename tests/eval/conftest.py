"""An exported Hugging Face folder of the session's tiny trained run, shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exported_folder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestra.train.export import export_hf

    return export_hf(trained_run / "checkpoints" / "last.ckpt", tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="session")
def corpus_texts(corpus_dir: Path) -> list[str]:
    """Real text the tests did not write: passages of the standard-library corpus."""
    texts = []
    for path in sorted(corpus_dir.glob("*.txt")):
        body = path.read_text()
        texts.extend(body[i : i + 400] for i in range(0, min(len(body), 2400), 400))
    return texts
