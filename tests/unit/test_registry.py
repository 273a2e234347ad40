"""The registry: every sublayer kind declared in its own file builds from its typed config, keeps the
context-parallel rule it declares, and shares fields with other kinds only when they declare them alike."""

import pytest
import torch
from pydantic import Field

from chimera.models import config as model_config
from chimera.models import registry
from chimera.models.config import ModelConfig
from chimera.models.spec import Build, ContextParallel, SublayerConfig, SublayerSpec
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters

# One small model with every registered kind in its pattern (a new kind adds its fields here if it needs any).
EVERY_KIND = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, mlp_hidden=64, window=6, ssm_state=8,
                  ssm_head_dim=16, ssm_chunk=8, moe_experts=4, moe_top_k=2, ssm_dt_rank=4, based_chunk=8,
                  s5_state=8, bigbird_block=4, hyena_medium_filter_len=8, rwkv_head_size=8,
                  rwkv_chunk=8,
                  init_std=0.2)  # large weights: every true dependence shows far above rounding (measured >= 1e-3)


def every_kind_config() -> ModelConfig:
    return ModelConfig(pattern="".join(registry.sublayers()), **EVERY_KIND)


def x_seq(s=24, b=2, d=32, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mixer(symbol):
    cfg = every_kind_config()
    m = build_mixer(symbol, cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(m, 0)
    return m.double().eval(), cfg


def test_every_kind_is_found_with_a_config_and_rules():
    specs = registry.sublayers()
    assert set("RL*-mME") <= set(specs)
    for symbol, spec in specs.items():
        assert spec.symbol == symbol and issubclass(spec.config, SublayerConfig) and spec.summary
        assert set(spec.config.model_fields) <= set(ModelConfig.model_fields)
    assert set(registry.shared_styles()) == {"residual", "zamba"}


@pytest.mark.parametrize("symbol", sorted(registry.sublayers()))
def test_context_parallel_rule_holds(symbol):
    """``token``: an output depends on its own position only; ``halo`` n: on the n before it too, no further;
    ``state``: on all the past, through a state whose size does not grow with the sequence; ``keys_values``:
    on all the past, through a cache that grows with it."""
    m, cfg = mixer(symbol)
    rule = registry.sublayers()[symbol].context_parallel(cfg.sublayer(symbol))
    assert isinstance(rule, ContextParallel)
    x, t = x_seq(), 20
    base = m(x)[t]

    def changes_output_at_t(position):  # fp64; no dependence differs by rounding only (<= 1e-16 measured)
        x2 = x.clone()
        x2[position] += 1.0
        return bool((m(x2)[t] - base).abs().max() > 1e-10)

    def state_numel(max_len):
        state = m.init_state(2, max_len)
        leaves = state.values() if isinstance(state, dict) else ([] if state is None else [state])
        return sum(v.numel() for v in leaves if torch.is_tensor(v))

    if rule.needs == "token":
        assert not changes_output_at_t(t - 1) and not changes_output_at_t(0) and changes_output_at_t(t)
        assert state_numel(16) == state_numel(64) == 0
    elif rule.needs == "halo":
        assert changes_output_at_t(t - rule.halo) and not changes_output_at_t(t - rule.halo - 1)
        assert state_numel(64) == state_numel(4 * 64)  # a bounded cache
    elif rule.needs == "state":
        assert changes_output_at_t(0)
        assert state_numel(16) == state_numel(64) > 0
    else:
        assert rule.needs == "keys_values"
        assert changes_output_at_t(0)
        assert state_numel(64) > state_numel(16)


def test_resolved_views_and_field_use():
    cfg = every_kind_config()
    assert cfg.sublayer("m").ssm_dt_rank == 4 and cfg.sublayer("E").moe_hidden == 64
    assert cfg.sublayer("*").head_dim == 8 and cfg.sublayer("R").rnn_width == 32
    assert cfg.sublayer("M").ssm_norm_eps == cfg.norm_eps
    mamba = ModelConfig(pattern="m", vocab_size=64, d_model=40)
    assert mamba.effective("ssm_dt_rank") == 3 and mamba.uses("ssm_state") and not mamba.uses("window")
    assert not mamba.uses("mlp_hidden") and mamba.uses("vocab_size") and mamba.uses("residual_multiplier")


class ConflictingConfig(SublayerConfig):
    conv_kernel: int = Field(3, ge=1)  # the others default to 4


def test_a_field_two_kinds_declare_differently_is_refused(monkeypatch):
    spec = SublayerSpec("Q", "conflict", ConflictingConfig, None, lambda c, tp: None, lambda c: None)
    found = registry.sublayers()
    monkeypatch.setattr(registry, "sublayers", lambda: {**found, "Q": spec})
    with pytest.raises(RuntimeError, match="declares model.conv_kernel unlike"):
        model_config._declared_fields()


def test_a_taken_symbol_is_refused(monkeypatch):
    class Module:
        __name__ = "chimera.models.mixers.clash"
        SPECS = (SublayerSpec("m", "clash", SublayerConfig, None, lambda c, tp: None, lambda c: None),)

    real = registry._modules
    monkeypatch.setattr(registry, "_modules", lambda package: [*real(package), Module])
    with pytest.raises(RuntimeError, match="layer symbol 'm' is taken"):
        registry.sublayers.__wrapped__()
