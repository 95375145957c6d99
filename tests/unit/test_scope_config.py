"""Configs check themselves and say what a valid value looks like."""

import json
import math

import pytest

import pipelines.wan.calibration  # noqa: F401  (registers Wan2.1's polynomials by name)
from scope.config import (METHOD_CONFIGS, AccelConfig, FBCacheConfig, ScopeConfig, TeaCacheConfig,
                          load_config, make_config, registered_rescales, resolve_rescale)


# the one field a method cannot default: MagCache's ratios are measured on the model
REQUIRED = {"magcache": {"mag_ratios": {"cond": [1.0, 0.99, 0.97], "uncond": [1.0, 0.98, 0.96]}}}


def test_every_method_builds_with_defaults_and_round_trips_through_json(tmp_path):
    for method in METHOD_CONFIGS:
        cfg = make_config(method, **REQUIRED.get(method, {}))
        path = tmp_path / f"{method}.json"
        path.write_text(cfg.to_json())
        assert load_config(path) == cfg, f"{method}: JSON round trip changed the config"


def test_make_config_unknown_method_lists_valid_methods():
    with pytest.raises(ValueError, match="valid methods: none, scope, teacache, flowcache, taylorseer, "
                                         "fbcache, magcache"):
        make_config("pab")


def test_magcache_without_measured_ratios_says_how_to_get_them():
    with pytest.raises(ValueError, match="mag_ratios is not set.*calibrate=true"):
        make_config("magcache")
    with pytest.raises(ValueError, match="MagCacheConfig.mag_ratios must be"):
        make_config("magcache", mag_ratios={"cond": [1.0, -2.0]})
    assert make_config("magcache", calibrate=True).mag_ratios is None


def test_calibrated_config_names_every_schedule_difference():
    cfg = make_config("scope", calibrated_for={"num_steps": 30, "ar_step": 2, "shift": 3.0})
    assert cfg.schedule_mismatch({"num_steps": 30, "ar_step": 2, "shift": 3.0}) == []
    assert cfg.schedule_mismatch({"num_steps": 10, "ar_step": 0, "shift": 3.0}) == [
        "ar_step: calibrated 2, used with 0", "num_steps: calibrated 30, used with 10"]
    with pytest.raises(ValueError, match="calibrated_for must be null or an object with keys"):
        make_config("scope", calibrated_for={"stepz": 30})


def test_unknown_key_is_an_error_listing_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tau'\].*valid keys: .*tau_cache"):
        make_config("scope", tau=0.1)
    with pytest.raises(ValueError, match="needs a 'method' key"):
        AccelConfig.from_dict({"tau_cache": 0.1})


def test_load_config_reports_file_and_problem(tmp_path):
    path = tmp_path / "accel.json"
    path.write_text(json.dumps({"method": "scope", "order": 3}))
    with pytest.raises(ValueError, match=r"accel.json: ScopeConfig.order must be an integer in \[0, 2\]"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    ({"tau_predict": math.nan}, "tau_predict must be a number >= 0.0"),
    ({"coordinate": "time"}, "coordinate must be one of 'sigma', 'timestep', 'step', 'logsnr'"),
    ({"prefer": "both"}, "prefer must be one of 'predict', 'cache'"),
    ({"error_estimate": "guess"}, "error_estimate must be one of 'observed', 'embedded', 'off'"),
    ({"granularity": "tile"}, "granularity must be one of 'call', 'chunk'"),
    ({"tau_cache": -0.1}, r"tau_cache must be a number >= 0.0"),
    ({"indicator": "magnitude"}, "indicator must be one of 'probe', 'input', 'probe\\+input'"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
    ({"max_consecutive": 0}, "max_consecutive must be an integer >= 1"),
    ({"order": 3}, r"order must be an integer in \[0, 2\]"),
    ({"order": 1, "history": 4}, r"history must be an integer in \[2, 3\]"),
    ({"horizon_rho": 0.0}, "horizon_rho must be a number > 0.0"),
    ({"eps_error": float("nan")}, "eps_error must be a number > 0.0"),
    ({"sigma_floor_scale": 1.5}, "sigma_floor_scale must be a number > 0.0 and <= 1.0"),
    ({"sigma_knee": 0.0}, "sigma_knee must be a number > 0.0"),
    ({"selective": "fast"}, "selective must be one of 'off', 'exact', 'approx'"),
    ({"context_chunks": -1}, "context_chunks must be an integer >= 0"),
    ({"kv_cache_finished": True}, "kv_cache_finished needs selective='exact' or 'approx'"),
    ({"selective": "exact", "kv_cache_stale": True}, "kv_cache_stale .* needs selective='approx'"),
    ({"force_final_step": 1}, "force_final_step must be true or false"),
    ({"rescale": "wan-2b"}, "unknown rescale polynomial 'wan-2b'; valid names: .*wan-1.3b"),
    ({"rescale": [1.0, "x"]}, "rescale must be null, a registered polynomial name"),
    ({"residual_dtype": "float64"}, "residual_dtype must be one of"),
])
def test_scope_config_rejects_bad_values_with_a_hint(overrides, message):
    with pytest.raises(ValueError, match=message):
        ScopeConfig(**overrides)


def test_teacache_polynomial_variant_must_match_ret_steps():
    with pytest.raises(ValueError, match="fitted with ret steps; set use_ret_steps=True"):
        TeaCacheConfig(rescale="wan-14b", use_ret_steps=False)
    cfg = TeaCacheConfig(rescale="wan-14b-noret", use_ret_steps=False)
    assert (cfg.effective_warmup, cfg.effective_force_final, cfg.effective_probe_kind) == (1, True, "e")
    cfg = TeaCacheConfig(rescale="skyreels-v2-1.3b")
    assert (cfg.effective_warmup, cfg.effective_force_final, cfg.effective_probe_kind) == (5, False, "e0")


def test_rescale_names_resolve_to_published_coefficients_and_custom_lists_become_tuples():
    coeffs, kind = resolve_rescale("wan-1.3b")
    assert coeffs[0] == -5.21862437e4 and coeffs[-1] == -4.99875664e-2 and kind == "e0"
    assert all(len(p.coefficients) == 5 for p in registered_rescales().values())
    cfg = make_config("teacache", rescale=[2.0, 0.0])
    assert cfg.rescale == (2.0, 0.0)
    assert cfg.to_dict()["rescale"] == [2.0, 0.0]


def test_fbcache_serves_finished_kv_but_refuses_stale_kv():
    assert FBCacheConfig(selective="exact", kv_cache_finished=True).kv_cache_finished
    with pytest.raises(ValueError, match="FBCacheConfig does not support kv_cache_stale"):
        FBCacheConfig(selective="approx", kv_cache_stale=True)


def test_configs_say_what_the_system_must_provide():
    assert FBCacheConfig().needs_whole_stack and not ScopeConfig().needs_whole_stack
    assert ScopeConfig(eps_error=0.5).needs_stack_feedback
    assert not ScopeConfig(error_estimate="off").needs_stack_feedback
    assert not ScopeConfig(eps_error=math.inf).needs_stack_feedback


def test_from_dict_on_a_subclass_checks_the_method():
    with pytest.raises(ValueError, match="expected 'scope'"):
        ScopeConfig.from_dict({"method": "teacache"})
    assert ScopeConfig.from_dict({"order": 1}).order == 1


def test_scope_has_no_model_facts_built_in():
    """Polynomials come from the model families that publish them: a process that imports only
    `scope` knows no name, and TeaCache's own default is no polynomial."""
    import subprocess
    import sys

    code = ("from scope.config import TeaCacheConfig, registered_rescales\n"
            "assert registered_rescales() == {} and TeaCacheConfig().rescale is None\n"
            "try:\n    TeaCacheConfig(rescale='wan-1.3b')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "unknown rescale polynomial 'wan-1.3b'" in out and "pipelines.wan.calibration" in out


def test_a_wan_family_names_its_published_teacache_default():
    from pipelines.wan.calibration import accel_defaults

    cfg = make_config("teacache", **accel_defaults("teacache"))
    assert cfg.rescale == "wan-1.3b" and cfg.effective_probe_kind == "e0"
    assert accel_defaults("scope") == {}
