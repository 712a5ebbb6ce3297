"""The README.md model card of every export, written from the run's own records and read back by huggingface_hub.

The run dirs here are the session's tiny pretraining run (energy disabled, no evaluation) and
copies of it given the records a full run leaves: a Hydra config, a summary with energy
totals, CodeCarbon's per-node csv (written by CodeCarbon's own writer) and two evaluations,
one of the exported checkpoint (a bias probe and a perplexity task) and one of another.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.config import to_plain
from orchestra.train.export import export_hf, export_peft
from orchestra.train.model_card import base_model_id, find_run_dir
from tests.helpers import tiny_config
from tests.train.test_export_peft import write_base_checkpoint, write_peft_checkpoint

CO2_KG, ENERGY_KWH, J_PER_TOKEN = 0.00456, 0.0123, 2.88
GPU_MODEL, CPU_MODEL = "2 x NVIDIA H100 80GB HBM3", "AMD EPYC 7763 64-Core Processor"
MEASURES = "The association between the subjects of this template set and these occupations, in nats."
BIAS_METRICS: dict[str, float | None] = {
    "gender/mean_gap": 0.0123,
    "gender/share_a_more_likely": 0.55,
    "gender/stereotype_consistent_preference": -0.0042,
    "ethnicity/mean_gap": -0.031,
    "ethnicity/stereotype_consistent_preference": None,  # not defined for this dimension
}
PPL_METRICS = {"nll": 5.25, "ppl": 190.6, "bits_per_byte": 2.41, "documents": 3.0, "tokens": 812.0}


def load_card(folder: Path) -> Any:
    from huggingface_hub import ModelCard

    assert (folder / "README.md").is_file()
    return ModelCard.load(folder / "README.md")


def metrics_of(card: Any) -> dict[tuple[str, str], float]:
    return {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results or []}


def write_emissions_csv(path: Path) -> None:
    """One node's file exactly as CodeCarbon's csv writer lays it out."""
    from codecarbon.output_methods.emissions_data import EmissionsData
    from codecarbon.output_methods.file import FileOutput

    path.mkdir(parents=True, exist_ok=True)
    row = EmissionsData(
        timestamp="2025-01-01T00:00:00", project_name="orchestra", run_id="r1", experiment_id="e1",
        duration=60.0, emissions=CO2_KG, emissions_rate=CO2_KG / 60, cpu_power=120.0, gpu_power=600.0,
        ram_power=20.0, cpu_energy=0.002, gpu_energy=0.01, ram_energy=0.0003, energy_consumed=ENERGY_KWH,
        water_consumed=0.0, country_name="Germany", country_iso_code="DEU", region="", cloud_provider="",
        cloud_region="", os="Linux", python_version="3.11", codecarbon_version="3.3.2", cpu_count=128.0,
        cpu_model=CPU_MODEL, gpu_count=2.0, gpu_model=GPU_MODEL, longitude=0.0, latitude=0.0,
        ram_total_size=512.0, tracking_mode="machine",
    )  # fmt: skip
    FileOutput("emissions-node0.csv", str(path), on_csv_write="update").out(row, None)


def eval_document(source: Path, tasks: dict[str, Any]) -> dict[str, Any]:
    return {"format": 1, "model": {"source": str(source), "kind": "checkpoint"}, "tasks": tasks}


@pytest.fixture(scope="module")
def full_run(
    trained_run: Path, corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny run with the records of a run that measured energy and was evaluated."""
    from omegaconf import OmegaConf

    run = tmp_path_factory.mktemp("card") / "run"
    shutil.copytree(trained_run, run)
    cfg = to_plain(tiny_config(corpus_dir, data_cache, run))
    cfg["energy"].update(enabled=True, country_iso_code="DEU", region=None)
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text("- energy=codecarbon\n- energy.country_iso_code=DEU\n")
    summary = json.loads((run / "summary.json").read_text())
    summary.update(energy_kwh=ENERGY_KWH, co2_kg=CO2_KG, j_per_token=J_PER_TOKEN)
    (run / "summary.json").write_text(json.dumps(summary))
    write_emissions_csv(run / "emissions")
    ours = eval_document(
        run / "checkpoints" / "last.ckpt",
        {
            "bias": {"metrics": BIAS_METRICS, "n": 160, "details": {"measures": MEASURES, "units": "nats"}},
            "perplexity": {
                "metrics": PPL_METRICS,
                "n": 3,
                "details": {"source": "2 path(s)", "stride": None},
            },
        },
    )
    other = eval_document(
        run / "checkpoints" / "step0000020.ckpt", {"perplexity": {"metrics": {"ppl": 999.0}, "details": {}}}
    )
    for name, doc in (("last", ours), ("step0000020", other)):
        (run / "eval" / name).mkdir(parents=True)
        (run / "eval" / name / "eval.json").write_text(json.dumps(doc))
    (run / "eval" / "broken").mkdir()
    (run / "eval" / "broken" / "eval.json").write_text("{not json")
    return run


def test_the_card_of_a_run_without_energy_or_evaluation(trained_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_hf(trained_run / "checkpoints" / "last.ckpt", tmp_path / "tiny-hf")
    card = load_card(out)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"orchestra", "pretrain"} <= set(card.data.tags)
    assert card.data.datasets == ["tiny-stdlib"]
    assert card.data.base_model is None  # trained from scratch
    assert getattr(card.data, "co2_eq_emissions", None) is None
    assert not card.data.eval_results
    text = card.text
    assert text.startswith("\n# tiny-hf") or "# tiny-hf" in text
    assert "Not measured" in text and "co2_eq_emissions" in text
    assert "No bias probe was run" in text and "tasks=[bias]" in text
    assert "| learning rate | 0.003 |" in text and "| global batch size (sequences) | 8 |" in text
    summary = json.loads((trained_run / "summary.json").read_text())
    assert "| steps | 30 |" in text and f"| tokens | {summary['tokens']:,} |" in text
    assert "## Limitations" in text and "no safety or preference tuning" in text
    assert "AutoModelForCausalLM.from_pretrained" in text
    # The README is one more file in the folder: transformers loads it as before.
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_card_of_a_full_run_carries_energy_evaluation_and_bias(full_run: Path, data_cache: Path) -> None:
    out = export_hf(full_run / "checkpoints" / "last.ckpt", full_run.parent / "export")
    card = load_card(out)

    co2 = card.data.co2_eq_emissions
    assert co2["emissions"] == pytest.approx(CO2_KG * 1000, rel=1e-5)  # grams
    assert co2["source"] == "codecarbon"
    assert co2["training_type"] == "pre-training"
    assert co2["geographical_location"] == "DEU"
    assert GPU_MODEL in co2["hardware_used"] and CPU_MODEL in co2["hardware_used"]

    got = metrics_of(card)
    expected = {("perplexity", k): v for k, v in PPL_METRICS.items()}
    expected |= {("bias", k): v for k, v in BIAS_METRICS.items() if v is not None}
    assert got == pytest.approx(expected)  # the other checkpoint's ppl=999 is not claimed for this one
    assert card.data.datasets == ["tiny-stdlib"]

    text = card.text
    manifest = data_cache / "tiny-stdlib" / "manifest.json"
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in text
    assert json.loads(manifest.read_text())["tokenizer"]["sha256"] in text
    for row in (
        "| learning rate | 0.003 |",
        "| betas | 0.9, 0.95 |",
        "| weight decay | 0.01 |",
        "| schedule | cosine |",
        "| warmup steps | 5 |",
        "| max steps (configured) | 30 |",
        "| global batch size (sequences) | 8 |",
        "| micro batch size (per device) | 4 |",
        "| precision | 32-true |",
        "| strategy | single |",
        "| seed | 1234 |",
        f"| energy (kWh) | {ENERGY_KWH} |",
        f"| emissions (kg CO2eq) | {CO2_KG} |",
    ):
        assert row in text, row
    assert "energy.country_iso_code=DEU" in text  # the launch overrides

    bias = text.split("## Bias", 1)[1].split("\n## ", 1)[0]
    assert "| gender/mean_gap | 0.0123 |" in bias and "| ethnicity/mean_gap | -0.031 |" in bias
    assert "| ethnicity/stereotype_consistent_preference | n/a |" in bias
    assert MEASURES in bias and "No bias probe" not in text
    evaluation = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "| last | perplexity | 2 path(s) | ppl | 190.6 | 3 |" in evaluation
    assert "step0000020" in evaluation and "left out of the `model-index`" in evaluation
    assert "broken" in text  # the unreadable evaluation is named, not fatal
    assert "bias probe measures only what its own statement above says" in text


def test_a_checkpoint_outside_a_run_dir_gets_a_valid_card(trained_run: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose" / "model.ckpt"
    loose.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", loose)
    assert find_run_dir(loose) is None
    card = load_card(export_hf(loose, tmp_path / "hf"))
    assert card.data.library_name == "transformers" and "orchestra" in card.data.tags
    assert getattr(card.data, "co2_eq_emissions", None) is None
    assert card.data.datasets is None and not card.data.eval_results
    assert "not inside a run dir" in card.text and "| layers | 2 |" in card.text


def test_a_lora_fine_tune_names_its_base_its_method_and_its_data(tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The base as huggingface_hub's cache holds a Hub model: models--acme--tiny-base/snapshots/<commit>.
    snapshot = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abcd"
    export_hf(write_base_checkpoint(tmp_path / "base" / "last.ckpt"), snapshot)
    run = tmp_path / "ft"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    write_peft_checkpoint(snapshot, "lora", ckpt, lora_targets=["q_proj", "v_proj"])
    train_file = tmp_path / "my_sft.jsonl"
    train_file.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    cfg = {
        "task": {"name": "sft", "train_path": str(train_file), "val_path": None, "val_fraction": 0.1},
        "finetune": {"method": "lora", "init_from": "acme/tiny-base", "lora_rank": 4, "lora_alpha": 8.0},
        "optim": {"name": "adamw", "lr": 1e-4},
        "energy": {"enabled": False},
        "seed": 7,
    }
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")

    merged = load_card(export_hf(ckpt, tmp_path / "merged"))
    assert merged.data.base_model == "acme/tiny-base"
    assert merged.data.library_name == "transformers"
    assert {"orchestra", "sft", "lora"} <= set(merged.data.tags)
    assert merged.data.datasets == ["my_sft"]
    assert hashlib.sha256(train_file.read_bytes()).hexdigest() in merged.text
    assert "| finetune.lora_rank | 4 |" in merged.text and "| finetune.lora_alpha | 8 |" in merged.text
    assert "Not measured: the run had `energy.enabled=false`" in merged.text
    assert getattr(merged.data, "co2_eq_emissions", None) is None

    adapter = export_peft(ckpt, tmp_path / "adapter")
    card = load_card(adapter)
    assert card.data.library_name == "peft" and card.data.base_model == "acme/tiny-base"
    assert "PeftModel.from_pretrained" in card.text
    # peft reads the folder with its README as before.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), adapter)
    assert model is not None

    # Outside a run dir only the checkpoint's own record is left: the base from the cache layout.
    loose = tmp_path / "loose.ckpt"
    shutil.copy(ckpt, loose)
    card = load_card(export_peft(loose, tmp_path / "adapter-loose"))
    assert card.data.base_model == "acme/tiny-base" and card.data.datasets is None
    assert "| finetune.lora_rank | 4 |" in card.text  # from the checkpoint's PEFT record


def test_unreadable_records_are_left_out_and_named(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "summary.json").write_text("{truncated")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("optim: [unclosed\n")
    (run / "emissions").mkdir()
    (run / "emissions" / "emissions-node0.csv").write_bytes(b"\xff\xfe garbage")
    (run / "eval" / "odd").mkdir(parents=True)
    (run / "eval" / "odd" / "eval.json").write_text(json.dumps({"tasks": ["not", "a", "mapping"]}))
    card = load_card(export_hf(run / "checkpoints" / "last.ckpt", tmp_path / "hf"))
    assert getattr(card.data, "co2_eq_emissions", None) is None and not card.data.eval_results
    text = card.text
    assert "could not be read" in text and "summary.json" in text and "odd" in text
    assert "| learning rate | 0.003 |" in text  # run.json stands in for the unreadable Hydra config


def test_an_adapter_on_an_orchestra_base_is_named_in_the_text_only(tmp_path: Path) -> None:
    base = write_base_checkpoint(tmp_path / "base-run" / "checkpoints" / "last.ckpt")
    write_peft_checkpoint(base, "adapter", tmp_path / "adapter.ckpt")
    card = load_card(export_peft(tmp_path / "adapter.ckpt", tmp_path / "adapter"))
    assert card.data.base_model is None  # an Orchestra checkpoint is no Hugging Face model id
    assert card.data.library_name is None  # peft has no bottleneck adapters: Orchestra's own format
    assert {"orchestra", "adapter"} <= set(card.data.tags)
    assert str(base.resolve()) in card.text and "only Orchestra reads this folder" in card.text
    assert "load_peft_export" in card.text


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
        ("Qwen/Qwen2.5-0.5B@main", "Qwen/Qwen2.5-0.5B"),
        ("/x/hub/models--meta-llama--Llama-3.2-1B/snapshots/abc", "meta-llama/Llama-3.2-1B"),
        ("/data/bases/my-llama", "my-llama"),
        ("runs/debug/2025/checkpoints/last.ckpt", None),  # an Orchestra checkpoint names no HF model
    ],
)
def test_base_model_ids(path: str, expected: str | None) -> None:
    assert base_model_id(path) == expected
