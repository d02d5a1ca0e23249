"""Evaluation end to end: the tiny model on mock TFDS data and the synthetic world; resuming an interrupted run
without asking the verifier twice; Best-of-N read back from the files; config checks; the two commands."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from speciarl_jax import evaluate, metrics, reports
from speciarl_jax.data.synthetic import SyntheticWorld
from speciarl_jax.rewards import categories as cat
from speciarl_jax.verifier import Taxonomy
from speciarl_jax.verifier.server import LoopbackVerifierServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_config(checkpoint, output_dir):
    config = evaluate.default_config()
    config.model.path = str(checkpoint)
    config.model.name = "tiny"
    config.model.dtype = "float32"
    config.mesh.enabled = False
    config.output_dir = str(output_dir)
    config.datasets = {
        "pets": {"kind": "benchmark", "name": "pets", "split": "test"},
        "synthetic": {"kind": "synthetic", "split": "test", "num_images": 5, "image_size": [56, 56]},
    }
    config.image.image_size = (56, 56)
    config.decoding.max_new_tokens = 6
    config.decoding.batch_size = 4
    config.data.read_threads = 0
    config.verifier.kind = "rule"
    config.bootstrap.samples = 200
    return config


def test_tiny_model_on_mock_tfds_and_synthetic_world(tiny_checkpoint, tmp_path):
    """The tiny model with the LoRA of a training checkpoint; the base folder comes from the checkpoint."""
    from test_export import adapted_model, save_training_checkpoint

    from speciarl_jax.models import lora

    model = adapted_model(tiny_checkpoint, config=lora.LoRAConfig(rank=2, alpha=4.0))
    save_training_checkpoint(model, tmp_path / "run", 4, tiny_checkpoint, {"rank": 2, "alpha": 4.0})
    out = tmp_path / "tiny"
    config = tiny_config(tiny_checkpoint, out)
    config.model.path = ""
    config.model.adapter = str(tmp_path / "run" / "checkpoints")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = evaluate.evaluate(config)
        pets_names = {n.replace("_", " ") for n in tfds.builder("oxford_iiit_pet").info.features["label"].names}
    for name in ("report.md", "metrics.csv", "report.json", "metrics.json", "categories.png",
                 "correctness_specificity.png", "run.json"):
        assert (out / name).stat().st_size > 0, name
    predictions = lines(out / "predictions.jsonl")
    assert len(predictions) == 11 and len(lines(out / "verdicts.jsonl")) == 11
    assert {p["dataset"] for p in predictions} == {"pets", "synthetic"}
    assert {p["label"] for p in predictions if p["dataset"] == "pets"} <= pets_names
    assert all(p["sample"] == 0 and 0 < p["tokens"] <= 6 for p in predictions)
    # A random tiny policy rarely writes <answer> tags; whatever it wrote is parsed and graded consistently.
    verdicts = {(v["dataset"], v["sample_id"]): v["category"] for v in lines(out / "verdicts.jsonl")}
    for p in predictions:
        if p["answer"] is None:
            assert verdicts[(p["dataset"], p["sample_id"])] == cat.PARSE_FAILURE
    assert [(r["dataset"], r["n"]) for r in rows] == [("pets", 6), ("synthetic", 5), ("overall", 11), ("mean", 11)]
    assert all(r["missing"] == 0 for r in rows)
    table = (out / "report.md").read_text()
    assert table.count("\n| tiny |") == 4 and "C [95% CI]" in table
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "correctness_low" in header and "share/parse failure" in header
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["timing"]["pets"]["generated"] == 6 and summary["samples_per_image"] == 1
    run = json.loads((out / "run.json").read_text())["fingerprint"]["model"]
    assert run["path"] == str(tiny_checkpoint) and run["adapter"] == str(tmp_path / "run" / "checkpoints" / "4")
    config.model.name = ""
    assert evaluate.model_name(config) == "run step 4"
    config.model.name = "tiny"
    # The adapter was applied: the base model alone answers the same images differently.
    base = tiny_config(tiny_checkpoint, tmp_path / "base")
    base.datasets = {"synthetic": config.datasets.synthetic.to_dict()}
    evaluate.evaluate(base)
    adapted = {p["sample_id"]: p["text"] for p in predictions if p["dataset"] == "synthetic"}
    plain = {p["sample_id"]: p["text"] for p in lines(tmp_path / "base" / "predictions.jsonl")}
    assert plain.keys() == adapted.keys() and sum(plain[k] != adapted[k] for k in plain) >= 3, (plain, adapted)

    # A second run finds everything done: nothing is generated (no model is even loaded) or graded again.
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        again = evaluate.evaluate(config)
    assert again == rows
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["timing"]["pets"]["generated"] == 0 and summary["verifier"]["asked"] == 0
    assert len(lines(out / "predictions.jsonl")) == 11


def simulated_config(output_dir, server_url, n=4, images=40):
    config = evaluate.default_config()
    config.model.kind = "simulated"
    config.model.simulated = dict(seed=1, exact=0.3, child=0.1, parent=0.2, root=0.1, abstain=0.1, wrong=0.15,
                                  unparsed=0.05)
    config.output_dir = str(output_dir)
    config.datasets = {
        "fine": {"kind": "synthetic", "split": "test", "num_images": images, "image_size": [28, 28]},
        "family": {"kind": "synthetic", "split": "test", "num_images": images // 2, "image_size": [28, 28],
                   "label_level": "family"},
    }
    config.decoding.mode = "best_of_n"
    config.decoding.n = n
    config.decoding.batch_size = 8
    config.verifier.kind = "openai"
    config.verifier.base_url = server_url
    config.verifier.model = "loopback"
    config.verifier.concurrency = 4
    config.bootstrap.samples = 100
    return config


@pytest.fixture(scope="module")
def server():
    with LoopbackVerifierServer(Taxonomy.from_dict(SyntheticWorld().taxonomy())) as running:
        yield running


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_never_asks_twice(server, tmp_path, monkeypatch):
    # Reference: one uninterrupted run.
    start = server.requests
    whole = evaluate.evaluate(simulated_config(tmp_path / "whole", server.url))
    asked_whole = server.requests - start
    assert asked_whole > 0

    # The same run, stopped after three batches, with a torn line at the end of each file.
    out = tmp_path / "resumed"
    original = evaluate.SimulatedPredictor.batches

    def stop_after_three(self, *args, **kwargs):
        for i, batch in enumerate(original(self, *args, **kwargs)):
            if i == 3:
                raise Interrupt
            yield batch

    monkeypatch.setattr(evaluate.SimulatedPredictor, "batches", stop_after_three)
    start = server.requests
    with pytest.raises(Interrupt):
        evaluate.evaluate(simulated_config(out, server.url))
    monkeypatch.setattr(evaluate.SimulatedPredictor, "batches", original)
    first = server.requests - start
    # Data sets run in name order: "family" (20 images) completes, "fine" stops after three batches of 8.
    assert len(lines(out / "predictions.jsonl")) == 20 * 4 + 3 * 8 * 4
    for name in ("predictions.jsonl", "verdicts.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"dataset": "fine", "sample_id": "synth')

    start = server.requests
    resumed = evaluate.evaluate(simulated_config(out, server.url))
    second = server.requests - start
    assert first + second == asked_whole  # every distinct pair was asked exactly once over the two runs
    assert resumed == whole
    predictions = lines(out / "predictions.jsonl")
    assert len(predictions) == (40 + 20) * 4
    assert len({(p["dataset"], p["sample_id"], p["sample"]) for p in predictions}) == len(predictions)

    # Without a rerun the LLM is not asked at all, even with the SQLite cache gone.
    os.remove(out / "verifier_cache.sqlite")
    start = server.requests
    assert evaluate.evaluate(simulated_config(out, server.url)) == whole
    assert server.requests == start


def test_best_of_n_rows_follow_from_the_stored_verdicts(server, tmp_path):
    out = tmp_path / "bon"
    rows = evaluate.evaluate(simulated_config(out, server.url, n=3, images=24))
    per_image = {}
    for v in lines(out / "verdicts.jsonl"):
        per_image.setdefault((v["dataset"], v["sample_id"]), {})[v["sample"]] = v["category"]
    fine = [[d[k] for k in range(3)] for (ds, _), d in sorted(per_image.items()) if ds == "fine"]
    expected = metrics.summarize(metrics.select(fine, "best"), bootstrap=0)
    row = next(r for r in rows if r["selection"] == "best-of-3" and r["dataset"] == "fine")
    assert row["n"] == 24 and row["correctness"] == pytest.approx(expected.correctness)
    assert row["specificity"] == pytest.approx(expected.specificity) and row["hm"] == pytest.approx(expected.hm)
    pooled = next(r for r in rows if r["selection"] == "per-sample" and r["dataset"] == "fine")
    assert pooled["n"] == 72 and "correctness_low" not in pooled
    assert pooled["correctness"] <= row["correctness"]  # the best of three is never worse than their average
    assert {r["selection"] for r in rows} == {"best-of-3", "per-sample"}
    # Family-level labels leave room for finer answers: the simulated "child" answers are graded more specific.
    assert any(r["share/more specific"] > 0 for r in rows if r["dataset"] == "family")


def test_a_rerun_with_other_settings_is_refused(server, tmp_path):
    config = simulated_config(tmp_path / "run", server.url, n=2, images=8)
    evaluate.evaluate(config)
    config.decoding.temperature = 1.0
    with pytest.raises(ValueError, match=r"decoding differ"):
        evaluate.evaluate(config)
    config = simulated_config(tmp_path / "run", server.url, n=2, images=8)
    config.datasets.family.label_level = "fine"
    with pytest.raises(ValueError, match=r"datasets.family differ"):
        evaluate.evaluate(config)
    # Resizing a data set or adding one is fine: the answers of the images both runs share are kept.
    config = simulated_config(tmp_path / "run", server.url, n=2, images=16)
    config.datasets.extra = {"kind": "synthetic", "split": "val", "num_images": 4, "image_size": [28, 28]}
    rows = evaluate.evaluate(config)
    assert {r["dataset"] for r in rows} >= {"fine", "family", "extra"}


def test_config_errors_name_the_key(tmp_path):
    config = evaluate.default_config()
    with pytest.raises(ValueError, match="config.model.path"):
        evaluate.validate(config)
    config.model.path = "x"
    with pytest.raises(ValueError, match="config.datasets is empty"):
        evaluate.validate(config)
    config.datasets = {"a": {"kind": "synthetic"}}
    config.decoding.mode = "beam"
    with pytest.raises(ValueError, match="config.decoding.mode"):
        evaluate.validate(config)
    config.decoding.mode = "best_of_n"
    config.decoding.temperature = 0.0
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate.validate(config)
    config.decoding.temperature = 0.6
    config.only = "a,b"
    with pytest.raises(ValueError, match=r"config.only names \['b'\]"):
        evaluate.selected_datasets(config)
    config.model.kind = "simulated"
    config.model.simulated = {"exact": 1.0, "brilliant": 1.0}
    with pytest.raises(ValueError, match="unknown answer kinds"):
        evaluate.SimulatedPredictor(config)
    config.verifier.kind = "rule"
    config.datasets = {"manifest": {"kind": "synthetic"}}
    with pytest.raises(ValueError, match="rule verifier needs a taxonomy"):
        evaluate.rule_taxonomy(config, {"m": type("Plain", (), {"name": "m"})()})
    log = evaluate.JsonlLog(str(tmp_path / "x.jsonl"))
    (tmp_path / "x.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 is not valid JSON"):
        log.read()


def test_simulated_answers_follow_the_taxonomy():
    config = evaluate.default_config()
    config.model.kind = "simulated"
    taxonomy = Taxonomy.from_dict(SyntheticWorld().taxonomy())
    for kind, expected in [("exact", "striped circle"), ("parent", "circle"), ("root", "shape"), ("abstain", "None")]:
        config.model.simulated = {kind: 1.0}
        predictor = evaluate.SimulatedPredictor(config, taxonomy)
        assert predictor.answer("striped circle", ["plain star"], "k", 0) == (
            f"<think>Looking at the image.</think> <answer>{expected}</answer>")
    config.model.simulated = {"wrong": 1.0}
    assert "plain star" in evaluate.SimulatedPredictor(config, taxonomy).answer("striped circle", ["plain star"], "k", 0)
    config.model.simulated = {"unparsed": 1.0}
    assert "<answer>" not in evaluate.SimulatedPredictor(config).answer("striped circle", [], "k", 0)
    config.model.simulated = {"parent": 1.0, "seed": 3}
    assert "<answer>pit bull</answer>" in evaluate.SimulatedPredictor(config).answer("american pit bull", [], "k", 0)


def test_commands(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = []
    for name, exact in (("weak", 0.2), ("strong", 0.7)):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "speciarl_jax.evaluate", "--config=configs/eval_synthetic.py:simulated",
               f"--config.output_dir={out}", "--config.datasets.synthetic.num_images=30",
               "--config.datasets.synthetic_family.num_images=20", f"--config.model.simulated.exact={exact}",
               f"--config.model.name={name}", "--config.bootstrap.samples=100"]
        if name == "strong":  # any key of a data set's source kind can be set, not only those the file sets
            cmd.append("--config.datasets.synthetic.variation=0.5")
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"| {name} |" in done.stdout
        runs.append(str(out))
    saved = [json.loads((tmp_path / name / "run.json").read_text())["datasets"]["synthetic"] for name in ("weak", "strong")]
    assert "variation" not in saved[0] and saved[1]["variation"] == 0.5
    # Nothing named, or a folder that is no run: the message says what to give, without a traceback.
    for extra, message in (([], "nothing to evaluate: name a training run"),
                           ([f"--run={tmp_path}"], "is not a training run")):
        done = subprocess.run([sys.executable, "-m", "speciarl_jax.evaluate", *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=env)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    cmd = [sys.executable, "-m", "speciarl_jax.reports", f"--runs={','.join(runs)}", f"--out={tmp_path / 'both'}",
           "--connect"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "both" / "report.md").read_text()
    assert "| weak | synthetic |" in table and "| strong | overall |" in table
    assert (tmp_path / "both" / "correctness_specificity.png").stat().st_size > 0
    rows = reports.load_rows(runs[1])
    assert np.isfinite(rows[0]["correctness"])


@pytest.mark.parametrize("name", ["eval_benchmarks", "eval_best_of_n", "eval_synthetic"])
def test_config_files_are_valid(name):
    import importlib

    config = importlib.import_module(f"speciarl_jax.configs.{name}").get_config()
    config.model.path = config.model.path or "/models/qwen"
    evaluate.validate(config)
    assert evaluate.selected_datasets(config)
    if name == "eval_best_of_n":
        assert (config.decoding.n, config.decoding.temperature, config.decoding.top_p) == (64, 0.6, 0.95)
    if name == "eval_benchmarks":
        assert list(evaluate.selected_datasets(config)) == ["cub", "aircraft", "flowers", "food", "pets", "cars"]
