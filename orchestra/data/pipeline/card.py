"""The data card: a dataset's sources, licences, filters, PII policy, language mix and token counts.

Written as ``datacard.md`` beside the manifest from what the manifest records (so the card and
the data cannot disagree), in the dataset-card layout Hugging Face uses (YAML front matter, then
sections); an exported model's card links it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD_FILE = "datacard.md"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render(manifest: dict[str, Any]) -> str:
    """Markdown of the data card of a prepared dataset's manifest (one built by data.pipeline)."""
    pipeline = manifest.get("pipeline") or {}  # the provenance keys sit at the manifest's top level
    data = manifest.get("data_config", {})
    settings = data.get("pipeline", {})
    sources = settings.get("sources") or [
        {"name": k, "paths": [], "license": ""} for k in pipeline.get("ingest", {})
    ]
    splits = manifest.get("splits", {})
    tokens = {split: info.get("tokens", 0) for split, info in splits.items()}
    languages: dict[str, int] = pipeline.get("languages", {})
    lines = [
        "---",
        f"pretty_name: {data.get('name', 'dataset')}",
        "license: "
        + (", ".join(sorted({s.get("license") for s in sources if s.get("license")})) or "unknown"),
        "language: [" + ", ".join(sorted(languages)) + "]",
        "---",
        "",
        f"# {data.get('name', 'dataset')}",
        "",
        f"{pipeline.get('kept_documents', 0):,} documents, {sum(tokens.values()):,} tokens "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(tokens.items()))}); vocabulary {manifest.get('vocab_size')}. "
        f"Pipeline settings hash `{pipeline.get('config_sha256', '')[:16]}`.",
        "",
        "## Sources",
        "",
    ]
    rows = []
    for s in sources:
        name = s.get("name", "")
        seen = pipeline.get("ingest", {}).get(name, {})
        rows.append([
            name, ", ".join(s.get("paths", [])) or "-", s.get("license") or "unknown", seen.get("documents", 0),
            sum(seen.get("skipped", {}).values()), pipeline.get("kept_by_source", {}).get(name, 0),
            f"{pipeline.get('tokens_by_source', {}).get(name, 0):,}",
        ])  # fmt: skip
    lines += _table(["source", "paths", "licence", "read", "skipped (no text)", "kept", "tokens"], rows)
    mixture = pipeline.get("mixture")
    if mixture:
        lines += ["", "Training mixture (documents repeated or subsampled to each source's share):", ""]
        lines += _table(
            ["source", "asked", "natural tokens", "written tokens", "share", "factor"],
            [[name, f"weight {m['weight']}" if m.get("weight") is not None
              else (f"epochs {m['epochs']}" if m.get("epochs") is not None else "as read"),
              f"{m['natural_tokens']:,}", f"{m['tokens']:,}", f"{m['share']:.1%}", f"{m['factor']:.2f}x"]
             for name, m in mixture.items()],
        )  # fmt: skip
    lines += ["", "## What was removed, and why", ""]
    dropped = pipeline.get("dropped", {})
    if dropped:
        lines += _table(
            ["reason", "documents"], [[k, v] for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]
        )
    else:
        lines.append("Nothing was removed.")
    clean, quality, dedup = settings.get("clean", {}), settings.get("quality", {}), settings.get("dedup", {})
    enabled = [k for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb") if quality.get(k)]
    lines += [
        "",
        "## Processing",
        "",
        f"- Cleaning: ftfy {'on' if clean.get('ftfy') else 'off'}, Unicode {clean.get('unicode_form')}, "
        f"boilerplate removal {'on' if clean.get('boilerplate') else 'off'}, C4 line cleaning "
        f"{'on' if clean.get('c4_lines') else 'off'}, length {clean.get('min_chars')}..{clean.get('max_chars') or 'any'} characters.",
        f"- Quality filters: {', '.join(enabled) or 'none'}"
        + (
            f" (per-source thresholds for {', '.join(quality.get('overrides', {}))})"
            if quality.get("overrides")
            else ""
        )
        + ".",
        f"- Deduplication: exact {'on' if dedup.get('exact') else 'off'}; MinHash "
        + (
            f"on ({dedup.get('ngrams')}-grams, {dedup.get('buckets')} bands x {dedup.get('hashes_per_bucket')} rows)"
            if dedup.get("minhash")
            else "off"
        )
        + f"; sentences {'on' if dedup.get('sentences') else 'off'}.",
    ]
    pii = settings.get("pii", {})
    lines += [
        "- PII: " + (
            f"anonymised ({pii.get('mode')}: emails, IP addresses, phone numbers, card numbers, IBANs, URL "
            f"credentials); names and addresses: {pipeline.get('pii_backend', 'off')}."
            if pii.get("enabled") else "not anonymised."
        ),
        f"- Missing text: {settings.get('missing_text')}; subset: {settings.get('subset') or 'all documents'}.",
        "",
        "## Language mix",
        "",
    ]  # fmt: skip
    if languages:
        total = sum(languages.values())
        lines += _table(
            ["language", "documents", "share"],
            [[k, v, f"{v / total:.1%}"] for k, v in sorted(languages.items(), key=lambda kv: -kv[1])],
        )
    else:
        lines.append("Not identified (data.pipeline.language found no document to score).")
    versions = pipeline.get("versions", {})
    lines += [
        "",
        "## Limitations",
        "",
        "Heuristic filters remove good text with the bad and keep some bad text; pattern-based PII "
        "detection misses formats it does not know (see the exclusions folder for what was removed). "
        "The language identifier is a small fastText model and is unreliable on short or mixed texts.",
        "",
        "Built with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def write_card(dataset_dir: Path, manifest: dict[str, Any]) -> Path:
    path = dataset_dir / CARD_FILE
    path.write_text(render(manifest))
    return path
