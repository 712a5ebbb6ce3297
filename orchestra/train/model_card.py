"""The README.md model card of every folder ``orchestra-export`` writes, from the run's own records.

A checkpoint in ``<run_dir>/checkpoints/`` has its run dir beside it, which holds what the card
says: the resolved config (``.hydra/config.yaml``, else the settings in ``run.json``),
``summary.json`` (steps, tokens, losses, throughput, energy), CodeCarbon's per-node files in
``emissions/`` (the hardware it measured) and ``energy.csv``, and the results of every
``orchestra-eval`` run on it (``eval/<name>/eval.json``). The prepared dataset's manifest (or
the bundled examples' manifest, or the user's jsonl files) gives the training data's sha256.

The card is Hugging Face's format: YAML metadata (``library_name``, ``tags``, ``base_model``,
``datasets``, ``pipeline_tag``, ``model-index`` from the evaluations, ``co2_eq_emissions`` when
the run measured its energy) built with ``huggingface_hub.ModelCardData``, then markdown. Every
record is optional: one that is missing or unreadable leaves its part out and the card says so;
no number is written that a record does not hold. A checkpoint outside a run dir gets a card
from its own metadata only (architecture, base model, method).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestra.train.checkpoint.meta import CheckpointMeta

README = "README.md"
SUMMARY_FILE = "summary.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
RUN_RECORD = "run.json"  # orchestra/train/rundir.py
EMISSIONS_DIR = "emissions"  # orchestra/train/run.py: build_callbacks
ENERGY_CSV = "energy.csv"  # orchestra/train/callbacks/energy.py
EVAL_DIR = "eval"  # orchestra/cli/eval.py: default_out
EVAL_FILE = "eval.json"  # orchestra/eval/run.py
CHECKPOINTS = "checkpoints"  # orchestra/train/checkpoint/io.py: CHECKPOINT_DIRNAME
DATASET_MANIFEST = "manifest.json"  # orchestra/data/shards.py and orchestra/data/examples.py
DATA_CARD = "datacard.md"  # orchestra/data/pipeline/card.py
DEFAULT_CACHE_DIR = "data"  # DataConfig.cache_dir's default
BIAS_TASK = "bias"
PREFERENCE_TASKS = ("dpo", "kto", "orpo", "simpo", "grpo")  # orchestra/train/tasks/: preference and RL tuning
BIAS_HINT = "orchestra-eval ckpt={ckpt} tasks=[bias]"


# ---------------------------------------------------------------------------------------------
# Small readers: every one returns None (and a note) rather than raising on a bad record.
# ---------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number, or None (bools, strings, NaN and infinities are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _get(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; None when any level is missing or not a mapping."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, notes: list[str], what: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON or not UTF-8
        notes.append(f"{what} (`{path.name}`) could not be read ({type(err).__name__}: {err}); left out")
        return None


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}`` (run.json keeps its settings flat)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[leaf] = value
    return out


def _safetensors_numel(path: Path) -> int | None:
    """Elements stored in a safetensors file, from its header alone (the tensors are not read)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        return sum(
            math.prod(int(d) for d in info["shape"])
            for name, info in header.items()
            if name != "__metadata__"
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _decoder_parameters(meta: CheckpointMeta) -> int | None:
    """Parameters of the decoder the checkpoint's config describes (built on the meta device)."""
    try:
        import torch

        from orchestra.model import Transformer

        with torch.device("meta"):
            model = Transformer(meta.model_config, meta.vocab_size)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # the count is decoration: any failure leaves it out
        return None


# ---------------------------------------------------------------------------------------------
# What the run dir holds.
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalRecord:
    """One ``eval/<name>/eval.json``: its tasks, and whether it evaluated the exported checkpoint."""

    folder: str
    source: str
    this_checkpoint: bool
    tasks: dict[str, dict[str, Any]]


@dataclass
class RunRecords:
    """Everything read from the run dir (all optional), and notes on what was missing or unreadable."""

    run_dir: Path | None = None
    config: dict[str, Any] | None = None
    config_source: str | None = None
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    evals: list[EvalRecord] = field(default_factory=list)
    emissions: list[dict[str, str]] = field(default_factory=list)  # the last row of each node's file
    energy_rows: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_run_dir(ckpt: Path) -> Path | None:
    """``<run_dir>`` of ``<run_dir>/checkpoints/<x>.ckpt`` when it holds a run's records, else None."""
    ckpt = Path(os.path.abspath(ckpt))
    if ckpt.parent.name != CHECKPOINTS:
        return None
    run_dir = ckpt.parent.parent
    markers = (run_dir / SUMMARY_FILE, run_dir / ".hydra", run_dir / RUN_RECORD)
    return run_dir if any(m.exists() for m in markers) else None


def _load_config(run_dir: Path, records: RunRecords) -> None:
    hydra = run_dir / HYDRA_CONFIG
    if hydra.is_file():
        try:
            from omegaconf import OmegaConf

            raw = OmegaConf.load(hydra)
            try:
                plain = OmegaConf.to_container(raw, resolve=True)
            except Exception:  # an interpolation this process cannot resolve: keep it as written
                plain = OmegaConf.to_container(raw, resolve=False)
            if isinstance(plain, dict):
                records.config = {str(k): v for k, v in plain.items()}
                records.config_source = str(HYDRA_CONFIG)
        except Exception as err:  # YAML or OmegaConf errors: the config is optional
            records.notes.append(f"`{HYDRA_CONFIG}` could not be read ({type(err).__name__}); left out")
        overrides = run_dir / HYDRA_OVERRIDES
        if overrides.is_file():
            try:
                from omegaconf import OmegaConf

                listed = OmegaConf.to_container(OmegaConf.load(overrides))
                if isinstance(listed, list):
                    records.overrides = [str(x) for x in listed]
            except Exception:
                pass  # the overrides are decoration: the resolved config above is what counts
    if records.config is not None:
        return
    record = _read_json(run_dir / RUN_RECORD, records.notes, "the run record")
    settings = record.get("settings") if isinstance(record, dict) else None
    if isinstance(settings, dict):
        records.config, records.config_source = _unflatten(settings), RUN_RECORD
        records.notes.append(
            f"no `{HYDRA_CONFIG}` in the run dir: the configuration is taken from `{RUN_RECORD}`, which "
            "records what is trained but not the trainer, strategy, energy or data-cache settings"
        )
    else:
        records.notes.append("no training configuration was found in the run dir")


def _same_checkpoint(source: str, ckpt: Path, folder: str) -> bool:
    """Whether an evaluation's model source is the exported checkpoint (by path, else by name)."""
    if folder == ckpt.stem:  # orchestra-eval's default folder for this checkpoint
        return True
    if not source:
        return False
    given = Path(source)
    if os.path.abspath(given) == os.path.abspath(ckpt):
        return True
    return given.name == ckpt.name and given.parent.name == ckpt.parent.name == CHECKPOINTS


def _load_evals(run_dir: Path, ckpt: Path, records: RunRecords) -> None:
    for path in sorted((run_dir / EVAL_DIR).glob(f"*/{EVAL_FILE}")):
        doc = _read_json(path, records.notes, f"evaluation `{path.parent.name}`")
        if doc is None:
            continue
        tasks = doc.get("tasks") if isinstance(doc, dict) else None
        if not isinstance(tasks, dict):
            records.notes.append(f"evaluation `{path.parent.name}`: `{EVAL_FILE}` holds no tasks; left out")
            continue
        source = _get(doc, "model.source")
        source = str(source) if source is not None else ""
        records.evals.append(
            EvalRecord(
                folder=path.parent.name,
                source=source,
                this_checkpoint=_same_checkpoint(source, ckpt, path.parent.name),
                tasks={str(k): v for k, v in tasks.items() if isinstance(v, dict)},
            )
        )


def _load_emissions(run_dir: Path, records: RunRecords) -> None:
    for path in sorted((run_dir / EMISSIONS_DIR).glob("*.csv")):
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, ValueError, csv.Error) as err:
            records.notes.append(f"`{EMISSIONS_DIR}/{path.name}` could not be read ({err}); left out")
            continue
        if rows:
            records.emissions.append({k: (v or "").strip() for k, v in rows[-1].items() if k})
    path = run_dir / ENERGY_CSV
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    parsed = {k: _num(_float(v)) for k, v in row.items() if k}
                    records.energy_rows.append({k: v for k, v in parsed.items() if v is not None})
        except (OSError, ValueError, csv.Error) as err:
            records.notes.append(f"`{ENERGY_CSV}` could not be read ({err}); left out")


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_run_records(ckpt: str | Path) -> RunRecords:
    """The records of the run ``ckpt`` belongs to; empty (with a note) for a checkpoint outside a run dir."""
    ckpt = Path(ckpt)
    run_dir = find_run_dir(ckpt)
    records = RunRecords(run_dir=run_dir)
    if run_dir is None:
        records.notes.append(
            f"the checkpoint is not in a run dir (`<run_dir>/{CHECKPOINTS}/`), so there are no run records: "
            "no configuration, training results, energy measurement or evaluation is reported"
        )
        return records
    _load_config(run_dir, records)
    summary = _read_json(run_dir / SUMMARY_FILE, records.notes, "the run summary")
    if isinstance(summary, dict):
        records.summary = summary
    elif summary is None and not (run_dir / SUMMARY_FILE).exists():
        records.notes.append(
            f"no `{SUMMARY_FILE}` in the run dir (the run did not finish): no training results"
        )
    _load_evals(run_dir, ckpt, records)
    _load_emissions(run_dir, records)
    return records


# ---------------------------------------------------------------------------------------------
# Facts derived from the checkpoint and the records.
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """One training dataset: its name and what the card can say about its exact content."""

    name: str
    role: str
    lines: list[str] = field(default_factory=list)


def _candidate_paths(given: str, run_dir: Path | None) -> list[Path]:
    """An absolute path as is; a relative one against the current dir and the run dir's ancestors."""
    path = Path(os.path.expanduser(given))
    if path.is_absolute():
        return [path]
    roots = [Path.cwd()]
    if run_dir is not None:
        roots += [run_dir, *run_dir.parents]
    return list(dict.fromkeys(root / path for root in roots))


def _is_fine_tune(meta: CheckpointMeta, config: Mapping[str, Any] | None) -> bool:
    method = _method(meta, config)
    return meta.peft is not None or method not in (None, "none") or meta.task != "pretrain"


def _method(meta: CheckpointMeta, config: Mapping[str, Any] | None) -> str | None:
    if meta.peft is not None:
        return meta.peft.method
    method = _get(config, "finetune.method")
    return str(method) if method is not None else None


def _base_path(meta: CheckpointMeta, config: Mapping[str, Any] | None) -> str | None:
    """The base as the user named it (a Hub id stays one), else where the checkpoint recorded it."""
    given = _get(config, "finetune.init_from") or _get(config, "model.path")
    if given:
        return str(given)
    return meta.peft.base.path if meta.peft is not None else None


def base_model_id(path: str) -> str | None:
    """The ``base_model`` of a card: a Hub id (also from a hub-cache snapshot path) or an HF folder's name.

    None for an Orchestra checkpoint (a ``.ckpt`` file or directory): it names no Hugging Face
    model, so the card names its path and sha256 in the text instead.
    """
    from orchestra.model.hub import is_hub_id

    if not Path(path).exists() and is_hub_id(path):
        return path.partition("@")[0]
    for part in reversed(Path(path).parts):
        if part.startswith("models--") and part.count("--") >= 2:  # huggingface_hub's cache layout
            org, _, name = part[len("models--") :].partition("--")
            return f"{org}/{name}"
    local = Path(path)
    if local.is_dir() and (local / "config.json").is_file():
        return local.name
    if local.suffix == ".ckpt" or local.exists():
        return None
    return local.name or None  # a folder that is no longer there: its name is all that is known


def _pretraining_dataset(
    meta: CheckpointMeta, config: Mapping[str, Any], run_dir: Path | None, fine_tune: bool
) -> DatasetInfo:
    name = str(_get(config, "data.name") or "unnamed")
    info = DatasetInfo(name=name, role="packed pretraining corpus (orchestra-prepare)")
    source = _get(config, "data.source")
    if source is not None:
        info.lines.append(f"source: `{source}`" + _paths_text(_get(config, "data.paths")))
    tokenizer_sha = hashlib.sha256(meta.tokenizer_json.encode("utf-8")).hexdigest()
    names = [name]
    if fine_tune and not name.endswith(f"-tok{tokenizer_sha[:12]}"):
        # A run on a base prepares its data under data.name + "-tok<hash of the base's tokenizer>"
        # (orchestra/train/run.py: config_with_base).
        names.insert(0, f"{name}-tok{tokenizer_sha[:12]}")
    cache_dir = _get(config, "data.cache_dir")
    recorded = cache_dir is not None
    if not recorded:
        # run.json leaves data.cache_dir out: look in its default, and take only a dataset whose
        # tokenizer is the checkpoint's.
        cache_dir = DEFAULT_CACHE_DIR
    found: list[tuple[Path, dict[str, Any]]] = []
    for root in _candidate_paths(str(cache_dir), run_dir):
        for dir_name in names:
            manifest_path = root / dir_name / DATASET_MANIFEST
            if not manifest_path.is_file():
                continue
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict):
                found.append((manifest_path, manifest))
    matching = [f for f in found if _get(f[1], "tokenizer.sha256") == tokenizer_sha]
    if not recorded:
        found = matching
    if not found:
        where = (
            f"data.cache_dir=`{cache_dir}`"
            if recorded
            else (f"`{cache_dir}` (the run's data.cache_dir is not recorded: run.json leaves it out)")
        )
        info.lines.append(
            f"its manifest was not found (looked for `{'` or `'.join(names)}` under {where}), so the "
            "dataset's sha256 cannot be given"
        )
        return info
    manifest_path, manifest = (matching or found)[0]
    info.lines.append(f"prepared dataset: `{manifest_path.parent}`")
    try:
        info.lines.append(f"manifest.json sha256: `{_sha256_file(manifest_path)}`")
    except OSError:
        info.lines.append("manifest.json sha256: unreadable")
    tok = _get(manifest, "tokenizer.sha256")
    if isinstance(tok, str):
        agrees = "the checkpoint's tokenizer" if tok == tokenizer_sha else "NOT the checkpoint's tokenizer"
        info.lines.append(f"tokenizer.json sha256: `{tok}` ({agrees})")
    if not matching:
        info.lines.append(
            "warning: this dataset's tokenizer differs from the checkpoint's, so it was probably rebuilt "
            "after the run; the sha256 above may not be the data the model was trained on"
        )
    corpus = _get(manifest, "corpus.description")
    if isinstance(corpus, str):
        info.lines.append(f"corpus: {corpus}")
    for split in ("train", "val"):
        tokens, docs = _get(manifest, f"splits.{split}.tokens"), _get(manifest, f"splits.{split}.documents")
        if _num(tokens) is not None:
            extra = f", {int(docs):,} documents" if _num(docs) is not None else ""
            info.lines.append(f"{split} split: {int(tokens):,} tokens{extra}")
    info.lines += _pipeline_lines(manifest_path.parent, manifest)
    return info


def _pipeline_lines(dataset_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """What data.pipeline did to the dataset, and where its data card is (cited, not copied)."""
    pipeline = manifest.get("pipeline")
    if not isinstance(pipeline, Mapping):
        return []
    lines = []
    card = dataset_dir / DATA_CARD
    if card.is_file():
        try:
            lines.append(f"data card: `{card}` (sha256 `{_sha256_file(card)}`)")
        except OSError:
            lines.append(f"data card: `{card}` (unreadable)")
    dropped = pipeline.get("dropped")
    if isinstance(dropped, Mapping) and dropped:
        top = sorted(
            ((str(k), v) for k, v in dropped.items() if _num(v) is not None), key=lambda kv: -float(kv[1])
        )
        text = ", ".join(f"{k} {int(v):,}" for k, v in top[:5])
        lines.append(f"documents removed in preparation: {text}" + (", …" if len(top) > 5 else ""))
    kept, languages = pipeline.get("kept_documents"), pipeline.get("languages")
    if _num(kept) is not None:
        lines.append(f"documents kept: {int(kept):,}")
    if isinstance(languages, Mapping) and languages:
        lines.append(
            "languages: "
            + ", ".join(f"{k} {v}" for k, v in sorted(languages.items(), key=lambda kv: -kv[1])[:6])
        )
    pii = _get(manifest, "data_config.pipeline.pii")
    if isinstance(pii, Mapping):
        if pii.get("enabled"):
            backend = pipeline.get("pii_backend", "off")
            lines.append(
                f"PII anonymisation: {pii.get('mode', 'placeholder')} (names and addresses: {backend})"
            )
        else:
            lines.append("PII anonymisation: off")
    return lines


def _paths_text(paths: Any) -> str:
    if isinstance(paths, list) and paths:
        return " (" + ", ".join(f"`{p}`" for p in paths[:4]) + (", …" if len(paths) > 4 else "") + ")"
    return ""


def _task_datasets(task: str, config: Mapping[str, Any], run_dir: Path | None) -> list[DatasetInfo]:
    train_path, val_path = _get(config, "task.train_path"), _get(config, "task.val_path")
    if train_path:
        out = []
        for role, given in (("train", train_path), ("validation", val_path)):
            if not given:
                continue
            info = DatasetInfo(name=Path(str(given)).stem, role=f"{task} {role} examples (jsonl)")
            info.lines.append(f"path: `{given}`")
            existing = [p for p in _candidate_paths(str(given), run_dir) if p.is_file()]
            if existing:
                try:
                    info.lines.append(f"sha256: `{_sha256_file(existing[0])}`")
                except OSError:
                    info.lines.append("sha256: unreadable")
            else:
                info.lines.append("the file was not found, so its sha256 cannot be given")
            out.append(info)
        if not val_path:
            fraction = _get(config, "task.val_fraction")
            if _num(fraction) is not None:
                out[0].lines.append(f"validation: {fraction} of it held out (seeded)")
        return out

    from orchestra.data.examples import EXAMPLES_VERSION, examples_dir

    info = DatasetInfo(
        name=f"orchestra-examples-v{EXAMPLES_VERSION}-{task}",
        role=f"the bundled {task} examples (built from the Shakespeare corpus, orchestra/data/examples.py)",
    )
    cache_dir = _get(config, "data.cache_dir")
    if cache_dir is None:
        info.lines.append("their manifest was not looked up: the run's `data.cache_dir` is not recorded")
        return [info]
    for root in _candidate_paths(str(cache_dir), run_dir):
        manifest_path = examples_dir(root) / DATASET_MANIFEST
        if not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            info.lines.append(f"examples: `{manifest_path.parent}`")
            info.lines.append(f"manifest.json sha256: `{_sha256_file(manifest_path)}`")
        except (OSError, ValueError):
            continue
        for split in ("train", "val"):
            sha, count = (
                _get(manifest, f"files.{task}/{split}.jsonl"),
                _get(manifest, f"counts.{task}.{split}"),
            )
            if isinstance(sha, str):
                counted = f" ({int(count):,} examples)" if _num(count) is not None else ""
                info.lines.append(f"`{task}/{split}.jsonl` sha256: `{sha}`{counted}")
        corpus = _get(manifest, "corpus.description")
        if isinstance(corpus, str):
            info.lines.append(f"corpus: {corpus}")
        return [info]
    info.lines.append(f"their manifest was not found under data.cache_dir=`{cache_dir}`")
    return [info]


def training_datasets(meta: CheckpointMeta, records: RunRecords) -> list[DatasetInfo]:
    """The datasets the run trained on, each with what its manifest (or file) proves about it."""
    config = records.config
    if config is None:
        return []
    task = str(_get(config, "task.name") or meta.task)
    if task == "pretrain":  # the one task on packed full rows (orchestra/train/tasks/pretrain.py)
        return [_pretraining_dataset(meta, config, records.run_dir, _is_fine_tune(meta, config))]
    return _task_datasets(task, config, records.run_dir)


@dataclass
class Energy:
    """The run's measured energy and emissions, and where the numbers come from."""

    kwh: float | None
    co2_kg: float
    j_per_token: float | None
    source: str
    location: str | None
    hardware: str | None


def _location(config: Mapping[str, Any] | None, emissions: Sequence[Mapping[str, str]]) -> str | None:
    country, region = _get(config, "energy.country_iso_code"), _get(config, "energy.region")
    if country:
        return f"{country} ({region})" if region else str(country)
    for row in emissions:
        iso, name, region = row.get("country_iso_code"), row.get("country_name"), row.get("region")
        if iso or name:
            where = f"{name} ({iso})" if name and iso else str(iso or name)
            return f"{where}, {region}" if region else where
    return None


def _hardware(
    config: Mapping[str, Any] | None,
    summary: Mapping[str, Any] | None,
    emissions: Sequence[Mapping[str, str]],
) -> str | None:
    """What CodeCarbon saw on each node (GPU and CPU model), else what the trainer was configured to use."""
    nodes: list[str] = []
    for row in emissions:
        parts = []
        gpu_model, gpu_count = row.get("gpu_model", ""), _num(_float(row.get("gpu_count")))
        if gpu_model:
            starts_with_count = gpu_model.split(" x ", 1)[0].strip().isdigit()
            count = f"{int(gpu_count)} x " if gpu_count and not starts_with_count else ""
            parts.append(f"{count}{gpu_model}")
        elif gpu_count:
            parts.append(f"{int(gpu_count)} GPU(s)")
        if row.get("cpu_model"):
            cpus = _num(_float(row.get("cpu_count")))
            parts.append(f"CPU: {row['cpu_model']}" + (f" ({int(cpus)} threads)" if cpus else ""))
        if parts:
            nodes.append(", ".join(parts))
    if nodes:
        distinct = list(dict.fromkeys(nodes))
        if len(nodes) == 1:
            return nodes[0]
        if len(distinct) == 1:
            return f"{len(nodes)} nodes, each: {distinct[0]}"
        return "; ".join(f"node {i}: {n}" for i, n in enumerate(nodes))
    accelerator, devices = _get(config, "trainer.accelerator"), _get(config, "trainer.devices")
    nodes_n, world = _get(config, "trainer.num_nodes"), _get(summary, "world_size")
    if accelerator is None and world is None:
        return None
    text = f"accelerator={accelerator}" if accelerator is not None else ""
    if devices is not None:
        text += f", {devices} device(s) per node x {nodes_n or 1} node(s)"
    if _num(world) is not None:
        text += f"{', ' if text else ''}world size {int(world)}"
    return text + " (from the trainer config; CodeCarbon recorded no hardware)"


def measured_energy(records: RunRecords) -> Energy | None:
    """summary.json's energy totals (else energy.csv's last row); None when the run measured none."""
    summary, config = records.summary, records.config
    co2 = _num(_get(summary, "co2_kg"))
    if co2 is not None:
        kwh, jpt, source = _num(_get(summary, "energy_kwh")), _num(_get(summary, "j_per_token")), SUMMARY_FILE
    else:
        rows = [r for r in records.energy_rows if _num(r.get("kg_co2eq")) is not None]
        if summary is not None or not rows:
            return None
        last = rows[-1]
        co2, kwh, jpt = last["kg_co2eq"], last.get("kwh"), last.get("j_per_token")
        step = last.get("step")
        source = f"{ENERGY_CSV}, its last row" + (f" (step {int(step)})" if step is not None else "")
    return Energy(
        kwh=kwh,
        co2_kg=co2,
        j_per_token=jpt,
        source=source,
        location=_location(config, records.emissions),
        hardware=_hardware(config, summary, records.emissions),
    )


# ---------------------------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "(none)"
    return str(value)


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _count(n: int | None) -> str:
    if n is None:
        return "an unknown number of"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit} ({n:,})"
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# The card.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Card:
    """What the sections share."""

    ckpt: Path
    meta: CheckpointMeta
    folder: Path
    name: str
    peft_only: bool
    records: RunRecords
    datasets: list[DatasetInfo]
    energy: Energy | None
    fine_tune: bool
    method: str | None
    base: str | None
    step: int | None

    @property
    def config(self) -> dict[str, Any] | None:
        return self.records.config

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.records.summary

    @property
    def task(self) -> str:
        return str(_get(self.config, "task.name") or self.meta.task)

    @property
    def peft_format(self) -> bool:
        """A PEFT-only folder peft reads (LoRA, prompt tuning); an adapter folder is Orchestra's own."""
        # peft's adapter config file name (export.PEFT_CONFIG_FILE; export imports this module).
        return self.peft_only and (self.folder / "adapter_config.json").is_file()

    def our_evals(self) -> list[EvalRecord]:
        return [e for e in self.records.evals if e.this_checkpoint]


def _checkpoint_step(ckpt: Path) -> int | None:
    try:
        from orchestra.train.checkpoint.io import checkpoint_step

        return checkpoint_step(ckpt)
    except Exception:  # the step is decoration
        return None


def _eval_results(card: _Card) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for record in card.our_evals():
        for task, body in record.tasks.items():
            metrics = body.get("metrics")
            if not isinstance(metrics, dict):
                continue
            details = body.get("details") if isinstance(body.get("details"), dict) else {}
            assert isinstance(details, dict)
            dataset = details.get("source") or details.get("probe") or task
            for metric, value in metrics.items():
                number = _num(value)
                if number is None:
                    continue
                results.append(
                    EvalResult(
                        task_type="text-classification" if task == "classification" else "text-generation",
                        task_name=task,
                        dataset_type=task,
                        dataset_name=str(dataset),
                        metric_type=str(metric),
                        metric_name=str(metric),
                        metric_value=number,
                    )
                )
    return results


def _card_data(card: _Card) -> Any:
    from huggingface_hub import ModelCardData

    tags = ["orchestra", card.task]
    if card.method not in (None, "none"):
        tags.append(str(card.method))
    if card.peft_only:
        tags.append("peft")
    tags.append(card.meta.model_config.family)
    kwargs: dict[str, Any] = {}
    if card.energy is not None:
        co2: dict[str, Any] = {
            "emissions": float(f"{card.energy.co2_kg * 1000:.6g}"),  # grams CO2eq
            "source": "codecarbon",
            "training_type": "fine-tuning" if card.fine_tune else "pre-training",
        }
        if card.energy.location:
            co2["geographical_location"] = card.energy.location
        if card.energy.hardware:
            co2["hardware_used"] = card.energy.hardware
        kwargs["co2_eq_emissions"] = co2
    eval_results = _eval_results(card)
    # A bottleneck-adapter folder is Orchestra's own format (peft has no such method): no library.
    library = ("peft" if card.peft_format else None) if card.peft_only else "transformers"
    return ModelCardData(
        library_name=library,
        tags=tags,
        base_model=base_model_id(card.base) if card.fine_tune and card.base else None,
        datasets=[d.name for d in card.datasets] or None,
        pipeline_tag="text-classification" if card.meta.is_classifier else "text-generation",
        model_name=card.name if eval_results else None,
        eval_results=eval_results or None,
        **kwargs,
    )


def _intro(card: _Card) -> list[str]:
    cfg = card.meta.model_config
    what = "PEFT weights (the trained tensors only) of a" if card.peft_only else "A"
    kind = "sequence classifier" if card.meta.is_classifier else "causal language model"
    how = (
        f"fine-tuned with Orchestra from `{card.base or 'an unrecorded base'}` "
        f"(method `{card.method or 'unrecorded'}`, task `{card.task}`)"
        if card.fine_tune
        else "pre-trained from scratch with Orchestra"
    )
    step = f" at step {card.step:,}" if card.step is not None else ""
    lines = [
        f"# {card.name}",
        "",
        f"{what} {cfg.family}-family {kind} {how}, exported by `orchestra-export` from the checkpoint "
        f"`{card.ckpt}`{step}. Every number in this card is read from "
        + ("the run's own records" if card.records.run_dir is not None else "the checkpoint's own metadata")
        + "; a part whose record was missing says so instead.",
    ]
    if card.records.run_dir is None:
        lines += ["", "> This checkpoint is not inside a run dir: no run records were found, so this card "
                  "describes the model from the checkpoint's metadata only (no training data, results, "
                  "energy or evaluation)."]  # fmt: skip
    return lines


def _description(card: _Card) -> list[str]:
    cfg, meta = card.meta.model_config, card.meta
    from orchestra.model.families import family

    try:
        spec = family(cfg.family)
        arch = spec.classifier_architecture if meta.is_classifier else spec.architecture
    except ValueError:
        arch = None
    lines = ["## Model description", ""]
    rows: list[tuple[str, Any]] = [("family", cfg.family), ("transformers architecture", arch)]
    if card.peft_only:
        adapter = _safetensors_numel(card.folder / "adapter_model.safetensors")
        rows += [
            ("trained (exported) parameters", adapter),
            ("base model parameters", _decoder_parameters(meta)),
        ]
    else:
        rows.append(("parameters", _safetensors_numel(card.folder / "model.safetensors")))
    rows += [
        ("layers", cfg.n_layers),
        ("hidden size (dim)", cfg.dim),
        ("attention heads", cfg.n_heads),
        ("key/value heads", cfg.n_kv_heads or cfg.n_heads),
        ("MLP hidden size", cfg.ffn_dim),
        ("context length (tokens)", cfg.max_seq_len),
        ("vocabulary (embedding rows)", meta.vocab_size),
        ("tied input/output embeddings", cfg.tie_embeddings),
        ("RoPE base", cfg.rope_theta),
    ]
    if meta.is_classifier:
        rows.append(("labels", list(meta.labels)))
    tokenizer_sha = hashlib.sha256(meta.tokenizer_json.encode("utf-8")).hexdigest()
    rows.append(("tokenizer.json sha256", f"`{tokenizer_sha}`"))
    if meta.peft is not None:
        rows.append(("base model", f"`{meta.peft.base.path}` (sha256 `{meta.peft.base.sha256[:16]}…`)"))
    elif card.fine_tune and card.base:
        rows.append(("base model", f"`{card.base}`"))
    lines += _table(["property", "value"], rows)
    return lines


def _data_section(card: _Card) -> list[str]:
    lines = ["## Training data", ""]
    if card.config is None:
        return [*lines, "Not recorded: no training configuration was found, so the training data is unknown."]
    if not card.datasets:
        return [*lines, "The run's configuration names no dataset."]
    for info in card.datasets:
        lines.append(f"- **{info.name}**: {info.role}")
        lines += [f"  - {line}" for line in info.lines]
    if card.fine_tune:
        lines += ["", "The base model's own training data is described by the base model's card, not here."]
    return lines


def _method_settings(card: _Card) -> list[tuple[str, Any]]:
    method = card.method
    settings: Mapping[str, Any] | None = card.meta.peft.config if card.meta.peft is not None else None
    if settings is None:
        settings = _get(card.config, "finetune") if isinstance(_get(card.config, "finetune"), dict) else None
    if method in (None, "none") or settings is None:
        return []
    keys = {
        "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
        "adapter": ("adapter_bottleneck",),
        "prompt": ("prompt_tokens",),
        "unfreeze": ("unfreeze_every_n_steps", "layer_lr_decay"),
        "full": ("layer_lr_decay", "l2sp"),
    }.get(str(method), ())
    rows = [(f"finetune.{k}", settings.get(k)) for k in (*keys, "seq_len") if k in settings]
    if settings.get("l2sp") and ("finetune.l2sp", settings.get("l2sp")) not in rows:
        rows.append(("finetune.l2sp", settings.get("l2sp")))
    return rows


def _hyperparameters(card: _Card) -> list[str]:
    cfg, summary = card.config, card.summary
    lines = ["### Training hyperparameters", ""]
    if cfg is None and card.meta.peft is None:
        return [*lines, "Not recorded: no training configuration was found next to this checkpoint."]
    rows: list[tuple[str, Any]] = []

    def put(label: str, value: Any) -> None:
        if value is not None:
            rows.append((label, value))

    put("task", _get(cfg, "task.name") or card.meta.task)
    if card.method not in (None, "none"):
        put("fine-tuning method", card.method)
    rows += _method_settings(card)
    if card.task in PREFERENCE_TASKS:
        put("task.beta", _get(cfg, "task.beta"))
    put("optimizer", _get(cfg, "optim.name"))
    put("learning rate", _get(cfg, "optim.lr"))
    put("betas", _get(cfg, "optim.betas"))
    put("eps", _get(cfg, "optim.eps"))
    put("weight decay", _get(cfg, "optim.weight_decay"))
    schedule = _get(cfg, "scheduler.name")
    put("schedule", schedule)
    put("warmup steps", _get(cfg, "scheduler.warmup_steps"))
    if schedule in ("cosine", "wsd"):
        put("minimum lr ratio", _get(cfg, "scheduler.min_lr_ratio"))
    if schedule == "wsd":
        put("decay fraction", _get(cfg, "scheduler.decay_fraction"))
    if schedule == "step":
        put("step size", _get(cfg, "scheduler.step_size"))
        put("gamma", _get(cfg, "scheduler.gamma"))
    put("max steps (configured)", _get(cfg, "trainer.max_steps"))
    put("global batch size (sequences)", _get(cfg, "trainer.global_batch_size"))
    put("micro batch size (per device)", _get(cfg, "trainer.micro_batch_size"))
    put("gradient clipping", _get(cfg, "trainer.grad_clip"))
    put("precision", _get(summary, "precision") or _get(cfg, "trainer.precision"))
    put("strategy", _get(summary, "strategy") or _get(cfg, "strategy.name"))
    ac = _get(cfg, "strategy.activation_checkpointing")
    if ac not in (None, "none"):
        put("activation checkpointing", ac)
    put("world size (devices)", _get(summary, "world_size"))
    seed = _get(cfg, "seed")
    put("seed", None if seed is None else str(seed))
    lines += _table(["setting", "value"], rows)
    if card.records.config_source:
        lines += ["", f"From `{card.records.config_source}`" + (" and `summary.json`." if summary else ".")]
    elif card.meta.peft is not None:
        lines += ["", "From the checkpoint's PEFT record (no run configuration was found)."]
    if card.records.overrides:
        lines += ["", "Launched with: `" + " ".join(card.records.overrides) + "`"]
    return lines


def _results(card: _Card) -> list[str]:
    summary = card.summary
    lines = ["### Training results", ""]
    if summary is None:
        return [*lines, "Not recorded: the run has no readable `summary.json`."]
    rows: list[tuple[str, Any]] = [
        ("steps", _get(summary, "steps")),
        ("tokens", _get(summary, "tokens")),
        ("final train loss", _num(_get(summary, "train_loss"))),
        ("final validation loss", _num(_get(summary, "val_loss"))),
        ("validation perplexity", _num(_get(summary, "val_ppl"))),
    ]
    val = _get(summary, "val_metrics")
    if isinstance(val, dict):
        rows += [(f"validation {k}", _num(v)) for k, v in val.items() if k not in ("loss", "ppl")]
    rows += [
        ("throughput (tokens/s)", _num(_get(summary, "tokens_per_s"))),
        ("model FLOPs utilisation", _num(_get(summary, "mfu"))),
        ("wall time (s)", _num(_get(summary, "wall_s"))),
        ("energy (kWh)", _num(_get(summary, "energy_kwh"))),
        ("emissions (kg CO2eq)", _num(_get(summary, "co2_kg"))),
        ("energy per token (J)", _num(_get(summary, "j_per_token"))),
        ("trainable parameters", _get(summary, "trainable_parameters")),
        ("loss-guard events", _get(summary, "guard_events")),
        ("resumed from", _get(summary, "resumed_from")),
    ]
    lines += _table(["property", "value"], [(k, v) for k, v in rows if v is not None])
    steps = _num(_get(summary, "steps"))
    if card.step is not None and steps is not None and int(steps) != card.step:
        lines += ["", f"These are the run's final numbers (step {int(steps):,}); the exported checkpoint is "
                      f"from step {card.step:,}."]  # fmt: skip
    return lines


def _environment(card: _Card) -> list[str]:
    lines = ["### Environmental impact", ""]
    energy = card.energy
    if energy is None:
        enabled = _get(card.config, "energy.enabled")
        if card.records.run_dir is None:
            why = "the checkpoint is outside a run dir"
        elif enabled is False:
            why = "the run had `energy.enabled=false`"
        elif card.summary is not None:
            why = ("the run's `summary.json` records no energy (measurement was off, `energy=none`, or "
                   "CodeCarbon could not measure)")  # fmt: skip
        else:
            why = "the run's records hold no energy measurement"
        return [*lines, f"Not measured: {why}, so this card gives no energy use or emissions (no "
                        "`co2_eq_emissions` metadata)."]  # fmt: skip
    rows = [
        ("energy (kWh)", energy.kwh),
        ("emissions (g CO2eq)", energy.co2_kg * 1000),
        ("energy per token (J)", energy.j_per_token),
        ("location (grid carbon intensity)", energy.location),
        ("hardware", energy.hardware),
    ]
    lines += _table(["property", "value"], [(k, v) for k, v in rows if v is not None])
    lines += [
        "",
        f"Measured by CodeCarbon during training (from `{energy.source}`): the whole machine of each node "
        "(GPUs, CPU, RAM), times the data centre's PUE, with emissions = energy x the grid carbon intensity "
        "CodeCarbon holds for the configured country or region. Evaluation and export are not included.",
    ]
    return lines


def _eval_section(card: _Card) -> list[str]:
    lines = ["## Evaluation", ""]
    if card.records.run_dir is None:
        return [*lines, "No evaluation results: the checkpoint is not in a run dir."]
    if not card.records.evals:
        return [
            *lines,
            f"No evaluation was found in `{EVAL_DIR}/` of the run dir; run `orchestra-eval ckpt={card.ckpt}` "
            "and export again to include it.",
        ]
    rows = []
    for record in card.records.evals:
        for task, body in record.tasks.items():
            metrics = body.get("metrics")
            if not isinstance(metrics, dict):
                continue
            details = body.get("details") if isinstance(body.get("details"), dict) else {}
            assert isinstance(details, dict)
            data = details.get("source") or details.get("probe") or ""
            for metric, value in metrics.items():
                n = body.get("n")
                rows.append((record.folder, task, data, metric, value, n))
    lines += _table(["evaluation", "task", "data", "metric", "value", "n"], rows)
    others = [e for e in card.records.evals if not e.this_checkpoint]
    if others:
        listed = ", ".join(f"`{e.folder}` (of `{e.source or 'an unrecorded model'}`)" for e in others)
        lines += ["", f"Not of this checkpoint, so left out of the `model-index` metadata: {listed}."]
    return lines


def _bias_section(card: _Card) -> list[str]:
    lines = ["## Bias", ""]
    found = [(e, e.tasks[BIAS_TASK]) for e in card.records.evals if BIAS_TASK in e.tasks]
    found.sort(key=lambda pair: not pair[0].this_checkpoint)
    if not found:
        return [
            *lines,
            "No bias probe was run on this model; run "
            f"`{BIAS_HINT.format(ckpt=card.ckpt)}` and export again to include its results. Not having "
            "measured bias says nothing about whether the model has it.",
        ]
    for record, body in found:
        whose = "this checkpoint" if record.this_checkpoint else f"`{record.source or 'another model'}`"
        lines.append(f"Bias probe `{record.folder}` (of {whose}):")
        lines.append("")
        metrics = body.get("metrics")
        if isinstance(metrics, dict) and metrics:
            lines += _table(["metric", "value"], list(metrics.items()))
        else:
            lines.append("(its record holds no metrics)")
        measures = _get(body, "details.measures")
        units = _get(body, "details.units")
        if isinstance(units, str):
            lines += ["", f"Units: {units}."]
        if isinstance(measures, str) and measures.strip():
            lines += ["", "What these numbers measure, as the probe states it:", "", "> " + measures.strip()]
        lines.append("")
    return lines[:-1]


def _limitations(card: _Card) -> list[str]:
    lines = ["## Limitations", ""]
    params = _safetensors_numel(card.folder / "model.safetensors") if not card.peft_only else None
    params = params if params is not None else _decoder_parameters(card.meta)
    tokens, steps = _num(_get(card.summary, "tokens")), _num(_get(card.summary, "steps"))
    scale = f"This is a {_count(params)}-parameter model"
    if tokens is not None and steps is not None:
        scale += f" whose run trained on {int(tokens):,} tokens over {int(steps):,} steps"
    scale += ". "
    if params is not None and params < 1_000_000_000:
        scale += ("That is small-scale: treat it as a research and testing artefact, expect its output to be "
                  "often wrong or incoherent, and do not rely on it for facts or instructions.")  # fmt: skip
    lines.append("- " + scale.strip())
    if card.datasets:
        names = ", ".join(f"`{d.name}`" for d in card.datasets)
        lines.append(
            f"- It knows only what its training data covers ({names}, described above"
            + (", plus what its base model learned" if card.fine_tune else "")
            + "); text of other domains, languages or periods is outside it."
        )
    else:
        lines.append("- Its training data is not recorded here, so what it covers cannot be stated.")
    if any(BIAS_TASK in e.tasks for e in card.records.evals):
        lines.append(
            "- The bias probe measures only what its own statement above says, on its own templates and "
            "groups. It does not measure harm in generation or downstream use, and a small gap is not "
            "evidence that the model is unbiased."
        )
    else:
        lines.append("- No bias probe was run, so nothing is known about its biases; assume it has them.")
    if card.task in PREFERENCE_TASKS:
        lines.append(
            f"- It was trained with a preference or reinforcement-learning task (`{card.task}`) on the data above; that moves it "
            "towards those preferences and is not safety training unless that data was built for it. It "
            "has no output filtering."
        )
    else:
        lines.append(
            "- It has had no safety or preference tuning (no RLHF or DPO in this run) and no output filtering: "
            "it can produce offensive, harmful or false text and should not be deployed to users as is."
        )
    if card.energy is None:
        lines.append("- Its training energy and emissions were not measured (see above).")
    return lines


def _peft_base(base: str | None) -> tuple[str, str]:
    """(what to pass to from_pretrained for the base, how to get it) in the peft snippet."""
    if not base:
        return "path/to/base", "its base is not recorded"
    ident = base_model_id(base) or ""
    path = Path(base)
    if "/" in ident and not Path(ident).exists() and (not path.exists() or (path / "config.json").is_file()):
        return ident, "the Hub model"
    if (path / "config.json").is_file():
        return str(path), "its Hugging Face folder"
    return "path/to/base-hf", f"export it first: `orchestra-export ckpt={base} out=path/to/base-hf`"


def _usage(card: _Card) -> list[str]:
    lines = ["## How to use", ""]
    folder = f"path/to/{card.name}"
    if card.peft_only and card.peft_format:
        base, hint = _peft_base(card.base)
        lines += [
            f"Load the base model ({hint}) and wrap it with these weights:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            "```",
        ]
        return lines
    if card.peft_only:
        return [
            *lines,
            "Hugging Face peft has no bottleneck adapters: only Orchestra reads this folder.",
            "",
            "```python",
            "from pathlib import Path",
            "",
            "from orchestra.train.export import load_peft_export",
            "from orchestra.train.finetune import rebuild_peft_model",
            "",
            f'folder = Path("{folder}")',
            "model = rebuild_peft_model(*load_peft_export(folder), folder)  # loads the recorded base",
            "```",
        ]
    if card.meta.is_classifier:
        return [
            *lines,
            "```python",
            "from transformers import pipeline",
            "",
            f'classify = pipeline("text-classification", model="{folder}")',
            'print(classify("To be, or not to be, that is the question."))',
            "```",
        ]
    prompt = _get(card.config, "trainer.sample_prompt") or "ROMEO:"
    return [
        *lines,
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
        f'inputs = tokenizer({json.dumps(str(prompt))}, return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, top_k=50)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
    ]


def _provenance(card: _Card) -> list[str]:
    lines = ["## Provenance", ""]
    lines.append(f"- checkpoint: `{card.ckpt}`" + (f" (step {card.step:,})" if card.step is not None else ""))
    if card.records.run_dir is not None:
        lines.append(f"- run dir: `{card.records.run_dir}`")
    lines += [f"- {note}" for note in card.records.notes]
    return lines


def build_model_card(
    folder: str | Path,
    ckpt: str | Path,
    meta: CheckpointMeta,
    *,
    name: str | None = None,
    peft_only: bool = False,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of the export in ``folder`` (its weights already written there)."""
    from huggingface_hub import ModelCard

    folder, ckpt = Path(folder), Path(ckpt)
    records = read_run_records(ckpt)
    config = records.config
    card = _Card(
        ckpt=ckpt,
        meta=meta,
        folder=folder,
        name=name or folder.name,
        peft_only=peft_only,
        records=records,
        datasets=training_datasets(meta, records),
        energy=measured_energy(records),
        fine_tune=_is_fine_tune(meta, config),
        method=_method(meta, config),
        base=_base_path(meta, config),
        step=_checkpoint_step(ckpt),
    )
    data = _card_data(card)
    sections = [
        _intro(card),
        _description(card),
        _data_section(card),
        ["## Training procedure"],
        _hyperparameters(card),
        _results(card),
        _environment(card),
        _eval_section(card),
        _bias_section(card),
        _limitations(card),
        _usage(card),
        _provenance(card),
    ]
    body = "\n\n".join("\n".join(section) for section in sections)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(
    folder: str | Path,
    ckpt: str | Path,
    meta: CheckpointMeta,
    *,
    name: str | None = None,
    peft_only: bool = False,
) -> Path:
    """Write ``folder/README.md``, the model card of the export in ``folder``; returns its path."""
    path = Path(folder) / README
    card = build_model_card(folder, ckpt, meta, name=name, peft_only=peft_only)
    path.write_text(str(card), encoding="utf-8")
    return path
