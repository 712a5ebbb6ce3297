"""A run trained on a dataset built by data.pipeline: the report's Data section and figure, and the
exported model card, say what the preparation removed, as the dataset's manifest records it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestra.config import DedupConfig, PIIConfig, PipelineConfig
from orchestra.report.build import build_report, write_report
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestra.train.run import train

    root = tmp_path_factory.mktemp("pipeline-run")
    corpus = root / "corpus"
    corpus.mkdir()
    files = sorted(corpus_dir.glob("*.txt"))
    for path in files:
        shutil.copy(path, corpus / path.name)
    for path in files[:3]:  # planted exact copies under other names
        shutil.copy(path, corpus / f"copy-of-{path.name}")
    cfg = tiny_config(
        corpus, root / "data", root / "run", max_steps=6, val_every_n_steps=3, ckpt_every_n_steps=6
    )
    cfg.data.name = "tiny-pipeline"
    cfg.data.paths = [str(corpus / "*.txt")]
    cfg.data.pipeline = PipelineConfig(enabled=True, tasks=2, workers=1, pii=PIIConfig(enabled=True),
                                       dedup=DedupConfig(exact=True))  # fmt: skip
    cfg.data.pipeline.clean.min_chars = 200
    train(cfg)
    return root / "run"


def test_the_report_shows_what_preparation_removed(pipeline_run: Path) -> None:
    summary = json.loads((pipeline_run / "summary.json").read_text())
    dataset = Path(summary["dataset"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    dropped = manifest["pipeline"]["dropped"]
    assert dropped.get("dedup:exact") == 3

    report = build_report(pipeline_run)
    text = report.markdown
    assert "## Data" in text and "![data preparation](data.png)" in text
    for reason, count in dropped.items():
        assert f"| `{reason}` | {count:,} |" in text
    assert (
        f"| documents read / kept | {sum(c['documents'] for c in manifest['pipeline']['ingest'].values()):,} / {manifest['pipeline']['kept_documents']:,} |"
        in text
    )
    assert str((dataset / "datacard.md").resolve()) in text

    # The figure's bars are the manifest's counts.
    top, bottom = report.figures["data.png"].axes
    drawn = {
        t.get_text(): round(b.get_width()) for t, b in zip(top.get_yticklabels(), top.patches, strict=True)
    }
    assert drawn == dropped
    stages = [s for s in manifest["pipeline"]["stages"] if "documents_in" in s]
    labels = [t.get_text() for t in bottom.get_yticklabels()]
    assert labels == [s["name"] for s in stages][::-1]
    widths = sorted(round(b.get_width()) for b in bottom.patches)
    assert widths == sorted([s["documents_in"] for s in stages] + [s["documents_out"] for s in stages])

    write_report(pipeline_run)
    assert (pipeline_run / "data.png").stat().st_size > 0


def test_the_model_card_cites_the_data_card(pipeline_run: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from orchestra.train.export import export_hf

    out = export_hf(pipeline_run / "checkpoints" / "last.ckpt", tmp_path / "export")
    text = ModelCard.load(out / "README.md").text
    dataset = Path(json.loads((pipeline_run / "summary.json").read_text())["dataset"])
    assert f"data card: `{dataset / 'datacard.md'}`" in text
    assert "documents removed in preparation: dedup:exact 3" in text
    assert "PII anonymisation: placeholder (names and addresses: off)" in text


def test_a_run_on_a_dataset_without_a_pipeline_has_no_data_section(trained_run: Path) -> None:
    assert "## Data" not in build_report(trained_run).markdown
