"""The arithmetic behind the speed scripts: the sampler benchmark's floor does exactly the model's weight products,
and the bandwidth script counts the bytes a decoding step must read (checked against hand-derived sizes)."""

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_floor_does_every_weight_product_once(tiny_checkpoint):
    from speciarl_jax.models.qwen2_5_vl import from_pretrained

    tiny_model = from_pretrained(tiny_checkpoint)
    bench = _load("sampler")
    layers, head = bench._text_weights(tiny_model)
    flops = []

    def dot(a, b):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return a @ b

    rows = 3
    x = np.full((rows, head.shape[0]), 0.01, np.float32)
    bench._products_step(x, layers, head, dot, lambda a: np.clip(a, -1, 1))
    text = tiny_model.language_model
    kernels = [p for path, p in nnx.to_flat_state(nnx.state(text.layers, nnx.Param)) if path[-1] == "kernel"]
    tied = tiny_model.config.tie_word_embeddings
    head_size = (text.embed_tokens.embedding if tied else tiny_model.lm_head.kernel).size
    expected = 2 * rows * (sum(k.size for k in kernels) + head_size)
    assert sum(flops) == expected
    assert len(flops) == 7 * len(text.layers) + 1


def test_bandwidth_bytes_match_the_3b_shapes():
    bench = _load("decode_bandwidth")
    from speciarl_jax.models.qwen2_5_vl import Qwen25VL

    config = bench.model_config("3b")
    model = nnx.eval_shape(lambda: Qwen25VL(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    d, f, layers, vocab, kv = 2048, 11008, 36, 151936, 256
    per_layer = d * (d + 2 * kv) + (d + 2 * kv) + d * d + 3 * d * f + 2 * d  # q/k/v (+bias), o, MLP, two norms
    assert bench.weight_bytes_per_step(model) == 2 * (layers * per_layer + d + vocab * d)  # + final norm, tied head
    # keys and values, 36 layers, 2 kv heads of 128 channels, 2 bytes each
    assert bench.cache_bytes(config, rows=64, slots=384, itemsize=2) == 2 * 36 * 64 * 2 * 128 * 384 * 2


def test_bandwidth_script_runs(monkeypatch, capsys):
    bench = _load("decode_bandwidth")
    argv = ["decode_bandwidth.py", "--preset", "tiny", "--bandwidth-gbs", "0.001", "--new", "4", "--prompt-len", "8",
            "--batches", "2", "--repeats", "1", "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("2 ")]
    assert len(rows) == 1 and int(rows[0][1]) >= 1  # steps
    # The bandwidth limit does not depend on timing: the bytes of the tiny model's weights and its cache
    # (8 prompt slots rounded up to the cache bucket, 32, plus 4 new: 36 slots), over 1 MB/s
    # (slow, so that one slot more or less shows in the printed milliseconds).
    from speciarl_jax.models.qwen2_5_vl import Qwen25VL

    config = bench.model_config("tiny")
    weights = bench.weight_bytes_per_step(nnx.eval_shape(lambda: Qwen25VL(config, dtype=jnp.float32,
                                                                          rngs=nnx.Rngs(0))))
    limit_ms = (weights + bench.cache_bytes(config, rows=2, slots=36, itemsize=4)) / 1e6 * 1e3
    assert rows[0][6] == f"{limit_ms:.2f}"


def test_bandwidth_script_runs_the_rl_workload(monkeypatch, capsys):
    bench = _load("decode_bandwidth")
    argv = ["decode_bandwidth.py", "--preset", "tiny", "--bandwidth-gbs", "1", "--new", "24", "--prompt-len", "8",
            "--rl", "4x2", "--slots", "4", "--repeats", "1", "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    assert "same tokens as static: True" in out
    engine = next(line.split() for line in out.splitlines() if line.strip().startswith("engine "))
    static = next(line.split() for line in out.splitlines() if line.strip().startswith("static "))
    assert float(engine[6]) < float(static[4])  # the engine's KV bytes: 4 slots against 8 rows, plus the prefill's


def test_rl_workload_end_tokens_spread_the_lengths():
    bench = _load("sampler")
    rng = np.random.default_rng(0)
    trajectories = rng.integers(0, 50, (64, 128))
    ends, lengths = bench.choose_end_tokens(trajectories, 128)
    np.testing.assert_array_equal(lengths, bench.first_hits(trajectories, ends, 128))
    assert ends and lengths.min() < 8 and lengths.max() > 32
    # A hand-made case: token 7 ends row 0 at its 3rd token, nothing ends row 1.
    assert list(bench.first_hits(np.array([[1, 2, 7, 7], [1, 1, 1, 1]]), [7], 4)) == [3, 4]


def test_device_check_runs_at_tiny_size(monkeypatch, capsys, tmp_path):
    import json

    bench = _load("device_check")
    monkeypatch.setattr(sys, "argv", ["device_check.py", "--tiny", "--json", str(tmp_path / "r.json")])
    bench.main()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not any(isinstance(v, dict) and "error" in v for v in report.values()), report
    # bf16 rounds the weights and activations: close to float32, not equal to it.
    assert 0 < report["bf16_vs_f32"]["max_abs_diff"] < 0.05 * report["bf16_vs_f32"]["logit_scale"]
    assert report["bf16_vs_f32"]["top1_agreement"] > 0.8
    assert "tok/s" in report["decode_bandwidth"]
    assert np.isfinite(report["update"]["loss"]) and report["update"]["planned_bytes"] > 0


def test_update_comparison_runs_both_paths(monkeypatch, capsys):
    """The RL workload through both update paths (tiny model): the bucketed one computes fewer token slots, and
    its micro-batches are cut to widths from the power-of-two grid."""
    bench = _load("update")
    lengths = bench.rl_lengths(64, 512)
    assert 40 <= np.median(lengths) <= 90 and lengths.max() == 512  # median about an eighth, some at the cap
    argv = ["update.py", "--compare", "--size", "tiny", "--rows", "16", "--prompt", "16", "--response", "128",
            "--micro", "4", "--tokens", "512", "--repeats", "1", "--rank", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    results = bench.compare(bench.build_parser().parse_args(argv[1:]))
    assert results["bucketed"]["token_slots"] < results["previous"]["token_slots"] == 16 * (16 + 128)
    assert all(width in (32, 64, 128) for _, width in results["bucketed"]["micro_batch_shapes"])
    assert "| seconds per update |" in capsys.readouterr().out

