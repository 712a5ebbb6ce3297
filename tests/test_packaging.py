"""The wheel carries every package, the kernels under orchestra.kernels and the Hydra configs."""

from __future__ import annotations

import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_list_names_every_package_directory() -> None:
    packages = set(declared()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "orchestra").rglob("__init__.py")}
    on_disk |= {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hydra_plugins").rglob("__init__.py")
    }
    on_disk |= {"orchestra.conf"}
    on_disk |= {f"orchestra.conf.{d.name}" for d in (ROOT / "conf").iterdir() if d.is_dir()}  # config groups
    assert packages == on_disk


def test_repository_root_shadows_no_installed_module() -> None:
    """Run from the repository root (``python -m orchestra...``, pytest), a top-level folder named
    like a PyPI module would win over it: a ``kernels/`` here broke transformers, which imports
    PyPI's ``kernels``. Only our own packages and non-module folders may sit at the top level."""
    allowed = {"orchestra", "tests", "bench", "conf", "docs", "slurm", "build", "wheelhouse"}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - allowed
    assert not packages, f"top-level Python packages would shadow installed modules: {sorted(packages)}"
    modules = {p.stem for p in ROOT.glob("*.py")} - {"conftest", "setup"}
    assert not modules, f"top-level modules would shadow installed modules: {sorted(modules)}"


def test_console_scripts_exist() -> None:
    scripts = declared()["project"]["scripts"]
    for name in ("orchestra-train", "orchestra-prepare", "orchestra-generate"):
        module, func = scripts[name].split(":")
        assert func == "main"
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), name


@pytest.mark.slow
def test_wheel_contains_kernels_and_configs(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("orchestra_trainer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "orchestra/kernels/__init__.py" in names
    assert "orchestra/conf/config.yaml" in names
    assert "orchestra/conf/model/llama-8b.yaml" in names
    assert "orchestra/conf/experiment/debug.yaml" in names
    assert "orchestra/conf/data/pipeline/web.yaml" in names  # a group nested in a group
    assert "orchestra/conf/sweep/lr.yaml" in names
    assert "hydra_plugins/orchestra_sweeper/sweeper.py" in names
    assert not any(n.startswith("hydra_plugins/__init__") for n in names)  # a namespace package
    assert "orchestra/serve/dashboards/grafana.json" in names
    assert not any(n.startswith(("tests/", "kernels/", "conf/")) for n in names)
    # Installed from the wheel (no source tree around), the CLIs find the packaged configs.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run(
        [sys.executable, "-c", "from orchestra.cli.common import CONF_DIR; print(CONF_DIR)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        timeout=120,
        check=True,
    )
    assert Path(probe.stdout.strip()) == site / "orchestra" / "conf"
