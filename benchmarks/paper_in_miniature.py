"""The paper's experiment in miniature, in a world where the ideal answer is known: does the SpeciaRL reward
make a model answer finely where it can see the fine class and stay at the family where it cannot, while static
rewards push guesses everywhere? On CPU, in one command.

    python benchmarks/paper_in_miniature.py            # the full comparison (under an hour on 2 CPU cores)
    python benchmarks/paper_in_miniature.py --quick    # the whole pipeline in a few minutes (smoke test)
    python benchmarks/paper_in_miniature.py --report_only   # rebuild the tables and plot from finished runs

The world (`configs/miniature.py`): the demo's synthetic shapes with look-alike sets, fine classes of one family
drawn identically, so that half of the images show their fine class ("perceivable") and half do not
("look-alike"). The ideal policy answers the fine class of a perceivable image and the family of a look-alike
one: C = 1, and its S follows from the share of perceivable images.

What it runs, every run through `speciarl_jax.trainer.Trainer`:
  1. the warm start, once, in two phases: SFT on the fine labels (to see) -> <out>/warm_fine/sft_model, then
     SFT at the demo's mixed answer levels (to answer as LMMs do) -> <out>/warm/sft_model; Best-of-64 on the
     warm start (the paper's premise analysis: what the model can find when asked 64 times);
  2. RL from the warm start with (a) the SpeciaRL best-prediction reward, (b) the static binary reward3 and (c)
     the static scala1 table, each with GRPO, Dr.GRPO and DAPO, each with seeds 0, 1, 2;
  3. (d) plain SFT on the fine labels from the warm start, for as many trained rows as an RL run has rollouts,
     seeds 0, 1, 2.
Every run is evaluated with greedy decoding and the rule verifier on the same held-out images
(`Trainer.evaluate`), on all of them and on each subset, and compared with the ideal policy (the total
variation distance between its category shares and the ideal's, per subset). A seed sets `config.seed` (the
sampling RNG, SFT's answer levels and data order) and `data.seed` (the order of the RL prompts).

Every run has its own folder under <out>/runs/; its `result.json` marks it done, so a killed script is
restarted with the same command and skips finished runs (an unfinished RL run resumes from its checkpoint).
A finished run whose stored config differs from the one the script would build now stops the script: start a
fresh --out after changing configs/miniature.py or configs/demo.py.

The runs share JAX's persistent compilation cache (<out>/compile_cache): programs compiled by one run are
read back by the next instead of being compiled again.

Output: <report>.md (tables of category shares, C, S, HM and both specificity definitions, mean +- 95%
t-interval across seeds, per method x optimizer, on all images and per subset, against the ideal; wall
times), <report>.png (correctness against specificity) and <report>.json (every run's numbers and the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from speciarl_jax.configs import miniature  # noqa: E402
from speciarl_jax import reports  # noqa: E402
from speciarl_jax.rewards import categories as cat  # noqa: E402

# Reward methods of the comparison: label -> reward config.
METHODS = {
    "speciarl": dict(kind="speciarl", mode="all"),
    "reward3": dict(kind="static", table="reward3"),
    "scala1": dict(kind="static", table="scala1"),
}
METHOD_LABELS = {"speciarl": "SpeciaRL (best prediction)", "reward3": "static reward3 (binary)",
                 "scala1": "static scala1", "sft": "SFT on fine labels", "warm": "warm start",
                 "warm_fine": "warm start, phase 1", "best_of": "warm start, Best-of-N", "ideal": "ideal policy"}
OPTIMIZERS = ("grpo", "drgrpo", "dapo")
OPTIMIZER_LABELS = {"grpo": "GRPO", "drgrpo": "Dr.GRPO", "dapo": "DAPO", "sft": "SFT", "warm": "warm start",
                    "ideal": "-"}
SUBSETS = ("perceivable", "lookalike")
SUBSET_LABELS = {"perceivable": "perceivable images (the fine class can be seen)",
                 "lookalike": "look-alike images (only the family can be seen)"}
# Table columns: the categories in the paper's order, then answers that could not be parsed.
SHARE_COLUMNS = (cat.SPECIFIC, cat.MORE_SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.WRONG, cat.ABSTAIN,
                 cat.PARSE_FAILURE)
# S among correct answers and S_all among all answers, each with its HM (the paper's formulas are not public).
METRICS = ("correctness", "specificity", "hm", "specificity_all", "hm_all")
METRIC_LABELS = {"correctness": "C", "specificity": "S", "hm": "HM", "specificity_all": "S_all", "hm_all": "HM_all"}

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (t_{0.975, df}); above 30, 1.96.
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.04523, 2.042272)

# --quick: the whole pipeline at smoke-test size.
QUICK = dict(rl_steps=2, batch_size=4, num_samples=4, mini_batch_size=16, eval_images=16, eval_batch=16,
             warm_fine_steps=8, warm_mixed_steps=4, best_of=4, seeds=(0,), optimizers=("grpo",))


# ---------------------------------------------------------------------------------------------------------------
# Plan: one config per run


@dataclasses.dataclass
class Run:
    name: str  # folder under <out>/runs (the warm start: <out>/warm)
    method: str  # speciarl | reward3 | scala1 | sft | warm
    optimizer: str  # grpo | drgrpo | dapo | sft | warm
    seed: int
    config: object  # ml_collections.ConfigDict
    best_of: int = 0  # > 0: also evaluate the Best-of-N of this run's policy (the warm start)

    @property
    def run_dir(self) -> str:
        return self.config.run_dir


def base_config(quick: bool = False):
    """configs/miniature.py, shrunk further for --quick."""
    c = miniature.get_config()
    c.compilation_cache_dir = ""  # the script's own cache (<out>/compile_cache) serves every run
    if quick:
        q = QUICK
        c.steps = q["rl_steps"]
        c.checkpoint_every = q["rl_steps"]
        c.data.batch_size = q["batch_size"]
        c.rollout.num_samples = q["num_samples"]
        c.rl.mini_batch_size = q["mini_batch_size"]
        c.eval.source.num_images = q["eval_images"]
        c.eval.batch_size = q["eval_batch"]
    return c


def warm_configs(base, out: str, quick: bool = False):
    """The warm start's two phases, SFT only: fine labels -> <out>/warm_fine, then the demo's mixed answer levels
    from there -> <out>/warm. World and evaluation come from `base`, so changing the RL knobs of
    configs/miniature.py leaves a finished warm start valid."""
    from speciarl_jax.configs.demo import get_config as demo_config

    steps = (QUICK["warm_fine_steps"], QUICK["warm_mixed_steps"]) if quick else (miniature.WARM_FINE_STEPS,
                                                                              miniature.WARM_MIXED_STEPS)
    fine = demo_config()
    fine.data.source = base.data.source.copy_and_resolve_references()
    fine.eval = base.eval.copy_and_resolve_references()
    fine.name, fine.run_dir, fine.compilation_cache_dir = "miniature_warm_fine", os.path.join(out, "warm_fine"), ""
    fine.steps = fine.epochs = 0
    fine.sft.steps, fine.sft.levels = steps[0], (1.0, 0.0, 0.0)
    mixed = _from_warm_start(fine, os.path.join(fine.run_dir, "sft_model"), 0, os.path.join(out, "warm"))
    mixed.name = "miniature_warm"
    mixed.sft.steps, mixed.sft.levels = steps[1], demo_config().sft.levels
    mixed.sft.learning_rate = miniature.WARM_MIXED_LEARNING_RATE
    mixed.sft.warmup_steps = min(mixed.sft.warmup_steps, steps[1] - 1)
    return fine, mixed


def _from_warm_start(base, warm_model: str, seed: int, run_dir: str):
    """A copy of `base` that starts from the warm-start folder, in its own run folder, with this seed."""
    c = base.copy_and_resolve_references()
    c.name = os.path.basename(run_dir)
    c.run_dir = run_dir
    c.seed = seed
    c.data.seed = seed
    c.model.tiny = False
    c.model.path = warm_model
    return c


def rl_config(base, warm_model: str, method: str, optimizer: str, seed: int, run_dir: str):
    c = _from_warm_start(base, warm_model, seed, run_dir)
    c.sft.enabled = False
    c.reward.update(METHODS[method])
    c.rl.algorithm = optimizer
    if optimizer == "dapo":
        c.rl.overlong_buffer = miniature.OVERLONG_BUFFER
        c.rl.max_generation_batches = miniature.MAX_GENERATION_BATCHES
    return c


def sft_config(base, warm_model: str, seed: int, run_dir: str):
    """Plain SFT on the fine labels from the warm start, no RL: as many trained rows as an RL run's rollouts."""
    c = _from_warm_start(base, warm_model, seed, run_dir)
    c.steps = 0
    c.epochs = 0
    c.sft.enabled = True
    c.sft.levels = (1.0, 0.0, 0.0)
    c.sft.batch_size = miniature.SFT_BATCH_SIZE
    c.sft.steps = miniature.sft_baseline_steps(base.steps, base.data.batch_size, base.rollout.num_samples,
                                               miniature.SFT_BATCH_SIZE)
    c.sft.learning_rate = miniature.SFT_LEARNING_RATE
    c.sft.warmup_steps = min(miniature.SFT_WARMUP_STEPS, c.sft.steps - 1)
    return c


def plan(out: str, *, quick: bool = False, seeds=None, optimizers=None, methods=None,
         sft_baseline: bool = True) -> list[Run]:
    """Every run of the comparison, the warm start first."""
    out = os.path.abspath(out)
    base = base_config(quick)
    seeds = tuple(seeds if seeds is not None else (QUICK["seeds"] if quick else miniature.SEEDS))
    optimizers = tuple(optimizers or (QUICK["optimizers"] if quick else OPTIMIZERS))
    methods = tuple(methods or METHODS)
    fine, warm = warm_configs(base, out, quick)
    best_of = QUICK["best_of"] if quick else miniature.BEST_OF
    runs = [Run("warm_fine", "warm_fine", "warm", 0, fine), Run("warm", "warm", "warm", 0, warm, best_of)]
    warm_model = os.path.join(warm.run_dir, "sft_model")
    for method in methods:
        for optimizer in optimizers:
            for seed in seeds:
                name = f"{method}_{optimizer}_seed{seed}"
                runs.append(Run(name, method, optimizer, seed,
                                rl_config(base, warm_model, method, optimizer, seed, os.path.join(out, "runs", name))))
    if sft_baseline:
        for seed in seeds:
            name = f"sft_seed{seed}"
            runs.append(Run(name, "sft", "sft", seed, sft_config(base, warm_model, seed, os.path.join(out, "runs", name))))
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Execution


def enable_compilation_cache(folder: str) -> None:
    """JAX's persistent compilation cache in `folder`, for every program however fast it compiles."""
    import jax

    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def config_record(config) -> dict:
    return json.loads(config.to_json_best_effort())


def result_path(run: Run) -> str:
    return os.path.join(run.run_dir, "result.json")


def load_result(run: Run) -> dict | None:
    """The stored result of a finished run, or None; a result made with another config raises."""
    path = result_path(run)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    stored, wanted = result.get("config"), config_record(run.config)
    if stored != wanted:
        changed = sorted(_diff(stored or {}, wanted))
        raise RuntimeError(f"{path} was made with another config (differs in {', '.join(changed[:8])}); "
                           "use a fresh --out, or delete that run folder to redo it.")
    return result


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out |= _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.add(prefix + k)
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_times(run_dir: str) -> dict:
    """Seconds of the first RL step (compilation included) and the median of the later ones, from metrics.jsonl;
    DAPO's generation batches per step."""
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "reward_mean" in r]
    totals = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows]
    out = {"rl_steps_logged": len(rows)}
    if totals:
        out["first_step_s"] = totals[0]
        out["later_step_s"] = float(np.median(totals[1:])) if len(totals) > 1 else math.nan
        out["train_reward_first"] = rows[0]["reward_mean"]
        out["train_reward_last"] = rows[-1]["reward_mean"]
    batches = [r["dapo/generation_batches"] for r in rows if "dapo/generation_batches" in r]
    if batches:
        out["dapo_generation_batches_mean"] = float(np.mean(batches))
        out["dapo_dropped_groups"] = int(sum(r["dapo/dropped_groups"] for r in rows))
        out["dapo_generated_groups"] = int(sum(r["dapo/generated_groups"] for r in rows))
    return out


def execute(run: Run) -> dict:
    """Train one run through the real Trainer, evaluate it on the held-out images, store and return its result.

    Training runs with evaluation switched off; `Trainer.evaluate` then runs once on the final policy (the
    evaluation before RL would re-measure the warm start in every run)."""
    from speciarl_jax.rl.dapo import DynamicSamplingError
    from speciarl_jax.trainer import Trainer

    config = run.config.copy_and_resolve_references()
    config.eval.enabled = False
    start = time.perf_counter()
    trainer = Trainer(config)
    built = time.perf_counter()
    stopped = ""
    try:
        trainer.run()
    except DynamicSamplingError as err:  # DAPO could not gather enough informative groups: evaluate as it stands
        stopped = f"dynamic sampling gave up after step {trainer.step}: {err}"
        print(f"[{run.name}] {stopped}", flush=True)
    trained = time.perf_counter()
    trainer.config.eval.enabled = True
    subsets, ideal = subset_of(config), ideal_report(config)
    metrics = with_distance_to_ideal(trainer.evaluate(prefix="", subsets=subsets), ideal)
    extra = {}
    if run.best_of:  # the paper's premise analysis: what the warm start finds when asked N times
        extra["best_of"] = with_distance_to_ideal(trainer.evaluate(prefix="", subsets=subsets, best_of=run.best_of),
                                                  ideal)
        extra["best_of_n"] = run.best_of
        extra["ideal"] = ideal
    done = time.perf_counter()
    result = {
        "name": run.name, "method": run.method, "optimizer": run.optimizer, "seed": run.seed,
        "eval": metrics, **extra, "rl_steps_done": trainer.step, "stopped": stopped,
        "wall_s": done - start, "build_s": built - start, "train_s": trained - built, "eval_s": done - trained,
        **step_times(run.run_dir), "config": config_record(run.config),
    }
    trainer.writer.close()
    del trainer
    gc.collect()
    tmp = result_path(run) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, result_path(run))
    return result


def _world(config):
    from speciarl_jax.data.config import WORLD_FIELDS
    from speciarl_jax.data.synthetic import SyntheticWorld

    source = config.eval.source.to_dict()
    return SyntheticWorld(**{k: source[k] for k in WORLD_FIELDS if k in source})


def subset_of(config):
    """label -> "perceivable" or "lookalike", in the held-out world of `config`."""
    world = _world(config)
    return lambda label: "lookalike" if world.is_lookalike(label) else "perceivable"


def ideal_report(config) -> dict:
    """The ideal policy's report on the held-out images: the fine class where it can be seen, the family where
    it cannot (graded "specific" and "less specific")."""
    from speciarl_jax.metrics import batch_report

    world, n = _world(config), int(config.eval.source.num_images)
    labels = [world.label(world.class_id(config.eval.source.split, i)) for i in range(n)]
    subsets = subset_of(config)
    verdict = {"perceivable": cat.SPECIFIC, "lookalike": cat.LESS_SPECIFIC}
    categories = [verdict[subsets(label)] for label in labels]
    report = batch_report(categories)
    for name in SUBSETS:
        chosen = [c for c, label in zip(categories, labels) if subsets(label) == name]
        report.update(batch_report(chosen, f"{name}/"))
        report[f"{name}/images"] = len(chosen)
    return report


def with_distance_to_ideal(report: dict, ideal: dict) -> dict:
    """`report` plus, for all images and each subset, the total variation distance between its category shares
    and the ideal policy's (0: answers exactly as the ideal; 1: no category in common)."""
    out = dict(report)
    for prefix in ("",) + tuple(f"{name}/" for name in SUBSETS):
        out[f"{prefix}tv_to_ideal"] = 0.5 * sum(abs(report.get(f"{prefix}share/{c}", 0.0)
                                                    - ideal.get(f"{prefix}share/{c}", 0.0)) for c in SHARE_COLUMNS)
    return out


def run_all(runs: list[Run], *, log=print) -> list[dict]:
    results = []
    for index, run in enumerate(runs):
        result = load_result(run)
        if result is None:
            log(f"[{index + 1}/{len(runs)}] {run.name}: running")
            result = execute(run)
            log(f"[{index + 1}/{len(runs)}] {run.name}: {result['wall_s']:.0f} s, HM {result['eval']['hm']:.3f}")
        else:
            log(f"[{index + 1}/{len(runs)}] {run.name}: done earlier ({result['wall_s']:.0f} s), skipped")
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and report


def t_interval(values) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (low, high) of independent values; one value gives a NaN interval."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    df = len(x) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.959964) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (method, optimizer), RL rows first, then SFT, the warm start (both phases), its Best-of-N and
    the ideal policy: the mean and t-interval across seeds of every number of the evaluation (shares, C, S, HM,
    per subset, distance to the ideal), in the row format of `speciarl_jax.reports` (model = method,
    dataset = optimizer, <key>_low / <key>_high = the interval)."""
    order = [(m, o) for m in METHODS for o in OPTIMIZERS] + [("sft", "sft"), ("warm_fine", "warm"), ("warm", "warm"),
                                                             ("best_of", "warm"), ("ideal", "ideal")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["optimizer"]), []).append(r)
        if "best_of" in r:
            groups.setdefault(("best_of", "warm"), []).append(dict(r, eval=r["best_of"]))
        if "ideal" in r:
            ideal = with_distance_to_ideal(r["ideal"], r["ideal"])  # 0 by definition, shown in its column
            groups.setdefault(("ideal", "ideal"), []).append(dict(r, eval=ideal, wall_s=0.0))
    rows = []
    for key in sorted(groups, key=lambda k: order.index(k) if k in order else len(order)):
        members = sorted(groups[key], key=lambda r: r["seed"])
        label = METHOD_LABELS.get(key[0], key[0])
        if key[0] == "best_of":
            label = label.replace("N", str(members[0].get("best_of_n", "N")))
        row = {"model": label, "selection": "best-of-n" if key[0] == "best_of" else "greedy",
               "dataset": OPTIMIZER_LABELS.get(key[1], key[1]), "method": key[0], "optimizer": key[1],
               "seeds": [r["seed"] for r in members], "n": len(members),
               "wall_s_mean": float(np.mean([r["wall_s"] for r in members])),
               "stopped_runs": sum(bool(r.get("stopped")) for r in members)}
        keys = {k for r in members for k, v in r["eval"].items() if isinstance(v, (int, float))}
        for metric in sorted(keys | set(f"share/{c}" for c in SHARE_COLUMNS)):
            mean, low, high = t_interval([r["eval"].get(metric, 0.0 if "share/" in metric else math.nan)
                                          for r in members])
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = mean, low, high
        batches = [r["dapo_generation_batches_mean"] for r in members if "dapo_generation_batches_mean" in r]
        if batches:
            row["dapo_generation_batches_mean"] = float(np.mean(batches))
        rows.append(row)
    return rows


def _pm(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    value, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if value is None or math.isnan(value):
        return "-"
    text = f"{scale * value:.{digits}f}"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} ± {scale * (high - value):.{digits}f}"


def markdown_table(rows: list[dict], prefix: str = "") -> str:
    """The paper-style table over the images `prefix` names ("" all, "perceivable/", "lookalike/"): shares in %,
    C / S / HM (S among correct answers, S_all among all), and the distance to the ideal policy, each mean ±
    half-width of the 95% t-interval across seeds (a single model has no interval)."""
    head = ["method", "optimizer", "seeds"] + [f"{reports.SHORT[c]} %" for c in SHARE_COLUMNS]
    head += [METRIC_LABELS[m] for m in METRICS] + ["TV to ideal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * (len(head) - 3)) + "|"]
    for r in rows:
        cells = [r["model"], r["dataset"], str(r["n"])]
        cells += [_pm(r, f"{prefix}share/{c}", 100, 1) for c in SHARE_COLUMNS]
        cells += [_pm(r, f"{prefix}{m}") for m in METRICS] + [_pm(r, f"{prefix}tv_to_ideal")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def timing_table(results: list[dict]) -> str:
    lines = ["| run | wall | build | train | eval | first RL step | later RL steps (median) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        first, later = r.get("first_step_s"), r.get("later_step_s")
        lines.append(f"| {r['name']} | {r['wall_s']:.0f} s | {r['build_s']:.0f} s | {r['train_s']:.0f} s | "
                     f"{r['eval_s']:.0f} s | {'-' if first is None else f'{first:.1f} s'} | "
                     f"{'-' if later is None or math.isnan(later) else f'{later:.2f} s'} |")
    return "\n".join(lines) + "\n"


def ranking_lines(rows: list[dict], key: str = "hm", reverse: bool = True) -> list[str]:
    """Per optimizer, the methods by mean `key` (computed from the table, no judgement)."""
    out = []
    for optimizer in OPTIMIZERS:
        members = sorted((r for r in rows if r["optimizer"] == optimizer and key in r),
                         key=lambda r: -r[key] if reverse else r[key])
        if members:
            out.append(f"- {OPTIMIZER_LABELS[optimizer]}: " + (" > " if reverse else " < ").join(
                f"{r['method']} {r[key]:.3f}" for r in members))
    return out


def write_report(results: list[dict], report: str, *, settings: dict, wall_s: float | None = None) -> dict:
    """<report>.md, <report>.png and <report>.json from the runs' results; returns the aggregated rows."""
    rows = aggregate(results)
    folder = os.path.dirname(os.path.abspath(report))
    os.makedirs(folder, exist_ok=True)
    plot = report + ".png"
    reports.plot_correctness_specificity(
        rows, plot, title="held-out correctness vs specificity: mean and 95% t-interval across seeds\n"
                          "colour = reward (or SFT / warm start), marker = optimizer")
    total = sum(r["wall_s"] for r in results)
    rl = [r["wall_s"] for r in results if r["method"] in METHODS]
    eval_images = settings["eval_images"]
    lines = [
        "# The paper in miniature",
        "",
        "Generated by `benchmarks/paper_in_miniature.py`"
        + (" --quick (smoke-test sizes: the numbers mean nothing)" if settings.get("quick") else "") + ".",
        f"World: the demo's shapes with look-alike sets ({settings['lookalike_classes']} of 30 fine classes drawn "
        "identically within their set). "
        f"Warm start: SFT on the fine labels ({settings['warm_fine_steps']} steps), then at the answer levels "
        f"label/family/generic {settings['warm_sft_levels']} ({settings['warm_mixed_steps']} steps); "
        f"RL: {settings['rl_steps']} steps x {settings['batch_size']} prompts x "
        f"{settings['num_samples']} rollouts; "
        + (f"SFT baseline: {settings['sft_steps']} steps x {settings['sft_batch_size']} fine labels; "
           if settings.get("sft_steps") else "")
        + "evaluation: greedy decoding, rule verifier, the same "
        f"{eval_images} held-out images for every run.",
        "",
        "Shares in % of the held-out answers; C = correctness, S = specificity, HM = their harmonic mean. Each cell "
        "is the mean ± the half-width of the 95% Student-t interval across seeds (the warm start is a single "
        f"model). For scale, one run's image-sampling noise on {eval_images} images is about "
        f"±{1.96 * math.sqrt(0.25 / eval_images):.3f} for a share near 0.5.",
        "The ideal policy answers the fine class of every perceivable image and the family of every look-alike "
        "one; TV to ideal is the total variation distance between a run's category shares and the ideal's (0: "
        "the ideal's answers; 1: nothing in common). The Best-of-N row keeps, per image, the best of N sampled "
        "answers of the warm start.",
        "",
        "## All held-out images",
        "",
        markdown_table(rows),
        "Mean HM per optimizer, highest first:",
        "",
        *ranking_lines(rows),
        "",
    ]
    for name in SUBSETS:
        count = next((r.get(f"{name}/images") for r in rows if r.get(f"{name}/images")), None)
        lines += [f"## {SUBSET_LABELS[name][0].upper()}{SUBSET_LABELS[name][1:]}"
                  + (f": {count:.0f} images" if count else ""), "", markdown_table(rows, f"{name}/"),
                  "Distance to the ideal per optimizer, closest first:", "",
                  *ranking_lines(rows, f"{name}/tv_to_ideal", reverse=False), ""]
    stopped = [r for r in results if r.get("stopped")]
    if stopped:
        lines += ["Runs stopped early (evaluated as they stood):", ""]
        lines += [f"- {r['name']}: {r['stopped'][:200]}" for r in stopped] + [""]
    dapo = [r for r in rows if "dapo_generation_batches_mean" in r]
    if dapo:
        lines += ["DAPO dynamic sampling, generation batches per step (mean): " + ", ".join(
            f"{r['method']} {r['dapo_generation_batches_mean']:.2f}" for r in dapo), ""]
    lines += [
        f"![correctness against specificity]({os.path.basename(plot)})",
        "",
        "## Wall time",
        "",
        f"{len(results)} runs, {_minutes(total)} of run time in all"
        + (f"; this invocation took {_minutes(wall_s)}" if wall_s is not None else "")
        + (f"; an RL run took {np.mean(rl):.0f} s on average (min {min(rl):.0f}, max {max(rl):.0f})" if rl else "")
        + ". First RL step = compilation (or compilation-cache reads) included.",
        "",
        timing_table(results),
    ]
    with open(report + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    slim = [{k: v for k, v in r.items() if k != "config"} for r in results]
    with open(report + ".json", "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "rows": [{k: reports._clean(v) for k, v in r.items()} for r in rows],
                   "runs": slim}, f, indent=2)
    return {"rows": rows, "md": report + ".md", "png": plot, "json": report + ".json"}


def settings_of(runs: list[Run], quick: bool) -> dict:
    fine, warm = runs[0].config, runs[1].config
    rl = next((r.config for r in runs if r.method in METHODS), warm)
    sft = next((r.config for r in runs if r.method == "sft"), None)
    return {"quick": quick, "warm_fine_steps": fine.sft.steps, "warm_mixed_steps": warm.sft.steps,
            "warm_sft_levels": list(warm.sft.levels), "best_of": runs[1].best_of,
            "lookalike_classes": sum(len(g) for g in miniature.LOOKALIKES),
            "rl_steps": rl.steps, "batch_size": rl.data.batch_size, "num_samples": rl.rollout.num_samples,
            "eval_images": warm.eval.source.num_images, "sft_steps": sft.sft.steps if sft else 0,
            "sft_batch_size": sft.sft.batch_size if sft else 0,
            "max_generation_batches": miniature.MAX_GENERATION_BATCHES, "overlong_buffer": miniature.OVERLONG_BUFFER}


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: 1 seed, 2 RL steps, GRPO only")
    parser.add_argument("--out", default="", help="folder of the runs (default benchmarks/results/miniature, "
                                                  "or benchmarks/results/miniature_quick with --quick)")
    parser.add_argument("--report", default="", help="path prefix of the .md/.png/.json report (default "
                                                     "benchmarks/results/paper_in_miniature, or <out>/paper_in_miniature with --quick)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default configs/miniature.py SEEDS)")
    parser.add_argument("--optimizers", default="", help="comma-separated subset of grpo,drgrpo,dapo")
    parser.add_argument("--methods", default="", help="comma-separated subset of speciarl,reward3,scala1")
    parser.add_argument("--no_sft_baseline", action="store_true", help="skip the SFT-on-fine-labels runs")
    parser.add_argument("--compile_cache", default="", help="persistent compilation cache folder (default "
                                                            "<out>/compile_cache; 'none' disables it)")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)

    from absl import flags, logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    logging.set_verbosity(logging.WARNING)
    results_dir = os.path.join(REPO, "benchmarks", "results")
    out = os.path.abspath(args.out or os.path.join(results_dir, "miniature_quick" if args.quick else "miniature"))
    report = args.report or (os.path.join(out, "paper_in_miniature") if args.quick
                             else os.path.join(results_dir, "paper_in_miniature"))
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    runs = plan(out, quick=args.quick, seeds=[int(s) for s in split(args.seeds)] or None,
                optimizers=split(args.optimizers) or None, methods=split(args.methods) or None,
                sft_baseline=not args.no_sft_baseline)
    for name in split(args.optimizers):
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    for name in split(args.methods):
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {tuple(METHODS)}")

    start = time.perf_counter()
    if args.report_only:
        results = [r for r in (load_result(run) for run in runs) if r is not None]
        if not results:
            raise SystemExit(f"no finished runs under {out}")
    else:
        if args.compile_cache != "none":
            enable_compilation_cache(args.compile_cache or os.path.join(out, "compile_cache"))
        results = run_all(runs)
    wall = time.perf_counter() - start
    paths = write_report(results, report, settings=settings_of(runs, args.quick),
                         wall_s=None if args.report_only else wall)
    print(markdown_table(paths["rows"]))
    print(f"wall time {wall:.0f} s; report: {paths['md']}, {paths['png']}, {paths['json']}")
    return paths


if __name__ == "__main__":
    main()
