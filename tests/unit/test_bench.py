"""`scope bench` / `scope calibrate` on a tiny random procedural bundle (seconds, not minutes).

The bundle is the real `ProceduralBundle` (tiny SkyReels-V2 DF transformer, word-table text
encoder, linear patch codec) with random weights and a short schedule, so every code path of the
bench runs without the trained weights: the numbers mean nothing, the bookkeeping is checked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jobs.bench import (BenchCase, bench_cases, format_table, no_cache, no_predict, plot_bench,
                        run_bench_on, scope_config, write_json)
from jobs.calibrate import calibrate, calibration_prompts, write_config
from jobs.cli import build_parser
from jobs.quality import PSNR_CAP_DB
from pipelines.procedural.bundle import ProceduralBundle
from pipelines.procedural.codec import PatchCodec
from pipelines.procedural.data import caption_vocabulary, split_attributes
from pipelines.procedural.text import TextEncoder
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.sizes import config_for
from scope.config import ScopeConfig, load_config

FIELDS = {"method", "setting", "config", "speedup", "block_eval_fraction", "psnr_db", "ssim",
          "content_accuracy", "content_accuracy_per_attribute"}
FRAMES = 8          # one segment of 4 causal blocks
PROMPT = "a red circle moves right"


def tiny_bundle() -> ProceduralBundle:
    """Random tiny bundle: 32x32 video -> 8x8 latents (16 channels), 6 steps, ar_step 1."""
    torch.manual_seed(0)
    cfg = config_for("tiny")
    model = WanDFTransformer(cfg).eval()
    text = TextEncoder(caption_vocabulary(), text_len=cfg.text_len, text_dim=cfg.text_dim).eval()
    q, _ = torch.linalg.qr(torch.randn(48, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    codec = PatchCodec(torch.full((48,), 0.3), q.T.float().contiguous(), torch.full((16,), 0.2), patch=4)
    defaults = {"num_inference_steps": 6, "shift": 3.0, "guidance_scale": 3.0, "causal_block_size": 2,
                "ar_step": 1, "base_num_frames": 8, "overlap_frames": 4, "causal_attention": True,
                "height": 32, "width": 32}
    return ProceduralBundle(model, text, codec, defaults, Path("tiny-random"))


@pytest.fixture(scope="module")
def bundle() -> ProceduralBundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def rows(bundle):
    cases = [BenchCase("scope", "x1", scope_config(1.0), "sweep", "scope"),
             BenchCase("none", "selective alone", {"method": "none", "selective": "exact",
                                                   "kv_cache_finished": True}, "ablation")]
    return run_bench_on(bundle, cases, [PROMPT], FRAMES, seed=0, threads=1, warmup=False, log=None)


def test_every_row_has_the_fields_and_the_settings_used(rows):
    assert [r["method"] for r in rows] == ["none", "scope", "none"]
    for r in rows:
        missing = FIELDS - set(r)
        assert not missing, f"row {r['setting']!r} lacks {sorted(missing)}"
        assert isinstance(r["config"], dict) and r["config"]["method"] == r["method"]
        assert set(r["content_accuracy_per_attribute"]) == {"colour", "shape", "motion"}
        assert 0.0 <= r["content_accuracy"] <= 1.0
        assert 0.0 < r["block_eval_fraction"] <= 1.0 and r["speedup"] > 0
    assert rows[1]["config"]["tau_cache"] == pytest.approx(0.05)


def test_reference_is_none_run_first_with_speedup_one_and_capped_psnr(rows):
    ref = rows[0]
    assert ref["group"] == "reference" and ref["config"] == {"method": "none", "hooks": False}
    assert ref["speedup"] == 1.0                  # by construction: the ratio to itself
    assert ref["psnr_db"] == PSNR_CAP_DB == 100.0  # none vs none: identical, capped at 100 dB
    assert ref["ssim"] == 1.0 and ref["block_eval_fraction"] == 1.0


def test_exact_selective_computation_alone_is_lossless_and_cheaper(rows):
    sel = rows[2]
    assert sel["psnr_db"] == PSNR_CAP_DB and sel["ssim"] == pytest.approx(1.0)
    assert sel["block_eval_fraction"] < 0.9


def test_json_is_a_list_of_objects_and_the_table_and_plot_are_written(rows, tmp_path):
    write_json(rows, tmp_path / "bench.json")
    loaded = json.loads((tmp_path / "bench.json").read_text())
    assert isinstance(loaded, list) and all(FIELDS <= set(r) for r in loaded)
    assert all(math.isfinite(r["psnr_db"]) for r in loaded)
    table = format_table(rows)
    assert "full compute (reference)" in table and "selective alone" in table
    pytest.importorskip("matplotlib")
    plot_bench(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_cases_include_sweeps_and_the_three_ablations():
    cases = bench_cases(["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache"])
    settings = [c.setting for c in cases]
    assert any("selective computation alone" in s for s in settings)
    assert any("without Predict" in s for s in settings) and any("without Cache" in s for s in settings)
    for m in ("scope", "teacache", "flowcache", "taylorseer", "fbcache"):
        assert sum(c.method == m and c.group == "sweep" for c in cases) >= 3, m
    with pytest.raises(ValueError, match="unknown method"):
        bench_cases(["none", "magcache"])


def test_ablation_configs_disable_one_mode_and_stay_valid():
    from scope.config import AccelConfig

    ref = scope_config(1.0)
    off_cache = AccelConfig.from_dict(no_cache(ref))
    assert off_cache.tau_cache == 0.0          # acc >= 0, so `acc < 0` never caches
    off_predict = AccelConfig.from_dict(no_predict(ref))
    # no float lies in [tau_cache, tau_predict): the Predict band is empty
    assert math.nextafter(off_predict.tau_cache, math.inf) == off_predict.tau_predict


def test_calibration_uses_training_captions_not_held_out_ones():
    held = {a.caption() for a in split_attributes().heldout}
    prompts = calibration_prompts(3)
    assert len(set(prompts)) == 3 and not held & set(prompts)


def test_calibrate_writes_a_config_that_load_config_accepts(bundle, tmp_path):
    result = calibrate(bundle, [PROMPT], FRAMES, target_psnr=30.0, ratios=(2.0,), bisect_steps=1,
                       threads=1, log=None)
    assert result.evaluations, "the search evaluated no point"
    if result.best is not None:
        assert result.best.passed and result.best.psnr_min >= 30.0
        assert all(e.block_eval_fraction >= result.best.block_eval_fraction - 1e-9
                   for e in result.evaluations if e.passed)
    write_config(result.config, tmp_path / "accel.json")
    config = load_config(tmp_path / "accel.json")
    assert isinstance(config, ScopeConfig)
    assert config.kv_cache_finished   # causal model: finished chunks served from K/V (exact)
    assert {e.family for e in result.evaluations} == {"exact", "stale-kv"}


def test_calibration_families_can_be_chosen_by_name(bundle):
    from jobs.calibrate import base_families, select_families

    available = base_families(bundle)
    assert list(available) == ["exact", "stale-kv"]       # the tiny bundle is block-causal
    assert list(select_families(available, "stale-kv")) == ["stale-kv"]
    assert select_families(available, None) == available
    with pytest.raises(ValueError, match="unknown \\['magic'\\]; this model offers exact, stale-kv"):
        select_families(available, "exact,magic")


def test_cli_parsers_take_the_bench_and_calibrate_options():
    args = build_parser().parse_args(["bench", "--methods", "none,scope", "--prompts", "1", "--frames", "8",
                                      "--json", "b.json", "--plot", "b.png", "--threads", "2"])
    assert (args.methods, args.prompts, args.frames, args.plot, args.threads) == ("none,scope", 1, 8, "b.png", 2)
    args = build_parser().parse_args(["calibrate", "--target-psnr", "30", "--out", "accel.json"])
    assert (args.target_psnr, args.out, args.ratios, args.families) == (30.0, "accel.json", "2,4", None)
    args = build_parser().parse_args(["calibrate", "--families", "exact"])
    assert args.families == "exact"


def save_bundle(bundle: ProceduralBundle, folder: Path) -> Path:
    """Write the tiny bundle as a weights folder that `load_bundle` reads (train.py's layout)."""
    from pipelines.procedural.train import save_text_encoder, write_single_shard_index
    from pipelines.skyreels_v2.checkpoint import save_transformer

    folder.mkdir(parents=True, exist_ok=True)
    save_transformer(bundle.transformer, str(folder))
    write_single_shard_index(bundle.transformer, folder)
    save_text_encoder(bundle.text_encoder, folder)
    bundle.codec.save(folder / "codec")
    (folder / "pipeline.json").write_text(json.dumps(bundle.defaults))
    return folder


def test_scope_bench_and_calibrate_commands_end_to_end(bundle, tmp_path, capsys):
    from jobs.cli import main

    weights = save_bundle(bundle, tmp_path / "weights")
    rc = main(["bench", "--model", str(weights), "--methods", "none,scope", "--sweep", "none", "--prompts", "1",
               "--frames", str(FRAMES), "--threads", "1", "--json", str(tmp_path / "bench.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["setting"] for r in rows][:2] == ["full compute (reference)", "defaults"]
    assert "speedup" in capsys.readouterr().out          # the table was printed
    rc = main(["calibrate", "--model", str(weights), "--prompts", "1", "--frames", str(FRAMES), "--ratios", "2",
               "--threads", "1", "--out", str(tmp_path / "accel.json"), "--report", str(tmp_path / "cal.json")])
    assert rc == 0
    assert isinstance(load_config(tmp_path / "accel.json"), ScopeConfig)
    report = json.loads((tmp_path / "cal.json").read_text())
    assert report["evaluations"] and report["target_psnr"] == 30.0
