import math

import pytest

from balora import AdapterConfig, BALoraConfig, ConfigError


def test_paper_defaults_per_task_and_variant():
    nlg = BALoraConfig()
    assert nlg.lambdas == (0.025, 0.005, 0.005)
    assert (nlg.temperature, nlg.top_k, nlg.svd_k, nlg.svd_norm) == (2.0, 20, 10, "frobenius")
    nlu = BALoraConfig(task="nlu")
    assert nlu.lambdas == (0.15, 0.03, 0.03)
    assert (nlu.temperature, nlu.svd_k, nlu.svd_norm) == (1.0, 5, "nuclear")
    v1 = BALoraConfig(variant="v1")
    assert v1.lambdas == (1e-4, 3e-4, 1e-4) and v1.top_k == 0 and v1.svd_norm == "nuclear"
    assert BALoraConfig(task="nlu", variant="v1").lambdas == (1e-4, 4e-4, 1e-4)


def test_explicit_values_win_over_defaults():
    cfg = BALoraConfig(lambda_consistency=0.5, top_k=0)
    assert cfg.lambda_consistency == 0.5 and cfg.top_k == 0 and cfg.lambda_svd == 0.005


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(task="seq2seq"), "BALoraConfig.task"),
        (dict(variant="v3"), "BALoraConfig.variant"),
        (dict(lambda_consistency=-1.0), "BALoraConfig.lambda_consistency"),
        (dict(lambda_svd=float("nan")), "BALoraConfig.lambda_svd"),
        (dict(temperature=0), "BALoraConfig.temperature"),
        (dict(top_k=-2), "BALoraConfig.top_k"),
        (dict(svd_k=0), "BALoraConfig.svd_k"),
        (dict(svd_norm="spectral"), "BALoraConfig.svd_norm"),
        (dict(schedule="linear"), "BALoraConfig.schedule"),
        (dict(nlu_svd_target="pooler"), "BALoraConfig.nlu_svd_target"),
    ],
)
def test_invalid_balora_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        BALoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(method="qlora"), "AdapterConfig.method"),
        (dict(r=0), "AdapterConfig.r"),
        (dict(dropout=1.5), "AdapterConfig.dropout"),
        (dict(pissa_niter=0), "AdapterConfig.pissa_niter"),
        (dict(target_modules="q_proj["), "AdapterConfig.target_modules"),  # a string is a regex: this one is not
    ],
)
def test_invalid_adapter_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AdapterConfig(**kwargs)


def test_alpha_defaults_to_rank():
    assert AdapterConfig(r=8).alpha == 8.0


def test_iclr2026_schedule():
    cfg = BALoraConfig.preset("iclr2026")
    l1, l2, l3 = cfg.lambdas
    total = 1000
    assert cfg.lambdas_at(0, total) == pytest.approx((l1, 0.0, 0.0))
    assert cfg.lambdas_at(199, total)[1:] == (0.0, 0.0)
    mid_ramp = cfg.lambdas_at(225, total)
    assert mid_ramp[1] == pytest.approx(0.5 * l2) and mid_ramp[2] == pytest.approx(0.5 * l3)
    assert cfg.lambdas_at(250, total)[1:] == pytest.approx((l2, l3))
    assert cfg.lambdas_at(500, total)[0] == pytest.approx(l1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert cfg.lambdas_at(total, total)[0] == pytest.approx(0.1 * l1)
    assert BALoraConfig().lambdas_at(500, total) == BALoraConfig().lambdas


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        BALoraConfig.preset("fast")


def test_every_option_is_documented_where_it_is_declared():
    import dataclasses

    for cls in (BALoraConfig, AdapterConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if len(f.metadata.get("help", "")) < 10]
        assert not undocumented, f"{cls.__name__}: fields without help: {undocumented}"


def test_public_api_has_docstrings():
    import balora

    missing = [name for name in balora.__all__ if not (getattr(balora, name).__doc__ or "").strip()]
    assert not missing, missing


def test_lambdas_are_named_as_their_options():
    cfg = BALoraConfig(lambda_consistency=0.5)
    assert cfg.lambdas.consistency == cfg.lambda_consistency == 0.5
    assert cfg.lambdas_at(3, 10)._asdict() == {"consistency": 0.5, "diversity": 0.005, "svd": 0.005}


def test_errors_carry_the_option_so_callers_can_relabel_them():
    with pytest.raises(ConfigError) as info:
        AdapterConfig(r=0)
    assert info.value.option == "r" and str(info.value.located("adapter.r")) == "adapter.r: must be an integer >= 1, got 0"
