"""pyproject.toml is the one dependency list: environment.yml only installs it; CI installs from the repo."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def test_environment_yml_installs_the_package_with_its_extras():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    conda_pkgs = [d for d in deps if isinstance(d, str)]
    assert {re.split(r"[=<>]", d)[0] for d in conda_pkgs} == {"python", "pip"}, \
        "environment.yml must carry only python and pip; list packages in pyproject.toml"
    pip_section = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert pip_section == [["-e .[notebooks,dev]"]]
    py = next(d for d in conda_pkgs if d.startswith("python"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    major_minor = tuple(int(x) for x in py.split("=")[1].split(".")[:2])
    assert major_minor >= tuple(int(x) for x in project["requires-python"].lstrip(">=").split("."))


def test_pyproject_declares_the_design_card_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "numpy", "sentencepiece", "brotli"} <= names
    extras = {k: {re.split(r"[<>=\[ ]", d)[0].lower() for d in v} for k, v in project["optional-dependencies"].items()}
    assert {"jupyterlab", "papermill", "matplotlib", "ipykernel"} <= extras["notebooks"]
    assert "pytest" in extras["dev"] and "nbstripout" in extras["dev"]
    assert project["scripts"]["golfnb"] == "golfnb.cli:main"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
    assert 'TORCH_SPEC="torch==2.13.0"' in ci  # the CPU build, explicit in CI only
    assert "TORCH_SPEC ?= torch\n" in (REPO / "Makefile").read_text()  # users get plain torch
