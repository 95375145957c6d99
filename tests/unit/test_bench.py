"""`scope bench` / `scope calibrate` on a tiny random procedural bundle (seconds, not minutes).

The bundle is the real `ProceduralBundle` (tiny SkyReels-V2 DF transformer, word-table text
encoder, linear patch codec) with random weights and a short schedule, so every code path of the
bench runs without the trained weights: the numbers mean nothing, the bookkeeping is checked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import jobs.bench as bench
from jobs.bench import (DEFAULT_PROMPTS, BenchCase, RunRecord, SkipBlock, bench_cases, bench_prompts,
                        blocks_skipped, format_table, generate_case, heldout_prompts, load_prompts_file,
                        measure_floors, no_cache, no_predict, plot_bench, read_prompts_file, reference_case,
                        round_order, run_bench_on, scope_config, with_still_and_moving, write_json)
from jobs.calibrate import calibrate, calibration_prompts, write_config
from jobs.cli import build_parser
from jobs.quality import PSNR_CAP_DB
from pipelines.procedural.bundle import ProceduralBundle
from pipelines.procedural.codec import PatchCodec
from pipelines.procedural.data import caption_vocabulary, split_attributes
from pipelines.procedural.text import TextEncoder
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.sizes import config_for
from scope.config import AccelConfig, ScopeConfig, load_config

FIELDS = {"method", "setting", "config", "speedup", "block_eval_fraction", "psnr_db", "psnr_db_min", "ssim",
          "content_accuracy", "content_accuracy_per_attribute", "overhead_floor_s", "speedup_limit"}
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
    cases = [BenchCase("scope", "x1", scope_config(), "sweep", "scope"),
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
    assert rows[1]["config"] == scope_config()         # the config that ran is recorded whole


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


def test_cases_include_defaults_sweeps_and_the_ablations():
    ratios = {"cond": [1.0, 0.99], "uncond": [1.0, 0.98]}
    methods = ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache"]
    cases = bench_cases(methods, mag_ratios=ratios, num_steps=30)
    settings = [c.setting for c in cases]
    assert any("selective computation alone" in s for s in settings)
    assert any("Cache instead of Predict" in s for s in settings) and any("paper's coordinate" in s for s in settings)
    assert any("lockstep" in s for s in settings) and any("per-chunk indicator" in s for s in settings)
    for m in methods[1:]:
        assert sum(c.method == m and c.group == "default" for c in cases) == 1, m
        assert sum(c.method == m and c.group == "sweep" for c in cases) >= 1, m
    # every baseline runs at least as strong as published: exact selective computation + finished K/V
    assert all(c.config.get("kv_cache_finished") for c in cases if c.config and c.method != "none")
    # TaylorSeer's default decides per model call, as its original
    taylor = next(c for c in cases if c.method == "taylorseer" and c.group == "default")
    assert AccelConfig.from_dict(taylor.config).granularity == "global"
    with pytest.raises(ValueError, match="magcache needs mag_ratios"):
        bench_cases(["magcache"])
    with pytest.raises(ValueError, match="unknown method") as err:
        bench_cases(["none", "warpcache"])
    # the valid names are scope.config.METHOD_CONFIGS', whatever methods it holds today
    from scope.config import METHOD_CONFIGS
    assert all(m in str(err.value) for m in METHOD_CONFIGS)


def test_ablation_configs_disable_one_mode_and_stay_valid():
    from scope.config import AccelConfig

    ref = scope_config()
    off_cache = AccelConfig.from_dict(no_cache(ref))
    assert off_cache.tau_cache == 0.0          # acc >= 0, so `acc < 0` never caches
    off_predict = AccelConfig.from_dict(no_predict(ref))
    assert off_predict.tau_predict == 0.0      # `acc < 0` never predicts


def test_calibration_uses_training_captions_not_held_out_ones():
    held = {a.caption() for a in split_attributes().heldout}
    prompts = calibration_prompts(3)
    assert len(set(prompts)) == 3 and not held & set(prompts)


SMALL_SEARCH = {"tau_predict": [0.3, math.inf], "max_consecutive": [2, 4], "coordinate": ["sigma", "step"],
                "order": [0, 1]}


def test_calibrate_searches_every_knob_and_writes_a_config_that_load_config_accepts(bundle, tmp_path):
    result = calibrate(bundle, [PROMPT], FRAMES, target_psnr=30.0, target_min_psnr=28.0, rounds=1,
                       search=SMALL_SEARCH, threads=1, log=None)
    assert result.evaluations, "the search evaluated no point"
    for knob, values in SMALL_SEARCH.items():   # every knob value was measured in some family
        tried = {json.dumps(e.config[knob]) for e in result.evaluations}
        assert {json.dumps(v) for v in values} <= tried, f"{knob}: tried only {tried}"
    if result.best is not None:
        assert result.best.passed and result.best.psnr_mean >= 30.0 and result.best.psnr_min >= 28.0
        assert all(e.block_eval_fraction >= result.best.block_eval_fraction - 1e-9
                   for e in result.evaluations if e.passed)
    write_config(result.config, tmp_path / "accel.json")
    config = load_config(tmp_path / "accel.json")
    assert isinstance(config, ScopeConfig)
    assert config.kv_cache_finished   # causal model: finished chunks served from K/V (exact)
    assert {e.family for e in result.evaluations} == {"exact", "stale-kv"}
    # the schedule it was measured on travels with it, and a different one is named
    assert config.calibrated_for["frames"] == FRAMES and config.calibrated_for["num_steps"] >= 1
    assert config.schedule_mismatch({"num_steps": config.calibrated_for["num_steps"] + 1})


def test_calibrate_refuses_an_unknown_knob(bundle):
    with pytest.raises(ValueError, match="unknown SCOPE knob\\(s\\) \\['tau'\\]"):
        calibrate(bundle, [PROMPT], FRAMES, search={"tau": [1.0]}, log=None)


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
    assert (args.rounds, args.no_floor, args.prompts_file) == (2, False, None)
    args = build_parser().parse_args(["bench", "--prompts-file", "p.txt", "--rounds", "3", "--no-floor"])
    assert (args.prompts, args.prompts_file, args.rounds, args.no_floor) == (None, "p.txt", 3, True)
    assert build_parser().parse_args(["bench", "--repeats", "4"]).rounds == 4     # the old name
    args = build_parser().parse_args(["calibrate", "--target-psnr", "30", "--out", "accel.json"])
    assert (args.target_psnr, args.target_min_psnr, args.out, args.rounds, args.families) == (
        30.0, 29.0, "accel.json", 2, None)
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
    assert [r["setting"] for r in rows][:2] == ["full compute (reference)", "calibrated (shipped config)"]
    assert rows[0]["run"]["rounds"] == 2 and all(r["speedup_limit"] > 0 for r in rows)   # CLI defaults
    assert "speedup" in capsys.readouterr().out          # the table was printed
    rc = main(["calibrate", "--model", str(weights), "--prompts", "1", "--frames", str(FRAMES), "--rounds", "1",
               "--families", "exact", "--target-psnr", "30", "--threads", "1", "--out", str(tmp_path / "accel.json"), "--report", str(tmp_path / "cal.json")])
    assert rc == 0
    assert isinstance(load_config(tmp_path / "accel.json"), ScopeConfig)
    # a bad caption in --prompts-file: one error line naming the file and line, no bench run
    (tmp_path / "p.txt").write_text("# captions\na red circle stays still\na red circel bounces\n")
    capsys.readouterr()
    rc = main(["bench", "--model", str(weights), "--methods", "none", "--sweep", "none", "--prompts-file",
               str(tmp_path / "p.txt"), "--frames", str(FRAMES), "--json", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'p.txt'}, line 3" in err and "circel" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()
    report = json.loads((tmp_path / "cal.json").read_text())
    assert report["evaluations"] and report["target_psnr"] == 30.0


# ---------------------------------------------------------------------------------------------
# prompts: --prompts-file and the default held-out set
# ---------------------------------------------------------------------------------------------

def test_prompts_file_skips_blank_lines_and_comments(bundle, tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# bench captions\n\na red circle stays still\n   \n  # indented comment\n"
                    "  a blue square bounces  \na green triangle moves left\n")
    assert read_prompts_file(path) == [(3, "a red circle stays still"), (6, "a blue square bounces"),
                                       (7, "a green triangle moves left")]
    assert load_prompts_file(path, bundle) == ["a red circle stays still", "a blue square bounces",
                                               "a green triangle moves left"]
    assert bench_prompts(bundle, path, None) == load_prompts_file(path, bundle)


def test_a_bad_caption_fails_with_one_line_naming_the_file_and_line(bundle, tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red circle stays still\n# fine\n\na purple hexagon bounces\na blue square bounces\n")
    with pytest.raises(ValueError) as err:
        load_prompts_file(path, bundle)
    message = str(err.value)
    assert message.startswith(f"{path}, line 4: ") and "hexagon" in message and "\n" not in message
    path.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="no captions"):
        load_prompts_file(path, bundle)
    with pytest.raises(ValueError, match="either --prompts-file or --prompts"):
        bench_prompts(bundle, path, 3)


def test_default_prompts_are_six_with_still_and_moving_objects(bundle):
    prompts = bench_prompts(bundle, None, None)
    assert len(prompts) == DEFAULT_PROMPTS == 6 and prompts == heldout_prompts(6)
    assert any("stays still" in p for p in prompts)
    assert any("bounces" in p for p in prompts) and any(" moves " in p for p in prompts)
    for n in range(2, 9):
        chosen = heldout_prompts(n)
        assert any("stays still" in p for p in chosen) and not all("stays still" in p for p in chosen), n


def test_prompt_choice_swaps_in_the_missing_kind_deterministically():
    movers_first = ["a red circle moves right", "a blue square bounces", "a red square moves up",
                    "a green circle stays still", "a white triangle stays still"]
    assert with_still_and_moving(movers_first, 3) == ["a red circle moves right", "a blue square bounces",
                                                      "a green circle stays still"]
    still_first = ["a red circle stays still", "a blue square stays still", "a red square moves up"]
    assert with_still_and_moving(still_first, 2) == ["a red circle stays still", "a red square moves up"]
    assert with_still_and_moving(movers_first, 1) == movers_first[:1]     # one prompt: nothing to mix
    assert with_still_and_moving(movers_first, 2) == ["a red circle moves right", "a green circle stays still"]


# ---------------------------------------------------------------------------------------------
# interleaved timing rounds
# ---------------------------------------------------------------------------------------------

TWO_CASES = [BenchCase("scope", "x1", scope_config(), "sweep", "scope"),
             BenchCase("taylorseer", "interval=2", {"method": "taylorseer", "interval": 2}, "sweep")]


def test_rounds_alternate_forward_and_reversed_then_the_floor_runs(bundle, monkeypatch):
    calls = []

    def recording(bundle_, case, prompt, frames, seed, **kw):
        skipped = isinstance(bundle_.transformer.blocks[0], SkipBlock)
        calls.append((case.setting, prompt, seed, skipped))
        return generate_case(bundle_, case, prompt, frames, seed, **kw)

    monkeypatch.setattr(bench, "generate_case", recording)
    prompts = ["a red circle stays still", "a blue square bounces"]
    rows = run_bench_on(bundle, TWO_CASES, prompts, FRAMES, seed=10, threads=1, warmup=False, rounds=2, log=None)
    ref, a, b = "full compute (reference)", "x1", "interval=2"
    forward, backward = [ref, a, b], [b, a, ref]
    expected = [(c, prompts[0], 10, False) for c in forward + backward]
    expected += [(c, prompts[1], 11, False) for c in forward + backward]
    expected += [(c, prompts[0], 10, True) for c in forward]     # floor: first prompt, identity blocks
    assert calls == expected
    assert rows[0]["run"]["rounds"] == 2 and rows[0]["run"]["floor"]["prompt"] == prompts[0]
    assert [p["seed"] for p in rows[1]["per_prompt"]] == [10, 11]


def test_round_order_puts_the_reference_last_in_odd_rounds():
    assert round_order(["ref", "a", "b", "c"], 0) == ["ref", "a", "b", "c"]
    assert round_order(["ref", "a", "b", "c"], 1) == ["c", "b", "a", "ref"]
    assert round_order(["ref", "a", "b", "c"], 2) == ["ref", "a", "b", "c"]


def test_walls_are_the_minimum_over_rounds_and_videos_come_from_round_zero(bundle, monkeypatch):
    """A fake generator: round-0 videos are all zeros (identical to the reference), later rounds
    noise; the wall-clock of each case drops from round to round."""
    count: dict[str, int] = {}
    walls = {"x1": [2.0, 1.0, 1.5], "interval=2": [4.0, 3.0, 5.0], "full compute (reference)": [6.0, 8.0, 7.0]}

    def fake(bundle_, case, prompt, frames, seed, **kw):
        r = count.setdefault(case.setting, 0)
        count[case.setting] = r + 1
        video = np.zeros((2, 16, 16, 3), np.uint8) if r == 0 else np.random.default_rng(r).integers(
            0, 255, (2, 16, 16, 3), dtype=np.uint8)
        record = RunRecord(prompt, seed, walls[case.setting][min(r, 2)], video, cpu_s=1.0)
        record.check = {"colour": "red", "shape": "circle", "motion": "still",
                        "colour_ok": True, "shape_ok": True, "motion_ok": True}
        return record

    monkeypatch.setattr(bench, "generate_case", fake)
    rows = run_bench_on(bundle, TWO_CASES, [PROMPT], FRAMES, threads=1, warmup=False, repeats=2, log=None)
    # repeats= is the old keyword for rounds; the floor run is the third call of each entry
    assert rows[0]["run"]["rounds"] == 2
    assert [r["wall_s"] for r in rows] == [6.0, 1.0, 3.0]
    assert rows[1]["speedup"] == pytest.approx(6.0) and rows[2]["speedup"] == pytest.approx(2.0)
    assert all(r["psnr_db"] == PSNR_CAP_DB for r in rows)          # round-0 videos were kept
    assert [r["overhead_floor_s"] for r in rows] == [7.0, 1.5, 5.0]
    assert [r["speedup_limit"] for r in rows] == pytest.approx([6.0 / 7.0, 6.0 / 1.5, 6.0 / 5.0])


# ---------------------------------------------------------------------------------------------
# overhead floor
# ---------------------------------------------------------------------------------------------

def test_rows_carry_the_floor_and_the_limit(rows):
    ref_wall = rows[0]["per_prompt"][0]["wall_s"]
    for r in rows:
        assert 0 < r["overhead_floor_s"] and r["speedup_limit"] == pytest.approx(
            ref_wall / r["overhead_floor_s"], rel=5e-3)   # both rounded to 0.1 ms
    # no block evaluated: the reference's floor is below its full-compute wall-clock
    assert rows[0]["overhead_floor_s"] < rows[0]["wall_s"] and rows[0]["speedup_limit"] > 1
    table = format_table(rows)
    assert "floor" in table.splitlines()[0] and "limit" in table.splitlines()[0]
    assert f"{rows[0]['speedup_limit']:6.2f}" in table.splitlines()[2]


def test_no_floor_leaves_the_fields_empty(bundle):
    rows = run_bench_on(bundle, TWO_CASES[:1], [PROMPT], FRAMES, threads=1, warmup=False, rounds=1,
                        floor=False, log=None)
    assert all(r["overhead_floor_s"] is None and r["speedup_limit"] is None for r in rows)
    assert rows[0]["run"]["floor"] is None and rows[0]["run"]["rounds"] == 1
    assert format_table(rows).splitlines()[2].split()[-2:] == ["-", "-"]


def test_floor_runs_restore_the_blocks_and_the_model_output(bundle):
    model = bundle.transformer
    originals = list(model.blocks)
    before = generate_case(bundle, reference_case(), PROMPT, FRAMES, 3).video
    entries = [reference_case(), *TWO_CASES,
               BenchCase("fbcache", "defaults", {"method": "fbcache"}, "default")]   # two-pass path
    floors = measure_floors(bundle, entries, PROMPT, FRAMES, 3)
    assert len(floors) == len(entries) and all(f > 0 for f in floors)
    assert all(a is b for a, b in zip(model.blocks, originals)) and len(model.blocks) == len(originals)
    after = generate_case(bundle, reference_case(), PROMPT, FRAMES, 3).video
    assert np.array_equal(before, after)


def test_identity_blocks_change_the_output_and_are_restored_after_an_error(bundle):
    model = bundle.transformer
    originals = list(model.blocks)
    real = generate_case(bundle, reference_case(), PROMPT, FRAMES, 3).video
    with blocks_skipped(model):
        assert all(isinstance(b, SkipBlock) for b in model.blocks)
        skipped = generate_case(bundle, reference_case(), PROMPT, FRAMES, 3).video
    assert not np.array_equal(real, skipped)          # the floor run really skipped the blocks
    with pytest.raises(RuntimeError, match="boom"):
        with blocks_skipped(model):
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(model.blocks, originals))


def test_skip_block_returns_the_hidden_states_for_any_call():
    h = torch.randn(1, 3, 4)
    block = SkipBlock()
    assert block(h, object(), 0, None) is h and block(h=h) is h and block(x=h, layer=2) is h
