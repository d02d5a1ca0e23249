"""Verifier throughput on one paper-sized step, and the calls that cache, de-duplication and screening save.

    python benchmarks/verifier.py                  # server in its own process, 50 ms per request
    python benchmarks/verifier.py --serial_pairs 2560 --json_out /tmp/verifier.json

1. Throughput: 2,560 distinct pairs (256 prompts x 10 rollouts) through the real
   OpenAI client to the loopback server, which waits `--latency_s` per request like
   a busy LLM server, at several concurrency levels. Concurrency 1 is timed on
   `--serial_pairs` pairs (default 256: 2,560 serial requests would take over two
   minutes to measure one steady rate).
2. The same step again from the SQLite cache.
3. A realistic step: answers repeat within a group, many match the label exactly, some
   abstain or hedge. Counts where each rollout was decided and how many LLM calls that
   leaves, for a cold cache and for a second step with the cache warm.

The server runs in a separate process by default, as a real verifier would; with
`--in_process` it runs in a thread of this process and competes for the same GIL.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from speciarl_jax import metrics
from speciarl_jax.verifier import Taxonomy, make_verifier
from speciarl_jax.verifier.server import LoopbackVerifierServer

PROMPTS_PER_STEP = 256
ROLLOUTS = 10


def bird_taxonomy(families: int = 8, genera_per_family: int = 5, species_per_genus: int = 5) -> Taxonomy:
    """A CUB-like hierarchy: 200 species in 40 genera in 8 families."""
    tree = {"name": "bird", "children": [
        {"name": f"family {f}", "children": [
            {"name": f"genus {f}-{g}", "children": [
                {"name": f"species {f}-{g}-{s}", "synonyms": [f"latin {f}-{g}-{s}"]}
                for s in range(species_per_genus)]}
            for g in range(genera_per_family)]}
        for f in range(families)]}
    return Taxonomy.from_dict(tree)


def species_names(taxonomy: Taxonomy) -> list[str]:
    return [name for name in taxonomy.names() if name.startswith("species")]


class ServerProcess:
    """The loopback server as a child process; stops only the process it started."""

    def __init__(self, taxonomy: Taxonomy, latency_s: float):
        self._file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(taxonomy.to_dict(), self._file)
        self._file.close()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "speciarl_jax.verifier.server", "--taxonomy", self._file.name,
             "--port", "0", "--latency_s", str(latency_s)], stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"loopback server did not start: {line!r}")
        self.url = line.split()[-1]

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        os.unlink(self._file.name)


def distinct_step(species: list[str]) -> list[tuple[str, str]]:
    """2,560 pairs, all different, so every one costs a request."""
    return [(species[(i // ROLLOUTS) % len(species)], f"guess number {i}")
            for i in range(PROMPTS_PER_STEP * ROLLOUTS)]


def realistic_step(species: list[str], seed: int) -> list[tuple[str, str | None]]:
    """A step as a policy mid-training produces it: each group repeats a few answers."""
    rng = random.Random(seed)

    def surface(label: str) -> str:  # same label, different spelling: case, trailing period
        return rng.choice([label, label.title(), label.upper(), label + ".", f" {label} "])

    pairs = []
    for _ in range(PROMPTS_PER_STEP):
        truth = rng.choice(species)  # "species F-G-S"
        code = truth.split(" ")[1]
        family, genus, _ = code.split("-")
        sibling = f"species {family}-{genus}-{rng.randrange(5)}"
        stranger = rng.choice(species)
        # The group's repertoire: a few candidate answers it keeps returning to.
        candidates = [
            (0.30, lambda: surface(truth)),
            (0.05, lambda: f"latin {code}"),  # a synonym: needs the LLM
            (0.15, lambda: surface(f"genus {family}-{genus}")),
            (0.08, lambda: surface(f"family {family}")),
            (0.15, lambda: surface(sibling)),
            (0.08, lambda: surface(stranger)),
            (0.07, lambda: rng.choice(["None", "none", "I don't know"])),
            (0.04, lambda: f"{sibling} or {truth}"),
            (0.03, lambda: "a small bird with a yellow crown perched on a branch among green leaves"),
            (0.05, lambda: None),  # parse failure
        ]
        weights = [w for w, _ in candidates]
        for _ in range(ROLLOUTS):
            _, make = rng.choices(candidates, weights)[0]
            pairs.append((truth, make()))
    return pairs


def time_step(url: str, pairs, concurrency: int, cache_path: str = "", screen: bool = False, verdicts=None):
    """(seconds, stats) of one classify call over `pairs`; `verdicts`, a list, receives the categories."""
    verifier = make_verifier({"kind": "openai", "base_url": url, "model": "loopback", "screen": screen,
                              "concurrency": concurrency, "cache_path": cache_path, "timeout_s": 30.0})
    try:
        if not cache_path:
            verifier.classify(pairs[:concurrency])  # opens the connections before the clock starts
        start = time.perf_counter()
        categories = verifier.classify(pairs)
        if verdicts is not None:
            verdicts.extend(categories)
        return time.perf_counter() - start, verifier.last_stats
    finally:
        verifier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency_s", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--serial_pairs", type=int, default=256, help="pairs timed at concurrency 1")
    parser.add_argument("--in_process", action="store_true", help="run the server in a thread here")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args()

    taxonomy = bird_taxonomy()
    species = species_names(taxonomy)
    if args.in_process:
        server = LoopbackVerifierServer(taxonomy, latency_s=args.latency_s).start()
    else:
        server = ServerProcess(taxonomy, args.latency_s)
    results: dict = {"latency_s": args.latency_s, "server": "thread" if args.in_process else "process",
                     "throughput": {}}
    try:
        pairs = distinct_step(species)
        print(f"1. {len(pairs)} distinct pairs, {args.latency_s * 1000:.0f} ms per request, "
              f"server in a {results['server']}")
        for concurrency in args.concurrency:
            timed = pairs[:args.serial_pairs] if concurrency == 1 else pairs
            seconds, stats = time_step(server.url, timed, concurrency)
            rate = len(timed) / seconds
            results["throughput"][concurrency] = {"pairs": len(timed), "seconds": seconds, "pairs_per_s": rate}
            note = f" (timed on {len(timed)} pairs)" if len(timed) != len(pairs) else ""
            print(f"   concurrency {concurrency:4d}: {rate:7.1f} pairs/s, {seconds:6.2f} s{note}, "
                  f"{stats.llm_requests} requests")

        with tempfile.TemporaryDirectory() as directory:
            cache_path = os.path.join(directory, "verdicts.sqlite")
            time_step(server.url, pairs, 64, cache_path)  # fills the cache
            seconds, stats = time_step(server.url, pairs, 64, cache_path)
        results["cached_step_s"] = seconds
        print(f"2. the same step from the cache: {seconds:.3f} s ({stats.cache_hits} hits, "
              f"{stats.llm_requests} requests)")

        steps, verdicts = {}, {}
        for screen in (False, True):
            with tempfile.TemporaryDirectory() as directory:
                cache_path = os.path.join(directory, "verdicts.sqlite")
                for name, seed in (("first step, cold cache", 1), ("next step, warm cache", 2)):
                    name += ", screened" if screen else ""
                    verdicts[name] = []
                    _, stats = time_step(server.url, realistic_step(species, seed), 64, cache_path, screen,
                                         verdicts[name])
                    steps[name] = stats
        print("3. realistic steps (256 prompts x 10 rollouts; answers repeat within groups), as the original "
              "(every parsed answer to the LLM but exact matches and repeats) and with verifier.screen=True")
        fields = [("parse failures (no call)", "parse_failures"), ("exact match -> specific", "exact_matches"),
                  ("refusal -> abstain", "refusals"), ("several options -> wrong", "several_options"),
                  ("too long -> wrong", "too_long"), ("empty -> wrong", "empty"),
                  ("duplicates in the batch", "duplicates"), ("cache hits", "cache_hits"),
                  ("LLM requests sent", "llm_requests")]
        print(f"   {'':32s}" + "".join(f"{name:>34s}" for name in steps))
        for label, field in fields:
            print(f"   {label:32s}" + "".join(f"{getattr(s, field):34d}" for s in steps.values()))
        for name, stats in steps.items():
            naive = stats.pairs - stats.parse_failures  # one call per parsed rollout
            print(f"   {name}: {stats.llm_requests} calls instead of {naive} "
                  f"({1 - stats.llm_requests / naive:.0%} saved)")
        for name, categories in verdicts.items():
            m = metrics.summarize(categories, bootstrap=0)
            print(f"   {name}: C {m.correctness:.4f}  S {m.specificity:.4f}  S_all {m.specificity_all:.4f}")
        results["realistic"] = {name: vars(stats) for name, stats in steps.items()}
    finally:
        server.stop()

    target_rate = results["throughput"].get(64, {}).get("pairs_per_s", 0.0)
    print(f"targets: >= 300 pairs/s at concurrency 64: {target_rate:.0f} "
          f"({'met' if target_rate >= 300 else 'MISSED'}); cached step < 0.5 s: "
          f"{results['cached_step_s']:.3f} s ({'met' if results['cached_step_s'] < 0.5 else 'MISSED'})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
