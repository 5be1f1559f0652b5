"""The `golfnb` command line: every sub-command builds, and `golfnb train` hands its options to the trainer."""
from __future__ import annotations

import json

import pytest

from golfnb import cli
from golfnb.config import PRESETS, preset


def test_every_subcommand_builds_and_has_help(capsys):
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # the registered sub-commands
    assert {"presets", "config", "train", "data", "artifact", "pack", "run", "submit", "validate", "bench",
            "quickstart"} <= names


def test_presets_lists_every_preset(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert any(line.startswith(name) for line in out.splitlines()), name


def test_config_applies_overrides(capsys):
    assert cli.main(["config", "smoke", "--set", "seed=7", "--set", "num_loops=0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["seed"] == 7 and got["num_loops"] == 0
    assert got["model_dim"] == preset("smoke").model_dim


def test_train_passes_leading_options_to_the_trainer(tmp_path, capsys):
    # `golfnb train --preset X` must reach the trainer's parser (argparse REMAINDER would drop --preset).
    run_dir = tmp_path / "r"
    rc = cli.main(["train", "--preset", "nope", "--run-dir", str(run_dir)])
    assert rc == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert not run_dir.exists()  # rejected before anything was written


def test_train_help_is_the_trainers(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    assert "--skip-data-check" in capsys.readouterr().out


def test_config_error_is_exit_2(capsys):
    assert cli.main(["config", "smoke", "--set", "not_a_field=1"]) == 2
    assert "not_a_field" in capsys.readouterr().err
