"""benchmarks/paper_in_miniature.py: the run plan, resuming, the across-seed intervals and the report, and the
--quick pipeline end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from speciarl_jax.training_config import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "paper_in_miniature.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("paper_in_miniature", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mini = _load_script()

CATEGORY_KEYS = ("specific", "more specific", "less specific", "generic", "wrong", "abstain", "parse failure")


def fake_result(method, optimizer, seed, hm, specific, correctness=0.9, specificity=0.5, wall_s=30.0):
    shares = {k: 0.0 for k in CATEGORY_KEYS}
    shares["specific"] = specific
    shares["generic"] = correctness - specific
    shares["wrong"] = 1.0 - correctness
    evaluation = {"correctness": correctness, "specificity": specificity, "hm": hm, "score": 0.1}
    evaluation.update({f"share/{k}": v for k, v in shares.items()})
    return {"name": f"{method}_{optimizer}_seed{seed}", "method": method, "optimizer": optimizer, "seed": seed,
            "eval": evaluation, "stopped": "", "wall_s": wall_s, "build_s": 1.0, "train_s": wall_s - 3, "eval_s": 2.0,
            "first_step_s": 5.0, "later_step_s": 1.0}


def test_t_interval_by_hand():
    # mean 0.6, sample sd 0.1, t(0.975, df=2) = 4.302653 -> half-width 4.302653 * 0.1 / sqrt(3) = 0.248414
    mean, low, high = mini.t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert high - mean == pytest.approx(0.248414, abs=1e-6)
    assert mean - low == pytest.approx(0.248414, abs=1e-6)
    # two values 0.2, 0.4: sd 0.141421, t(0.975, 1) = 12.706205 -> half-width 12.706205 * 0.141421 / sqrt(2) = 1.270621
    mean, low, high = mini.t_interval([0.2, 0.4])
    assert mean == pytest.approx(0.3) and high - mean == pytest.approx(1.2706205, abs=1e-6)
    # identical values: a zero-width interval; one value: no interval
    assert mini.t_interval([0.5, 0.5, 0.5]) == pytest.approx((0.5, 0.5, 0.5))
    mean, low, high = mini.t_interval([0.42])
    assert mean == 0.42 and math.isnan(low) and math.isnan(high)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df, value in enumerate(mini.T_975, start=1):
        assert value == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5), df


def test_report_from_synthetic_results(tmp_path):
    results = [fake_result("speciarl", "grpo", s, hm, sp) for s, hm, sp in ((0, 0.5, 0.2), (1, 0.6, 0.3), (2, 0.7, 0.4))]
    results += [fake_result("reward3", "grpo", s, hm, 0.1) for s, hm in ((0, 0.30), (1, 0.30), (2, 0.30))]
    results += [fake_result("sft", "sft", s, 0.4, 0.25) for s in (0, 1, 2)]
    warm = fake_result("warm", "warm", 0, 0.25, 0.05)
    warm["best_of"], warm["best_of_n"] = fake_result("warm", "warm", 0, 0.45, 0.3)["eval"], 64
    warm["ideal"] = dict(fake_result("ideal", "ideal", 0, 0.67, 0.5, correctness=1.0)["eval"],
                         **{"lookalike/share/less specific": 1.0, "lookalike/images": 95})
    results.insert(0, warm)
    results[1]["eval"].update({"lookalike/share/less specific": 0.5, "lookalike/tv_to_ideal": 0.5})
    paths = mini.write_report(results, str(tmp_path / "mini"), wall_s=330.0, settings=dict(
        quick=False, warm_fine_steps=1500, warm_mixed_steps=500, warm_sft_levels=[0.4, 0.45, 0.15], rl_steps=20,
        batch_size=8, num_samples=8, eval_images=192, sft_steps=40, sft_batch_size=32, lookalike_classes=15))
    rows = {(r["method"], r["optimizer"]): r for r in paths["rows"]}
    assert [(r["method"], r["optimizer"]) for r in paths["rows"]] == [
        ("speciarl", "grpo"), ("reward3", "grpo"), ("sft", "sft"), ("warm", "warm"), ("best_of", "warm"),
        ("ideal", "ideal")]
    assert rows[("best_of", "warm")]["model"] == "warm start, Best-of-64" and rows[("best_of", "warm")]["hm"] == 0.45
    # one seed of three reports a look-alike share: a share a run does not report counts as 0
    assert rows[("speciarl", "grpo")]["lookalike/share/less specific"] == pytest.approx(0.5 / 3)
    speciarl = rows[("speciarl", "grpo")]
    assert speciarl["n"] == 3 and speciarl["seeds"] == [0, 1, 2]
    assert speciarl["hm"] == pytest.approx(0.6)
    assert speciarl["hm_high"] - 0.6 == pytest.approx(0.248414, abs=1e-6)
    # share/specific 0.2, 0.3, 0.4: the same interval, scaled to % in the table
    assert speciarl["share/specific_low"] == pytest.approx(0.3 - 0.248414, abs=1e-6)
    # generic = 0.9 - specific -> 0.7, 0.6, 0.5: mean 0.6, same half-width
    assert speciarl["share/generic"] == pytest.approx(0.6)
    assert rows[("reward3", "grpo")]["hm_low"] == pytest.approx(0.3)  # no spread, zero width

    md = open(paths["md"]).read()
    lines = md.splitlines()
    speciarl_line = next(line for line in lines if line.startswith("| SpeciaRL"))
    assert "| 30.0 ± 24.8 |" in speciarl_line  # specific %
    assert "| 0.600 ± 0.248 |" in speciarl_line  # HM
    assert "| 60.0 ± 24.8 |" in speciarl_line  # generic %
    warm_line = next(line for line in lines if line.startswith("| warm start"))
    assert "±" not in warm_line and "| 0.250 |" in warm_line
    assert "- GRPO: speciarl 0.600 > reward3 0.300" in md
    assert "this invocation took 5.5 min" in md
    lookalike = md[md.index("## Look-alike images"):]
    assert "95 images" in lookalike.splitlines()[0]
    ideal_line = next(line for line in lookalike.splitlines() if line.startswith("| ideal policy"))
    assert "| 100.0 |" in ideal_line  # less specific: every look-alike image answered with its family
    assert "- GRPO: speciarl 0.500" in lookalike  # the distance to the ideal (one seed reports it)
    assert os.path.getsize(paths["png"]) > 10_000
    stored = json.load(open(paths["json"]))
    assert len(stored["runs"]) == 10 and stored["rows"][0]["hm"] == pytest.approx(0.6)


def test_plan_covers_the_comparison(tmp_path):
    runs = mini.plan(str(tmp_path))
    fine, warm = runs[0].config, runs[1].config
    assert runs[0].method == "warm_fine" and fine.sft.enabled and fine.steps == 0 and fine.model.tiny
    assert tuple(fine.sft.levels) == (1.0, 0.0, 0.0)  # phase 1 learns to see
    assert runs[1].method == "warm" and warm.model.path == os.path.join(runs[0].run_dir, "sft_model")
    assert runs[1].best_of == 64 and not any(r.best_of for r in runs if r is not runs[1])
    assert warm.sft.enabled and warm.steps == 0 and tuple(warm.sft.levels) == (0.4, 0.45, 0.15)
    rl = [r for r in runs if r.method in mini.METHODS]
    sft = [r for r in runs if r.method == "sft"]
    assert len(rl) == 3 * 3 * 3 and len(sft) == 3 and len(runs) == 32
    assert len({r.run_dir for r in runs}) == len(runs)
    warm_model = os.path.join(runs[1].run_dir, "sft_model")
    # half of the world's fine classes come in look-alike sets, the rest can be seen
    world = mini._world(warm)
    assert sum(world.is_lookalike(name) for name in world.class_names) == 15
    assert c_source(warm) == c_source(fine) and warm.eval.source.lookalikes == mini.miniature.LOOKALIKES
    for r in rl + sft:
        c = r.config
        validate(c)
        assert c.model.path == warm_model and not c.model.tiny
        assert c.seed == r.seed and c.data.seed == r.seed
        # the eval set is the same for every run
        assert c.eval.source.to_dict() == runs[0].config.eval.source.to_dict()
    for r in rl:
        assert not r.config.sft.enabled and r.config.rl.algorithm == r.optimizer
        assert r.config.reward.kind == ("speciarl" if r.method == "speciarl" else "static")
        if r.method != "speciarl":
            assert r.config.reward.table == r.method
        if r.optimizer == "dapo":
            assert 0 < r.config.rl.overlong_buffer < r.config.rollout.max_new_tokens
    for r in sft:
        c = r.config
        assert c.sft.enabled and tuple(c.sft.levels) == (1.0, 0.0, 0.0) and c.steps == 0 and c.epochs == 0
        # as many trained rows as an RL run's rollouts
        assert c.sft.steps * c.sft.batch_size == rl[0].config.steps * rl[0].config.data.batch_size * \
            rl[0].config.rollout.num_samples
    quick = mini.plan(str(tmp_path), quick=True)
    assert len(quick) == 2 + 3 + 1 and {r.optimizer for r in quick[2:5]} == {"grpo"}


def c_source(config):
    return config.data.source.to_dict()


def test_the_ideal_policy_by_hand():
    """The ideal's report from the held-out labels alone: specific on perceivable images, less specific on
    look-alike ones, and the distance of a report to it."""
    config = mini.plan("/tmp/unused")[2].config
    ideal = mini.ideal_report(config)
    n_look, n_seen = ideal["lookalike/images"], ideal["perceivable/images"]
    assert n_look + n_seen == config.eval.source.num_images and n_look > 0 and n_seen > 0
    assert ideal["correctness"] == 1.0 and ideal["share/specific"] == pytest.approx(n_seen / (n_look + n_seen))
    assert ideal["perceivable/share/specific"] == 1.0 and ideal["lookalike/share/less specific"] == 1.0
    # a policy answering every image at the family level: half of the shares move, on the perceivable half
    family_level = {"share/less specific": 1.0, "perceivable/share/less specific": 1.0,
                    "lookalike/share/less specific": 1.0}
    distance = mini.with_distance_to_ideal(family_level, ideal)
    assert distance["perceivable/tv_to_ideal"] == 1.0 and distance["lookalike/tv_to_ideal"] == 0.0
    assert distance["tv_to_ideal"] == pytest.approx(n_seen / (n_look + n_seen))


def test_a_finished_run_is_skipped_and_a_changed_config_refused(tmp_path):
    run = mini.plan(str(tmp_path))[1]
    assert mini.load_result(run) is None
    os.makedirs(run.run_dir)
    with open(mini.result_path(run), "w") as f:
        json.dump({"name": run.name, "config": mini.config_record(run.config)}, f)
    assert mini.load_result(run)["name"] == run.name
    changed = mini.plan(str(tmp_path))[1]
    changed.config.rl.learning_rate = 1.0
    with pytest.raises(RuntimeError, match="rl.learning_rate"):
        mini.load_result(changed)


def test_quick_pipeline_end_to_end(tmp_path):
    """The whole --quick pipeline through the real Trainer (about a minute on 2 CPU cores)."""
    out, report = tmp_path / "out", tmp_path / "report" / "mini"
    command = [sys.executable, SCRIPT, "--quick", "--out", str(out), "--report", str(report)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "XLA_FLAGS": ""})  # one CPU device, as the script runs
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(out / "warm" / "sft_model" / "config.json")
    stored = json.load(open(str(report) + ".json"))
    assert [r["name"] for r in stored["runs"]] == ["warm_fine", "warm", "speciarl_grpo_seed0", "reward3_grpo_seed0",
                                                   "scala1_grpo_seed0", "sft_seed0"]
    warm = stored["runs"][1]
    assert warm["best_of_n"] == 4 and warm["ideal"]["correctness"] == 1.0
    assert warm["best_of"]["perceivable/images"] + warm["best_of"]["lookalike/images"] == 16
    for r in stored["runs"]:
        shares = sum(v for k, v in r["eval"].items() if k.startswith("share/"))
        assert shares == pytest.approx(1.0), r["name"]
        assert 0 <= r["eval"]["hm"] <= 1
    for r in stored["runs"][2:5]:
        assert r["rl_steps_done"] == 2 and r["rl_steps_logged"] == 2
        assert 0 <= r["eval"]["lookalike/tv_to_ideal"] <= 1
    assert os.path.getsize(str(report) + ".png") > 10_000
    md = open(str(report) + ".md").read()
    assert "| warm start | warm start | 1 |" in md and "| ideal policy | - | 1 |" in md
    assert "## Perceivable images" in md and "| warm start, Best-of-4 | warm start | 1 |" in md
    # the compilation cache was written, and every run is now found finished
    assert os.listdir(out / "compile_cache")
    assert all(mini.load_result(run) is not None for run in mini.plan(str(out), quick=True))
