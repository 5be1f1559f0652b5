"""Config: strict keys with suggestions, coercion by field type, cross-field checks, round trips, presets."""
from __future__ import annotations

import json

import pytest

from golfnb.config import ConfigError, Hyperparameters, PRESETS, preset, resolve


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match="did you mean 'muon_momentum'"):
        Hyperparameters.from_dict({"muon_momentun": 0.9})
    with pytest.raises(ConfigError, match="unknown preset 'pr1541'; did you mean 'pr1514'"):
        preset("pr1541")


@pytest.mark.parametrize("raw,expect", [("false", False), ("0", False), ("True", True), ("1", True), (1, True)])
def test_bool_coercion(raw, expect):
    assert Hyperparameters.from_dict({"ema_decay": 0, "tie_embeddings": raw}).tie_embeddings is expect


def test_numeric_coercion_like_papermill_strings():
    c = Hyperparameters.from_dict({"iterations": "1e3", "matrix_lr": "0.025", "num_layers": 11.0, "ve_layers": "9,10",
                                   "ve_dim": "128", "seed": "0012"})
    assert c.iterations == 1000 and isinstance(c.iterations, int)
    assert c.matrix_lr == 0.025 and c.num_layers == 11 and c.ve_layers == (9, 10) and c.seed == 12


@pytest.mark.parametrize("bad,msg", [
    ({"num_layers": "eleven"}, "num_layers='eleven' is not a valid integer"),
    ({"tie_embeddings": "maybe"}, "not a valid boolean"),
    ({"iterations": "1.5"}, "not a valid integer"),
    ({"matrix_lr": [1]}, "not a valid number"),
])
def test_ill_typed_values_name_the_fix(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        Hyperparameters.from_dict(bad)


@pytest.mark.parametrize("bad,msg", [
    ({"num_heads": 7}, "num_heads=7 does not divide model_dim=512"),
    ({"num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=8"),
    ({"loop_end": 11}, "loop range 3..11 must lie inside the 11 layers"),
    ({"loop_start": 6, "loop_end": 5}, "loop range 6..5"),
    ({"rope_dims": 80}, "rope_dims=80 must be even and between 0 and head_dim=64"),
    ({"parallel_residual": "gpt-j"}, "did you mean 'gptj'"),
    ({"ttt_enabled": False}, "final_eval='ttt' but that pass is disabled"),
    ({"eval_stride": 48}, "eval_stride=48 must divide eval_seq_len=2048"),
    ({"train_batch_tokens": 1000}, "must be a multiple of train_seq_len"),
    ({"gptq_reserve_seconds": 700}, "leaves no training time"),
])
def test_impossible_shapes_and_settings_are_rejected(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        Hyperparameters.from_dict(bad)


def test_world_size_must_divide_eight():
    c = preset("pr1514")
    assert c.grad_accum_for(1) == 8 and c.grad_accum_for(2) == 4 and c.micro_batch_seqs(8) == 48
    with pytest.raises(ConfigError, match="world size 3 does not divide 8"):
        c.grad_accum_for(3)


def test_json_round_trip(tmp_path):
    for name in PRESETS:
        c = preset(name, seed=7)
        c.to_json(tmp_path / f"{name}.json")
        assert Hyperparameters.from_json(tmp_path / f"{name}.json") == c
    (tmp_path / "bad.json").write_text(json.dumps({"num_layerz": 3}))
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        Hyperparameters.from_json(tmp_path / "bad.json")


def test_env_names_of_the_challenge():
    c = Hyperparameters.from_env({"MUON_MOMENTUM": "0.99", "NUM_LAYERS": "11", "QK_GAIN_INIT": "5.25",
                                  "PATH": "/bin", "GOLFNB_PRESET": "pr1533"})
    assert c.muon_momentum == 0.99 and c.qk_gain_init == 5.25 and c.bank_params  # base preset honoured
    with pytest.raises(ConfigError, match="did you mean MUON_MOMENTUM"):
        Hyperparameters.from_env({"MUON_MOMENTUN": "0.9"})


def test_yaml_and_resolve(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: pr1176\nseed: 3\nve_layers: [9, 10]\n")
    c = resolve(None, {"ttt_lr": "0.001"}, tmp_path / "c.yaml")
    assert c.seed == 3 and c.ttt_lr == 0.001 and c.vocab_size == 1024


def test_presets_hold_the_logged_values():
    a2 = preset("pr1514")
    assert (a2.muon_momentum, a2.qk_gain_init, a2.enable_looping_at, a2.parallel_residual) == (0.97, 5.0, 0.5, "gptj")
    assert (a2.loop_start, a2.loop_end, a2.num_loops, a2.warmdown_frac, a2.ema_decay) == (3, 5, 2, 0.667, 0.997)
    assert a2.ngram_tilt_enabled and a2.final_eval == "ttt" and a2.train_batch_tokens == 786_432
    p1533 = preset("pr1533")  # its logs, not its README
    assert (p1533.muon_momentum, p1533.qk_gain_init, p1533.ema_decay, p1533.warmdown_frac) == (0.99, 5.0, 0.997, 0.667)
    assert p1533.bank_params and p1533.parallel_residual == "two_lane" and p1533.matrix_lr == 0.022
    assert preset("pr1176").qk_gain_init == 4.0 and preset("pr1176").ttt_optimizer == "muon"
    assert preset("pr1217").muon_row_normalize and preset("pr1217").slot_variant == "context_per_window"
    b = preset("baseline")
    assert (b.num_layers, b.model_dim, b.vocab_size, b.mlp_mult, b.train_seq_len) == (9, 512, 1024, 2.0, 1024)


def test_derived_values_in_one_place():
    c = preset("pr1514")
    assert (c.head_dim, c.kv_dim, c.mlp_hidden, c.num_skips) == (64, 256, 2048, 8)
    assert c.training_cap_seconds == 588.0
    assert c.ngram_orders() == [8, 10, 12, 14, 16]
    d = c.with_data_root("/data/pg")
    assert d.data_path == "/data/pg/datasets/fineweb10B_sp8192"
    assert d.tokenizer_path == "/data/pg/tokenizers/fineweb_8192_bpe.model"
    assert c.replace(data_path="/abs/x").with_data_root("/y").data_path == "/abs/x"


def test_frozen():
    c = preset("smoke")
    with pytest.raises(Exception):
        c.seed = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        c.replace(sed=3)
