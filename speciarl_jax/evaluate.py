"""Benchmark evaluation: predict, verify, report (docs/method.md, benchmarks and metrics).

    python -m speciarl_jax.evaluate --run=runs/demo          # a training run, as it was trained
    python -m speciarl_jax.evaluate --config=configs/eval_benchmarks.py \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct --config.model.adapter=runs/cub/peft \
        --config.output_dir=runs/eval/speciarl-cub

For each data set of the config, every image gets one answer (greedy decoding) or N sampled answers (Best-of-N:
temperature 0.6, top-p 0.95); answers are parsed, graded by the verifier, and summarised by `metrics` into the
report files of `reports` under `output_dir`:

    run.json           what was evaluated (model, decoding, prompt, verifier, data sets); a rerun must match it
    predictions.jsonl  one line per (data set, sample id, sample index): label, generated text, parsed answer
    verdicts.jsonl     one line per graded answer: its category
    metrics.json, metrics.csv, report.md, categories.png, correctness_specificity.png

Both JSONL files are appended batch by batch and flushed to disk, so an interrupted run, started again with
the same config, generates only the images that have no complete set of answers yet and grades only the
answers without a verdict. Verdicts are never asked for twice: answers already graded are read back, an
identical (label, answer) pair is answered from memory, and the verifier's own SQLite cache (by default
`<output_dir>/verifier_cache.sqlite` for the LLM verifier) covers the rest. Rollouts the verifier failed on
(`allow_errors`) are not written, so the next run asks for them again.

Settings the config leaves unset come from the training run evaluated, if any (`run_settings`): its prompt,
system turn, image settings, answer length and synthetic world; differences are stated as changes from training.

The model is a Hugging Face folder (`model.path`) plus, optionally, an adapter (`model.adapter`): a training
checkpoint (`<run>/checkpoints/<step>`, or the `checkpoints` folder for its latest step; `model.path` may then
be left empty, the run config names the base), a PEFT folder, or an adapter checkpoint (see `export.py`). The
adapter is merged into the weights before decoding. `model.kind = "simulated"` replaces the network by a seeded answer generator
with a chosen mix of answer kinds (exact, parent, root, abstain, wrong, unparsed): no weights needed, used to
test the whole path and to illustrate the reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from speciarl_jax import metrics
from speciarl_jax.rewards import categories as cat
from speciarl_jax.rewards.parsing import normalize_label, parse_answer

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
VERDICTS = "verdicts.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
DECODING_MODES = ("greedy", "best_of_n")
# Source keys that choose how many images of a data set are used rather than which data set; changing them keeps
# the answers of the images both runs share (synthetic images depend on their index only, not on num_images).
_SUBSET_KEYS = ("num_examples", "subset_seed", "num_images")


# --------------------------------------------------------------------------------------------------
# Configuration


def default_config():
    """Every key `evaluate` reads, with its default. Config files start from this and change what they need."""
    import ml_collections as mc

    from speciarl_jax.verifier import VerifierConfig

    unset = mc.config_dict.placeholder
    config = mc.ConfigDict()
    # Settings left unset (None) come from the training run evaluated, or without one from
    # run_settings.WITHOUT_RUN; see speciarl_jax.run_settings.
    config.output_dir = unset(str)  # unset: <run>/eval/<step_N> for a training run, else runs/eval
    # A training run to evaluate as trained: its folder (latest checkpoint), a checkpoint, or its sft_model.
    config.run = ""
    config.model = mc.ConfigDict(dict(
        kind="qwen",  # "qwen" (a Hugging Face folder) or "simulated"
        path="",  # Hugging Face Qwen2.5-VL folder
        adapter="",  # PEFT folder or adapter checkpoint; "" = the base model as it is
        name="",  # label in tables and plots; "" = derived from path and adapter
        dtype=unset(str),
        simulated=dict(seed=0, exact=0.5, child=0.0, parent=0.2, root=0.1, abstain=0.05, wrong=0.1, unparsed=0.05),
    ))
    config.mesh = mc.ConfigDict(dict(enabled=True, data=1, fsdp=-1, tensor=1))
    # name -> data source config (see speciarl_jax.data.config.source_from_config).
    config.datasets = mc.ConfigDict()
    config.only = ""  # comma-separated names: evaluate only these data sets of the config
    config.prompt = unset(str)  # a name in data.prompts.PROMPTS or a prompt file
    config.system_prompt = unset(str)  # "": no system turn (the chat template's default)
    config.image = mc.ConfigDict(dict(min_pixels=unset(int), max_pixels=unset(int), image_size=unset(tuple)))
    config.decoding = mc.ConfigDict(dict(
        mode="greedy",  # "greedy" or "best_of_n"
        n=64,  # samples per image for best_of_n
        temperature=0.6,  # best_of_n only; greedy decoding uses temperature 0
        top_p=0.95,
        top_k=0,
        max_new_tokens=unset(int),
        batch_size=unset(int),  # images per generation batch (rows = batch_size x samples)
        seed=0,
    ))
    config.data = mc.ConfigDict(dict(worker_count=0, read_threads=2, on_bad_example="raise",
                                     pad_to_multiple_of=unset(int)))
    config.verifier = mc.ConfigDict(VerifierConfig().to_dict())
    config.verify_chunk = 4096  # answers per verifier call
    config.bootstrap = mc.ConfigDict(dict(samples=1000, seed=0, level=0.95))
    config.plots = True
    return config


def datasets_config(entries: Mapping[str, Mapping]):
    """`config.datasets` from {name: source entry}: each entry holds every key its source kind reads (unset
    ones as placeholders), so `--config.datasets.<name>.<key>=...` works for any of them."""
    import ml_collections as mc

    from speciarl_jax.data.config import source_config_dict

    return mc.ConfigDict({name: source_config_dict(entry) for name, entry in entries.items()})


def unset_section(section):
    """A copy of a config section with every value unset (a typed placeholder): filled from the run evaluated."""
    import ml_collections as mc

    return mc.ConfigDict({k: mc.config_dict.placeholder(type(v)) for k, v in section.items()})


def _plain(value):
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def validate(config) -> None:
    """Checks the settings evaluate depends on; errors name the key. Unset values (filled by
    `run_settings.resolve`) pass."""
    d = config.decoding
    if d.mode not in DECODING_MODES:
        raise ValueError(f"config.decoding.mode must be one of {DECODING_MODES}, got {d.mode!r}")
    if d.mode == "best_of_n" and d.n < 1:
        raise ValueError(f"config.decoding.n must be >= 1, got {d.n}")
    for key in ("max_new_tokens", "batch_size"):
        if d[key] is not None and d[key] < 1:
            raise ValueError(f"config.decoding.{key} must be >= 1, got {d[key]}")
    if d.mode == "best_of_n" and not (d.temperature > 0 and 0 < d.top_p <= 1):
        raise ValueError(f"config.decoding: best_of_n needs temperature > 0 and top_p in (0, 1], got "
                         f"{d.temperature} / {d.top_p}")
    if config.model.kind not in ("qwen", "simulated"):
        raise ValueError(f"config.model.kind must be 'qwen' or 'simulated', got {config.model.kind!r}")
    if config.model.kind == "qwen" and not (config.model.path or config.model.adapter or config.run):
        raise ValueError("config.model.path must name a Hugging Face Qwen2.5-VL folder (it may be left out only "
                         "when config.model.adapter is a training checkpoint, whose run config names the base)")
    if not len(config.datasets):
        raise ValueError("config.datasets is empty: name at least one data source")
    if config.verify_chunk < 1:
        raise ValueError(f"config.verify_chunk must be >= 1, got {config.verify_chunk}")


def samples_per_image(config) -> int:
    return int(config.decoding.n) if config.decoding.mode == "best_of_n" else 1


def base_model_path(config) -> str:
    from speciarl_jax import export

    return export.resolve_base(config.model.path or None, config.model.adapter or None)


def model_name(config) -> str:
    if config.model.name:
        return config.model.name
    if config.model.kind == "simulated":
        return "simulated"
    if not config.model.adapter:
        return os.path.basename(os.path.normpath(config.model.path))
    from speciarl_jax import checkpoint

    located = checkpoint.locate_step(config.model.adapter)
    if located is not None:  # <run>/checkpoints/<step> -> "<run> step <step>"
        return f"{os.path.basename(os.path.dirname(located[0]))} step {located[1]}"
    base = os.path.basename(os.path.normpath(config.model.path)) if config.model.path else "model"
    return base + "+" + os.path.basename(os.path.normpath(config.model.adapter))


def selected_datasets(config) -> dict[str, dict]:
    datasets = {name: {k: v for k, v in _plain(cfg).items() if v is not None} for name, cfg in config.datasets.items()}
    if config.only:
        wanted = [n.strip() for n in config.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(datasets))
        if unknown:
            raise ValueError(f"config.only names {unknown}, which config.datasets lacks (it has {sorted(datasets)})")
        datasets = {n: datasets[n] for n in wanted}
    return datasets


def fingerprint(config) -> dict:
    """What decides the answers and verdicts; a rerun into the same output_dir must agree on all of it."""
    d = config.decoding
    decoding = {"mode": d.mode, "max_new_tokens": d.max_new_tokens, "seed": d.seed}
    if d.mode == "best_of_n":
        decoding.update(n=d.n, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
    model = {"kind": config.model.kind}
    if config.model.kind == "qwen":
        model.update(path=os.path.abspath(base_model_path(config)), dtype=config.model.dtype,
                     adapter=_adapter_identity(config.model.adapter))
    else:
        model.update(simulated=_plain(config.model.simulated))
    v = config.verifier
    verifier = {"kind": v.kind, "prompt": v.prompt, "exact_match": v.exact_match, "screen": v.screen}
    if v.screen:
        verifier.update(max_answer_words=v.max_answer_words, max_answer_chars=v.max_answer_chars)
    verifier.update({"model": v.model} if v.kind == "openai" else {"taxonomy_path": v.taxonomy_path})
    return {
        "model": model,
        "decoding": decoding,
        "prompt": config.prompt,
        "system_prompt": config.system_prompt,
        "image": _plain(config.image),
        "verifier": verifier,
    }


def _adapter_identity(adapter: str) -> str:
    """The adapter's absolute path; a checkpoints folder stands for its latest step, so name that step."""
    if not adapter:
        return ""
    from speciarl_jax import checkpoint

    located = checkpoint.locate_step(adapter)
    if located is not None:
        return os.path.join(located[0], str(located[1]))
    return os.path.abspath(adapter)


def _dataset_identity(source_config: dict) -> dict:
    return {k: v for k, v in source_config.items() if k not in _SUBSET_KEYS}


def check_run_file(output_dir: str, config, datasets: Mapping[str, dict], training: dict | None = None) -> None:
    """Writes run.json on the first run; later runs must match it (data sets may be added or resized).
    `training`: what was taken from the training run evaluated and what differs from it (not compared)."""
    path = os.path.join(output_dir, RUN_FILE)
    current = {"fingerprint": fingerprint(config), "datasets": {n: _dataset_identity(c) for n, c in datasets.items()}}
    if training:
        current["training_run"] = training
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        old, new = saved.get("fingerprint", {}), current["fingerprint"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        changed += sorted(f"datasets.{n}" for n, c in current["datasets"].items()
                          if n in saved.get("datasets", {}) and saved["datasets"][n] != c)
        if changed:
            raise ValueError(
                f"{output_dir} holds an evaluation made with other settings ({', '.join(changed)} differ from "
                f"{path}); its answers cannot be reused. Use a new config.output_dir, or delete that folder."
            )
        current["datasets"] = {**saved.get("datasets", {}), **current["datasets"]}
    with open(path, "w") as f:
        json.dump(current, f, indent=2)


# --------------------------------------------------------------------------------------------------
# Append-only records


class JsonlLog:
    """A JSONL file written in batches, each flushed and synced; a torn last line (from a crash mid-write) is
    cut off when the file is opened again."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):
            self._repair()

    def _repair(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                            self.path, len(data) - keep)
                f.truncate(keep)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{number} is not valid JSON ({e}); fix or delete the line") from None
        return records

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


Key = tuple[str, str, int]  # (data set, sample id, sample index)


class RecordStore:
    """Predictions and verdicts of one output folder, in memory and on disk."""

    def __init__(self, output_dir: str):
        self.predictions_log = JsonlLog(os.path.join(output_dir, PREDICTIONS))
        self.verdicts_log = JsonlLog(os.path.join(output_dir, VERDICTS))
        self.predictions: dict[Key, dict] = {}
        for r in self.predictions_log.read():
            self.predictions[(r["dataset"], r["sample_id"], int(r["sample"]))] = r
        self.verdicts: dict[Key, str] = {}
        for r in self.verdicts_log.read():
            self.verdicts[(r["dataset"], r["sample_id"], int(r["sample"]))] = cat.check_category(r["category"])
        self.transient: dict[Key, str] = {}  # verifier errors of this run: reported, never written

    def missing_samples(self, dataset: str, sample_id: str, n: int) -> list[int]:
        return [k for k in range(n) if (dataset, sample_id, k) not in self.predictions]

    def add_predictions(self, records: Sequence[dict]) -> None:
        self.predictions_log.append(records)
        for r in records:
            self.predictions[(r["dataset"], r["sample_id"], r["sample"])] = r

    def add_verdicts(self, keys: Sequence[Key], categories: Sequence[str]) -> None:
        lasting = [(k, c) for k, c in zip(keys, categories) if c != cat.VERIFIER_ERROR]
        self.verdicts_log.append([{"dataset": k[0], "sample_id": k[1], "sample": k[2], "category": c}
                                  for k, c in lasting])
        self.verdicts.update(lasting)
        self.transient.update((k, c) for k, c in zip(keys, categories) if c == cat.VERIFIER_ERROR)

    def category(self, key: Key) -> str | None:
        return self.verdicts.get(key) or self.transient.get(key)


# --------------------------------------------------------------------------------------------------
# Grading


class Grader:
    """Grades stored answers that have no verdict yet, asking the verifier only for pairs it has not seen."""

    def __init__(self, verifier, store: RecordStore, chunk: int):
        self.verifier, self.store, self.chunk = verifier, store, chunk
        self.memory: dict[tuple[str, str], str] = {}
        self.asked = 0
        self.seconds = 0.0
        for key, category in store.verdicts.items():
            record = store.predictions.get(key)
            if record is not None and record["answer"] is not None:
                self.memory[(normalize_label(record["label"]), record["answer"])] = category

    def grade(self, keys: Sequence[Key]) -> None:
        keys = [k for k in keys if k not in self.store.verdicts]
        for start in range(0, len(keys), self.chunk):
            self._grade_chunk(keys[start:start + self.chunk])

    def _grade_chunk(self, keys: Sequence[Key]) -> None:
        begin = time.perf_counter()
        records = [self.store.predictions[k] for k in keys]
        categories: list[str | None] = [None] * len(keys)
        ask = []
        for i, r in enumerate(records):
            if r["answer"] is None:
                categories[i] = cat.PARSE_FAILURE
            else:
                categories[i] = self.memory.get((normalize_label(r["label"]), r["answer"]))
                if categories[i] is None:
                    ask.append(i)
        if ask:
            verdicts = self.verifier.classify([(records[i]["label"], records[i]["answer"]) for i in ask])
            self.asked += len(ask)
            for i, verdict in zip(ask, verdicts):
                categories[i] = verdict
                if verdict != cat.VERIFIER_ERROR:
                    self.memory[(normalize_label(records[i]["label"]), records[i]["answer"])] = verdict
        self.store.add_verdicts(keys, categories)
        self.seconds += time.perf_counter() - begin


# --------------------------------------------------------------------------------------------------
# Predictors: (sample ids, labels) of a batch -> generated texts


@dataclasses.dataclass
class Completion:
    text: str
    tokens: int
    truncated: bool
    answer: str | None  # what the text names (rewards.parse_answer), None when it names nothing


class QwenPredictor:
    """Our Qwen2.5-VL with the rollout engine; one engine, so each shape bucket compiles once per run."""

    def __init__(self, config):
        import jax

        from speciarl_jax import export, parallel
        from speciarl_jax.models import lora
        from speciarl_jax.processing import Processor
        from speciarl_jax.sampling import RolloutEngine

        if jax.process_count() > 1:
            raise NotImplementedError("evaluation runs on one host; start it on a single machine")
        self.config = config
        mesh = None
        if config.mesh.enabled:
            mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        start = time.perf_counter()
        path = base_model_path(config)
        self.model = export.load_model(path, config.model.adapter or None, dtype=config.model.dtype, mesh=mesh)
        merged = lora.merge_lora(self.model)
        log.info("loaded %s (%d adapted layers merged) in %.1fs", path, merged, time.perf_counter() - start)
        image = {k: v for k, v in _plain(config.image).items() if v is not None}
        if "image_size" in image:
            image["image_size"] = tuple(image["image_size"])
        self.processor = Processor.from_pretrained(path, **image)
        self.sampler = RolloutEngine(mesh=mesh)
        self.samples = samples_per_image(config)

    def batches(self, source, batch_size: int, dataset: str = "",
                ) -> Iterator[tuple[list[str], list[str], list[list[Completion]]]]:
        """(sample ids, labels, completions per image) for each batch of `source`."""
        import jax

        from speciarl_jax.answering import Decoding, ask
        from speciarl_jax.data import Pipeline, PipelineOptions

        c, d = self.config, self.config.decoding
        options = PipelineOptions(
            # "pad" fills the last batch with copies (valid=False): every batch has one shape, one compilation.
            batch_size=batch_size, shuffle=False, num_epochs=1, remainder="pad", prompt=c.prompt,
            system_prompt=c.system_prompt or None, pad_to_multiple_of=c.data.pad_to_multiple_of,
            on_bad_example=c.data.on_bad_example, worker_count=c.data.worker_count,
            read_threads=c.data.read_threads, process_index=0, process_count=1,
        )
        greedy = d.mode == "greedy"
        decoding = Decoding(d.max_new_tokens, temperature=0.0 if greedy else d.temperature,
                            top_p=1.0 if greedy else d.top_p, top_k=0 if greedy else d.top_k,
                            num_samples=self.samples)
        with Pipeline(source, self.processor, options).iterator() as iterator:
            for batch in iterator:
                # A seed per batch from its first sample id: a resumed run draws the same way for that batch.
                rng = jax.random.fold_in(jax.random.key(d.seed), zlib.crc32(batch.sample_ids[0].encode()))
                answers = ask(self.sampler, self.model, self.processor, batch.model_inputs(), decoding, rng)
                completions = [Completion(text, int(length), bool(cut), answer) for text, length, cut, answer
                               in zip(answers.texts, answers.output.lengths, answers.truncated, answers.answers)]
                keep = [i for i in range(len(batch)) if batch.valid[i]]
                grouped = [completions[i * self.samples:(i + 1) * self.samples] for i in keep]
                yield [batch.sample_ids[i] for i in keep], [batch.labels[i] for i in keep], grouped


class SimulatedPredictor:
    """Answers drawn from a fixed mix, no network: for testing the evaluation path and illustrating reports.

    Each answer is, with the configured weights: the label itself (`exact`), a child in the taxonomy
    (`child`, falling back to the label), its parent (`parent`), the root of its tree (`root`), "None"
    (`abstain`), another label of the data set (`wrong`), or text without answer tags (`unparsed`). Without a
    taxonomy entry the parent is the label minus its first word and the root its last word. Draws depend only on
    (seed, sample id, sample index), so reruns and resumed runs give the same answers.
    """

    KINDS = ("exact", "child", "parent", "root", "abstain", "wrong", "unparsed")

    def __init__(self, config, taxonomy=None):
        settings = _plain(config.model.simulated)
        unknown = sorted(set(settings) - set(self.KINDS) - {"seed"})
        if unknown:
            raise ValueError(f"config.model.simulated: unknown answer kinds {unknown}; known: {list(self.KINDS)}")
        weights = np.array([float(settings.get(k, 0.0)) for k in self.KINDS])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("config.model.simulated: weights must be >= 0 and not all zero")
        self.probabilities = weights / weights.sum()
        self.seed = int(settings.get("seed", 0))
        self.samples = samples_per_image(config)
        self.parent: dict[str, str] = {}
        self.children: dict[str, list[str]] = {}
        if taxonomy is not None:
            stack = [(node, None) for node in taxonomy.to_dict()]
            while stack:
                node, parent = stack.pop()
                key = normalize_label(node["name"])
                if parent is not None:
                    self.parent.setdefault(key, parent)
                    self.children.setdefault(normalize_label(parent), []).append(node["name"])
                stack.extend((child, node["name"]) for child in node.get("children", ()))

    def _root(self, label: str) -> str:
        key, seen = normalize_label(label), label
        while key in self.parent:
            seen = self.parent[key]
            key = normalize_label(seen)
        return seen if seen != label else label.split()[-1]

    def answer(self, label: str, pool: Sequence[str], key: str, sample: int) -> str:
        """One answer text for `label`; `key` (data set and sample id) and `sample` fix the random draw."""
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode()), sample])
        kind = self.KINDS[int(rng.choice(len(self.KINDS), p=self.probabilities))]
        key = normalize_label(label)
        if kind == "exact":
            guess = label
        elif kind == "child":
            options = self.children.get(key)
            guess = options[int(rng.integers(len(options)))] if options else label
        elif kind == "parent":
            guess = self.parent.get(key) or (" ".join(label.split()[1:]) or label)
        elif kind == "root":
            guess = self._root(label)
        elif kind == "abstain":
            guess = "None"
        elif kind == "wrong":
            others = [p for p in pool if normalize_label(p) != key]
            guess = others[int(rng.integers(len(others)))] if others else "something else"
        else:
            return f"I think this shows a {label}."
        return f"<think>Looking at the image.</think> <answer>{guess}</answer>"

    def batches(self, source, batch_size: int, dataset: str = ""):
        labels = [source[i].label for i in range(len(source))]
        pool = sorted(set(labels))
        for start in range(0, len(source), batch_size):
            ids = [source.sample_id(i) for i in range(start, min(start + batch_size, len(source)))]
            chunk = labels[start:start + len(ids)]
            grouped = []
            for sid, label in zip(ids, chunk):
                texts = [self.answer(label, pool, f"{dataset}/{sid}", k) for k in range(self.samples)]
                grouped.append([Completion(t, len(t.split()), False, parse_answer(t)) for t in texts])
            yield ids, chunk, grouped


# --------------------------------------------------------------------------------------------------
# The run


def _unwrap(source):
    while hasattr(source, "source") and not hasattr(source, "world"):
        source = source.source
    return source


def rule_taxonomy(config, sources: Mapping[str, Any]):
    """The taxonomy for kind='rule': `verifier.taxonomy_path` if set, else one built from the data sets: the
    synthetic world's hierarchy, and each class list of the other sources as single-node trees (so only exact
    matches of those count as correct; grade real benchmarks with the LLM verifier)."""
    from speciarl_jax.verifier import Taxonomy

    if config.verifier.taxonomy_path:
        return Taxonomy.from_json(config.verifier.taxonomy_path)
    trees, seen = [], set()
    for name, source in sources.items():
        base = _unwrap(source)
        parts = getattr(base, "parts", None) or [base]
        for part in parts:
            part = _unwrap(part)
            if hasattr(part, "world"):
                tree = part.world.taxonomy()
                if json.dumps(tree, sort_keys=True) not in seen:
                    seen.add(json.dumps(tree, sort_keys=True))
                    trees.append(tree)
                continue
            names = getattr(part, "class_names", None)
            if not names:
                raise ValueError(
                    f"data set {name!r}: the rule verifier needs a taxonomy; set config.verifier.taxonomy_path "
                    "or use the LLM verifier (kind='openai')"
                )
            trees.extend({"name": n} for n in names if n not in seen)
            seen.update(names)
    return Taxonomy.from_dict(trees)


def _taxonomy_if_any(config, sources):
    try:
        return rule_taxonomy(config, sources)
    except ValueError:
        return None


def _make_verifier(config, output_dir: str, sources):
    from speciarl_jax.verifier import make_verifier

    settings = _plain(config.verifier)
    if settings["kind"] == "openai" and not settings["cache_path"]:
        settings["cache_path"] = os.path.join(output_dir, "verifier_cache.sqlite")
    taxonomy = rule_taxonomy(config, sources) if settings["kind"] == "rule" else None
    return make_verifier(settings, taxonomy=taxonomy), taxonomy


def _selections(config) -> list[tuple[str, str]]:
    """(label, mode) of each way answers are turned into one category per image."""
    if config.decoding.mode == "greedy":
        return [("greedy", "first")]
    return [(f"best-of-{config.decoding.n}", "best"), ("per-sample", "all")]


def collect_categories(store: RecordStore, dataset: str, sample_ids: Sequence[str], n: int) -> list[list[str]]:
    """Per image of the selection, its samples' categories (images with a missing verdict are left out)."""
    out = []
    for sid in sample_ids:
        categories = [store.category((dataset, sid, k)) for k in range(n)]
        if all(c is not None for c in categories):
            out.append(categories)
    return out


def summarise(config, store: RecordStore, sample_ids: Mapping[str, Sequence[str]]) -> list[dict]:
    """Report rows: one per (selection, data set), plus "overall" and "mean" when there are several data sets."""
    n = samples_per_image(config)
    rows = []
    b = config.bootstrap
    for label, mode in _selections(config):
        per_dataset, missing = {}, {}
        for dataset, ids in sample_ids.items():
            per_image = collect_categories(store, dataset, ids, n)
            missing[dataset] = len(ids) - len(per_image)  # skipped bad examples, or verdicts still to come
            per_dataset[dataset] = ([c for cs in per_image for c in cs] if mode == "all"
                                    else metrics.select(per_image, mode))
        # Samples of one image are not independent, so pooled per-sample rows get no bootstrap interval.
        replicates = 0 if mode == "all" else b.samples
        results = metrics.summarize_many(per_dataset, bootstrap=replicates, seed=b.seed, level=b.level)
        if len(per_dataset) == 1:
            results = {k: v for k, v in results.items() if k not in ("overall", "mean")}
        for dataset, m in results.items():
            lost = missing.get(dataset, sum(missing.values()))
            rows.append({"model": model_name(config), "selection": label, "dataset": dataset, "missing": lost,
                         **m.to_dict()})
    return rows


def prepare(config):
    """(config with its unset settings filled from the run it evaluates, `run_settings.Resolution`), checked."""
    from speciarl_jax import run_settings

    config, resolution = run_settings.resolve(config)
    validate(config)
    return config, resolution


def evaluate(config, resolution=None) -> list[dict]:
    """Runs (or resumes) the evaluation a config describes and writes its reports; returns the report rows.
    `resolution`: given with a config `prepare` already returned."""
    from tqdm import tqdm

    from speciarl_jax import reports
    from speciarl_jax.data import Subset, source_from_config

    if resolution is None:
        config, resolution = prepare(config)
    if resolution.trained is not None:
        print(resolution.describe(), flush=True)
    output_dir = config.output_dir
    os.makedirs(output_dir, exist_ok=True)
    datasets = selected_datasets(config)
    check_run_file(output_dir, config, datasets, resolution.to_json())
    sources = {name: source_from_config(cfg) for name, cfg in datasets.items()}
    store = RecordStore(output_dir)
    verifier, taxonomy = _make_verifier(config, output_dir, sources)
    grader = Grader(verifier, store, config.verify_chunk)
    n = samples_per_image(config)
    predictor = None
    timing: dict[str, dict] = {}
    sample_ids: dict[str, list[str]] = {}
    try:
        for name, source in sources.items():
            ids = [source.sample_id(i) for i in range(len(source))]
            sample_ids[name] = ids
            pending = [i for i, sid in enumerate(ids) if store.missing_samples(name, sid, n)]
            stats = timing.setdefault(name, {"images": len(ids), "generated": 0, "tokens": 0, "seconds": 0.0})
            # Answers stored by an earlier run but not graded yet.
            grader.grade([(name, sid, k) for sid in ids for k in range(n)
                          if (name, sid, k) in store.predictions and (name, sid, k) not in store.verdicts])
            if not pending:
                continue
            if predictor is None:
                predictor = (SimulatedPredictor(config, taxonomy or _taxonomy_if_any(config, sources))
                             if config.model.kind == "simulated" else QwenPredictor(config))
            batch_size = config.decoding.batch_size
            progress = tqdm(total=len(pending), desc=f"{name}: {len(pending)} of {len(ids)} images to answer",
                            unit="img", dynamic_ncols=True)
            start = time.perf_counter()
            for batch_ids, labels, grouped in predictor.batches(Subset(source, pending), batch_size, name):
                records = []
                for sid, label, completions in zip(batch_ids, labels, grouped):
                    missing = set(store.missing_samples(name, sid, n))
                    records += [
                        {"dataset": name, "sample_id": sid, "sample": k, "label": label, "text": c.text,
                         "answer": c.answer, "tokens": c.tokens, "truncated": c.truncated}
                        for k, c in enumerate(completions) if k in missing
                    ]
                store.add_predictions(records)
                grader.grade([(r["dataset"], r["sample_id"], r["sample"]) for r in records])
                stats["generated"] += len(batch_ids)
                stats["tokens"] += sum(r["tokens"] for r in records)
                progress.update(len(batch_ids))
            stats["seconds"] = time.perf_counter() - start
            progress.close()
    finally:
        verifier.close()

    rows = summarise(config, store, sample_ids)
    summary = {
        "model": model_name(config),
        "output_dir": output_dir,
        "samples_per_image": n,
        "timing": timing,
        "verifier": {"asked": grader.asked, "seconds": grader.seconds, **verifier.total_stats.as_metrics("")},
        "rows": rows,
    }
    if resolution.trained is not None:
        summary["training_run"] = resolution.to_json()
    with open(os.path.join(output_dir, METRICS_FILE), "w") as f:
        json.dump(_finite(summary), f, indent=2)
    reports.write_reports(rows, output_dir, plots=config.plots)
    print(f"Reports in {output_dir}: report.md, metrics.json, metrics.csv" + (", plots" if config.plots else ""))
    return rows


def _finite(value):
    """NaN -> None for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def command_config(config, run: str = ""):
    """The config of the command line: the --config file (by default configs/eval_run.py) with --run, if
    given, as `config.run`."""
    if run:
        if config.run and config.run != run:
            raise ValueError(f"--run={run} and --config.run={config.run} disagree; give one")
        config.run = run
    if config.model.kind == "qwen" and not (config.run or config.model.path or config.model.adapter):
        raise ValueError("nothing to evaluate: name a training run (--run=runs/<name>, its checkpoints/<step> or "
                         "its sft_model), or a model (--config.model.path=<Hugging Face folder>) with an "
                         "evaluation config (--config=configs/eval_benchmarks.py:/data)")
    return config


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; settings go through --config.<key>=<value>")
    from absl import flags

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # a wrong setting or path: the message says which (errors of the evaluation itself keep their traceback)
        config, resolution = prepare(command_config(flags.FLAGS.config, flags.FLAGS.run))
    except (ValueError, FileNotFoundError) as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = evaluate(config, resolution)
    from speciarl_jax import reports

    print(reports.markdown_table(rows))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags


    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "eval_run.py"),
                                    "evaluation config file (configs/eval_*.py); by default configs/eval_run.py, "
                                    "which evaluates --run as trained", lock_config=True)
    flags.DEFINE_string("run", "", "a training run to evaluate as trained: runs/<name> (its latest checkpoint), "
                        "runs/<name>/checkpoints/<step> or runs/<name>/sft_model")
    app.run(main)
