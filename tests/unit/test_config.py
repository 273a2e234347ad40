"""Config validation: presets, overrides, and errors that name the field, the value and what is allowed."""

import pytest

from chimera.configs.loader import apply_overrides, load_model_config, load_run_config, preset_names
from chimera.configs.schema import validate_layout
from chimera.errors import UserError
from helpers import REPO

TINY = REPO / "configs/runs/tiny.yaml"


def test_every_preset_validates():
    names = preset_names()
    for family in ("griffin", "hawk", "local-transformer", "transformer"):
        for size in ("tiny", "small", "2b"):
            assert f"{family}-{size}" in names
    for name in names:
        assert load_model_config(name).preset == name


def test_overrides_reach_nested_fields():
    cfg = load_run_config(TINY, ["train.lr=0.01", "model.d_model=128", "parallel.zero_stage=2"])
    assert (cfg.train.lr, cfg.model.d_model, cfg.parallel.zero_stage) == (0.01, 128, 2)
    assert cfg.model.preset == "griffin-tiny" and cfg.model.pattern == "R-R-L-"


def test_pattern_expansion():
    cfg = load_model_config("griffin-2b")
    assert len(cfg.layers) == 52 and cfg.layers[:6] == "R-R-L-" and cfg.layers.count("L") == 8


@pytest.mark.parametrize(
    "override, expected",
    [
        (["train.lrr=0.1"], "train.lrr: unknown field"),
        (["train.lr=-1"], "train.lr: bad value -1"),
        (["parallel.zero_stage=5"], "parallel.zero_stage: bad value 5"),
        (["model.pattern=RQ~"], "unknown layer symbol(s) ['Q', '~']"),
        (["train.precision=fp8"], "'fp32' or 'bf16'"),
        (["model.preset=griffin-huge"], "unknown model preset 'griffin-huge'"),
        (["model.preset=zamba-tiny", "model.pattern=mm0"], "must be followed by the sublayer it feeds"),
        (["model.preset=zamba-tiny", "model.shared_blocks=['*-m']"], "every entry of shared_blocks must be '*-'"),
        (["model.preset=mamba-tiny", "model.shared_lora_rank=4"], "need shared_block_style: zamba"),
        (["model.preset=zamba-tiny", "model.shared_lora_attention=true"], "shared_lora_attention needs"),
    ],
)
def test_bad_values_are_named(override, expected):
    with pytest.raises(UserError) as e:
        load_run_config(TINY, override)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not of the form"):
        apply_overrides({}, ["train.lr"])


def test_layout_checks():
    cfg = load_run_config(TINY, ["parallel.tensor=2"])
    assert validate_layout(cfg, 2) == 1
    with pytest.raises(UserError, match="does not factor"):
        validate_layout(cfg, 3)
    with pytest.raises(UserError, match="does not divide model.num_heads=4"):
        validate_layout(load_run_config(TINY, ["parallel.tensor=3"]), 3)
    with pytest.raises(UserError, match="global_batch_size=4 is not a multiple"):
        validate_layout(load_run_config(TINY, ["train.micro_batch_size=4"]), 2)
    assert validate_layout(load_run_config(TINY, ["train.micro_batch_size=2"]), 2) == 2
    zamba = ["model.preset=zamba-tiny", "parallel.tensor=4"]
    assert validate_layout(load_run_config(TINY, zamba[:1] + ["parallel.tensor=2"]), 2) == 1
    with pytest.raises(UserError, match="does not divide model.ssm_heads=2"):
        validate_layout(load_run_config(TINY, zamba), 4)
    with pytest.raises(UserError, match="does not divide model.num_heads=6"):  # the shared block's attention
        validate_layout(load_run_config(TINY, zamba + ["model.num_heads=6", "model.num_kv_heads=6",
                                                       "model.ssm_heads=4"]), 4)


def test_text_fields_take_set_values_as_given():
    from chimera.configs.loader import load_run_config

    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", ["model.pattern=-", "model.num_layers=1"])
    assert cfg.model.pattern == "-"
    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", ["model.pattern=R-|R-", "model.num_layers=4"])
    assert cfg.model.pattern == "R-|R-"
    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", ["train.stop_after=null", "train.lr=1e-3"])
    assert cfg.train.stop_after is None and cfg.train.lr == 1e-3  # other fields: YAML


def test_set_model_to_a_name_switches_the_preset():
    from chimera.configs.loader import load_run_config

    cfg = load_run_config(REPO / "configs/runs/tiny.yaml", ["model=jamba-tiny"])
    assert cfg.model.preset == "jamba-tiny" and "E" in cfg.model.pattern


def test_warmup_longer_than_the_run_is_refused():
    from chimera.configs.loader import load_run_config
    from chimera.errors import UserError

    with pytest.raises(UserError, match="warmup_steps=5 exceeds steps=3"):
        load_run_config(REPO / "configs/runs/tiny.yaml", ["train.steps=3", "train.warmup_steps=5"])
