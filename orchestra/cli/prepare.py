"""`orchestra-prepare`: build (or find) the packed dataset of a data config and summarise it.

Examples::

    orchestra-prepare                                            # Shakespeare, byte-level BPE 4096
    orchestra-prepare data=stdlib
    orchestra-prepare data=files data.paths='[corpus/*.jsonl]' data.name=mycorpus
    orchestra-prepare force=true                                 # rebuild in place
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.table import Table

from orchestra.cli.common import CONF_DIR, console, fail, table
from orchestra.config import ConfigError, PrepareConfig, register_configs


def summary_tables(manifest: dict[str, Any], dataset_dir: Path, built: bool) -> list[Table]:
    """Counts per split, then the facts a user checks before training on the dataset."""
    splits = manifest["splits"]
    corpus = manifest.get("corpus", {})
    split = manifest.get("split", {})
    counts = Table(title=f"Orchestra dataset — {dataset_dir.name}", title_justify="left")
    for column in ("", "train", "val", "total"):
        counts.add_column(
            column, justify="left" if not column else "right", style="bold" if not column else None
        )
    for label, values in (
        ("documents", [int(splits[s]["documents"]) for s in ("train", "val")]),
        ("tokens", [int(splits[s]["tokens"]) for s in ("train", "val")]),
        ("shards", [len(splits[s]["shards"]) for s in ("train", "val")]),
    ):
        counts.add_row(label, *(f"{v:,}" for v in values), f"{sum(values):,}")
    facts: dict[str, Any] = {
        "corpus": corpus.get("description"),
        "vocab": f"{manifest['vocab_size']:,} ({manifest['dtype']} shards)",
        "eos": f"{manifest.get('eos_token')!r} = {manifest['eos_id']}",
        "val split": f"{split.get('method')} (fraction {split.get('val_fraction')}, seed {split.get('seed')})",
        "tokenizer sha256": manifest["tokenizer"]["sha256"],
        "dataset dir": str(dataset_dir.resolve()),
        "status": f"built in {manifest.get('prepare_seconds', 0):.1f} s"
        if built
        else "already prepared (reused)",
    }
    if corpus.get("fallback_reason"):
        facts["FALLBACK corpus"] = f"{corpus.get('kind')}: {corpus['fallback_reason']}"
    return [counts, table("", facts)]


@hydra.main(config_path=CONF_DIR, config_name="prepare", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from orchestra.data.dataset import load_manifest
    from orchestra.data.errors import DataError
    from orchestra.data.pack import prepare_dataset

    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        fail(f"invalid configuration: {err}")
        return
    assert isinstance(config, PrepareConfig)
    started = time.time()
    try:
        dataset_dir = prepare_dataset(config.data, seed=config.seed, force=config.force)
        manifest = load_manifest(dataset_dir)
    except (ConfigError, DataError) as err:
        fail(str(err))
        return
    built = (dataset_dir / "manifest.json").stat().st_mtime >= started - 1
    for tab in summary_tables(manifest, dataset_dir, built):
        console.print(tab)


def main() -> None:
    register_configs()
    _main()


if __name__ == "__main__":
    main()
