"""Best-of-N on the paper's six test sets (docs/method.md, benchmarks and metrics): N = 64 samples per image at
temperature 0.6 and top-p 0.95; each image keeps its best-ranked answer. Reports also pool all samples ("per-sample").

    python -m speciarl_jax.evaluate --config=configs/eval_best_of_n.py:/data \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct --config.output_dir=runs/eval/base_bo64

`--config.decoding.n=16` for a cheaper run. Rows per generation batch are batch_size x n.
"""

from speciarl_jax.configs.eval_benchmarks import get_config as benchmarks


def get_config(root: str = "/data"):
    config = benchmarks(root)
    config.output_dir = "runs/eval/best_of_64"
    config.decoding.mode = "best_of_n"
    config.decoding.n = 64
    config.decoding.temperature = 0.6
    config.decoding.top_p = 0.95
    config.decoding.batch_size = 4
    return config
