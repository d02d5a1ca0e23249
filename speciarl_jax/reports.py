"""Tables and plots of evaluation results.

A report is built from rows, one per (model, selection, data set), as `evaluate` returns them and stores them
in `<run>/metrics.json`: n, counts and shares per category, C / S / HM / score and their interval bounds.

    write_reports(rows, folder)   -> report.md, metrics.csv, report.json, categories.png, correctness_specificity.png

To put several runs (models, or checkpoints of one run) side by side:

    python -m speciarl_jax.reports --runs=runs/eval/base,runs/eval/step_80,runs/eval/step_165 \
        --names=base,step 80,step 165 --out=runs/eval/compare --connect
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from speciarl_jax.rewards import categories as cat

# Category order in tables and bars: best first, parse failures last.
BAR_CATEGORIES = (cat.SPECIFIC, cat.MORE_SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.ABSTAIN, cat.WRONG,
                  cat.PARSE_FAILURE, cat.VERIFIER_ERROR)
COLOURS = {
    cat.SPECIFIC: "#1b7837",
    cat.MORE_SPECIFIC: "#5aae61",
    cat.LESS_SPECIFIC: "#a6dba0",
    cat.GENERIC: "#d9f0d3",
    cat.ABSTAIN: "#bababa",
    cat.WRONG: "#d6604d",
    cat.PARSE_FAILURE: "#4d4d4d",
    cat.VERIFIER_ERROR: "#f4a582",
}
SHORT = {cat.SPECIFIC: "spec.", cat.MORE_SPECIFIC: "more", cat.LESS_SPECIFIC: "less", cat.GENERIC: "generic",
         cat.ABSTAIN: "abstain", cat.WRONG: "wrong", cat.PARSE_FAILURE: "unparsed", cat.VERIFIER_ERROR: "verifier err."}
POOLED = ("overall", "mean")
MARKERS = "osD^vP*Xph<>"


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _with_interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    text = _number(row.get(key))
    if low is None or high is None or any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return text
    return f"{text} [{_number(low)}, {_number(high)}]"


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per (model, selection, data set): n, C / S / HM with 95% intervals, S_all / HM_all (specificity
    over all answers, its intervals in the CSV and JSON), score, category shares in %.

    A "missing" column (images of the selection without an answer: skipped bad examples) appears when any row
    has some."""
    selections = {r["selection"] for r in rows}
    show_missing = any(r.get("missing") for r in rows)
    head = ["model"] + (["selection"] if len(selections) > 1 else []) + ["data set", "n"]
    head += (["missing"] if show_missing else []) + ["C [95% CI]", "S [95% CI]", "HM [95% CI]", "S_all", "HM_all",
                                                     "score"]
    shown = [c for c in BAR_CATEGORIES if c != cat.VERIFIER_ERROR or any(r.get(f"share/{c}") for r in rows)]
    head += [f"{SHORT[c]} %" for c in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"]] + ([r["selection"]] if len(selections) > 1 else []) + [r["dataset"], str(r["n"])]
        cells += ([str(r.get("missing", 0))] if show_missing else []) + [
            _with_interval(r, "correctness"), _with_interval(r, "specificity"), _with_interval(r, "hm"),
            _number(r.get("specificity_all")), _number(r.get("hm_all")), _number(r.get("score")),
        ]
        cells += [_percent(r.get(f"share/{c}")) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def write_csv(rows: Sequence[dict], path: str) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in columns})


def write_json(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{k: _clean(v) for k, v in r.items()} for r in rows], f, indent=2)


# --------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _main_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows plotted: per-sample pools are left out when a run also has a greedy or best-of-N row."""
    main = [r for r in rows if r["selection"] != "per-sample"]
    return main or list(rows)


def _series(rows: Sequence[dict]) -> list[str]:
    """Plot series, in first-seen order: the model, plus the selection when one model has several."""
    out = []
    for r in rows:
        name = _series_name(r, rows)
        if name not in out:
            out.append(name)
    return out


def _series_name(row: dict, rows: Sequence[dict]) -> str:
    several = len({r["selection"] for r in rows if r["model"] == row["model"]}) > 1
    return f"{row['model']} ({row['selection']})" if several else row["model"]


def _datasets(rows: Sequence[dict], pooled: bool = True) -> list[str]:
    out = []
    for r in rows:
        if r["dataset"] not in out and (pooled or r["dataset"] not in POOLED):
            out.append(r["dataset"])
    # Pooled rows go last, and "mean" shares are averages, so the bars show "overall" only.
    return [d for d in out if d not in POOLED] + (["overall"] if pooled and "overall" in out else [])


def plot_categories(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Stacked bars of the category shares: one group per data set, one bar per model within a group."""
    plt = _pyplot()
    rows = _main_rows(rows)
    series, datasets = _series(rows), _datasets(rows)
    by_key = {(_series_name(r, rows), r["dataset"]): r for r in rows}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 + len(datasets) * (0.5 + 0.55 * len(series))), 4.2))
    for s_index, name in enumerate(series):
        xs = [d_index - 0.4 + width * (s_index + 0.5) for d_index in range(len(datasets))]
        bottom = [0.0] * len(datasets)
        for category in BAR_CATEGORIES:
            heights = []
            for d in datasets:
                row = by_key.get((name, d))
                share = _clean(row.get(f"share/{category}")) if row else None
                heights.append(100 * share if share is not None else 0.0)
            ax.bar(xs, heights, width * 0.92, bottom=bottom, color=COLOURS[category], edgecolor="white",
                   linewidth=0.4, label=category if s_index == 0 else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
        if len(series) > 1:
            for x in xs:
                ax.text(x, 101, str(s_index + 1), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=20 if len(datasets) > 4 else 0, ha="right" if len(datasets) > 4 else "center")
    ax.set_ylabel("share of answers (%)")
    ax.set_ylim(0, 108 if len(series) > 1 else 100)
    heading = title or ("answer categories" if len(series) == 1 else
                        "answer categories; bars: " + ", ".join(f"{i + 1} = {s}" for i, s in enumerate(series)))
    ax.set_title(heading, fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_correctness_specificity(rows: Sequence[dict], path: str, *, connect: bool = False, title: str = "") -> None:
    """Correctness (y) against specificity (x): colour = model or checkpoint, marker = data set, bars = 95%
    intervals, dotted curves = equal HM. With `connect`, each data set's points are joined in series order
    (checkpoints of one run)."""
    import numpy as np

    plt = _pyplot()
    rows = [r for r in _main_rows(rows) if r["dataset"] != "mean"]
    series, datasets = _series(rows), _datasets(rows)
    colours = plt.get_cmap("viridis" if connect and len(series) > 2 else "tab10")
    colour = {s: colours(i / max(1, len(series) - 1)) if connect and len(series) > 2 else colours(i % 10)
              for i, s in enumerate(series)}
    marker = {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(datasets)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    grid = np.linspace(0.005, 1, 200)
    for level in (0.2, 0.4, 0.6, 0.8):
        with np.errstate(divide="ignore", invalid="ignore"):
            c = level * grid / (2 * grid - level)
        keep = (grid > level / 2) & (c >= 0) & (c <= 1)
        ax.plot(grid[keep], c[keep], ":", color="#999999", linewidth=0.8, zorder=0)
        ax.annotate(f"HM {level}", (1.0, level / (2 - level)), xytext=(0, 3), textcoords="offset points", fontsize=7,
                    color="#777777", ha="right", va="bottom")
    for d in datasets:
        points = []
        for s in series:
            row = next((r for r in rows if _series_name(r, rows) == s and r["dataset"] == d), None)
            if row is None or _clean(row.get("correctness")) is None:
                continue
            x, y = row["specificity"], row["correctness"]
            xerr = _error(row, "specificity")
            yerr = _error(row, "correctness")
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker[d], color=colour[s], markersize=7 if d != "overall" else 9,
                        markeredgecolor="black" if d == "overall" else colour[s], elinewidth=0.8, capsize=2)
            points.append((x, y))
        if connect and len(points) > 1:
            ax.plot(*zip(*points), "-", color="#555555", linewidth=0.8, alpha=0.6, zorder=1)
    handles = [plt.Line2D([], [], color=colour[s], marker="o", linestyle="", label=s) for s in series]
    handles += [plt.Line2D([], [], color="#444444", marker=marker[d], linestyle="", label=d) for d in datasets]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("specificity S (share of correct answers that are specific)")
    ax.set_ylabel("correctness C (share of answers correct at any level)")
    ax.set_title(title or "correctness against specificity (95% bootstrap intervals)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _error(row: dict, key: str):
    low, high, value = _clean(row.get(f"{key}_low")), _clean(row.get(f"{key}_high")), row[key]
    if low is None or high is None:
        return None
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def write_reports(rows: Sequence[dict], folder: str, *, plots: bool = True, connect: bool = False) -> dict[str, str]:
    """Writes the table, the numbers and (unless `plots` is False) both plots into `folder`; returns the paths."""
    if not rows:
        raise ValueError("no result rows to report")
    os.makedirs(folder, exist_ok=True)
    paths = {
        "table": os.path.join(folder, "report.md"),
        "csv": os.path.join(folder, "metrics.csv"),
        "json": os.path.join(folder, "report.json"),
    }
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(markdown_table(rows))
    write_csv(rows, paths["csv"])
    write_json(rows, paths["json"])
    if plots:
        paths["categories"] = os.path.join(folder, "categories.png")
        paths["correctness_specificity"] = os.path.join(folder, "correctness_specificity.png")
        plot_categories(rows, paths["categories"])
        plot_correctness_specificity(rows, paths["correctness_specificity"], connect=connect)
    return paths


def load_rows(run_dir: str, name: str | None = None) -> list[dict]:
    """The rows stored by `evaluate` in `<run_dir>/metrics.json`, optionally renamed to `name`."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no evaluation results in {run_dir} ({path} is missing)") from None
    rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
    if name:
        for r in rows:
            r["model"] = name
    return rows


def load_runs(runs: Sequence[str], names: Sequence[str | None]) -> list[dict]:
    """The rows of several evaluation folders, each labelled by its evaluation: the given name, else the model
    label stored with it, followed by the folder's name when another folder has the same label (two
    evaluations of one checkpoint, say with two prompts)."""
    loaded = [load_rows(run, name) for run, name in zip(runs, names)]
    labels = [rows[0]["model"] if rows else "" for rows in loaded]
    for run, name, label, rows in zip(runs, names, labels, loaded):
        if not name and labels.count(label) > 1:
            for r in rows:
                r["model"] = f"{label} [{os.path.basename(os.path.normpath(run))}]"
    return [row for rows in loaded for row in rows]


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    runs = [r for r in f.runs.split(",") if r]
    names = f.names.split(",") if f.names else [None] * len(runs)
    if len(names) != len(runs):
        raise ValueError(f"--names lists {len(names)} names for {len(runs)} --runs")
    rows = load_runs(runs, names)
    if f.datasets:
        keep = set(f.datasets.split(","))
        rows = [r for r in rows if r["dataset"] in keep]
    paths = write_reports(rows, f.out, connect=f.connect)
    print(markdown_table(rows))
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("runs", None, "comma-separated evaluation folders (each with metrics.json)", required=True)
    flags.DEFINE_string("names", "", "comma-separated labels for the runs (default: their model labels, "
                        "with the folder name where two are alike)")
    flags.DEFINE_string("datasets", "", "comma-separated data sets to keep (default: all)")
    flags.DEFINE_string("out", None, "folder for the combined report", required=True)
    flags.DEFINE_bool("connect", False, "join each data set's points in run order (checkpoints of one run)")
    app.run(main)
