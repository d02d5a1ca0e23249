"""The paper's out-of-domain evaluation (docs/method.md, benchmarks and metrics): six fine-grained test sets,
greedy decoding, LLM verifier.

    python -m speciarl_jax.evaluate --config=configs/eval_benchmarks.py:/data \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct --config.model.adapter=runs/cub_grpo/checkpoints \
        --config.output_dir=runs/eval/cub_grpo --config.verifier.base_url=http://verifier:8000/v1

The argument is the data root, laid out as docs/data.md describes:
    <root>/tfds                       prepared TFDS data (caltech_birds2011, oxford_iiit_pet, cars196)
    <root>/fgvc-aircraft-2013b        the extracted FGVC-Aircraft archive
    <root>/coop/split_zhou_*.json     CoOp's split files, with the images under <root>/coop/<data set>/
Flowers102 and Food101 use CoOp's test splits (2,463 and 30,300 images) as the paper does; Pets' TFDS test
split is CoOp's. `--config.only=cub,pets` runs a subset; `--config.datasets.food.num_examples=2000` a random
sample of one data set.

The prompt: the paper's main table asks with the general prompt, the one the models were trained with. A
training checkpoint is asked with its own training prompt and system turn (`speciarl_jax.run_settings`); other
models with the general prompt. The "be specific" prompt is a separate study: `--config.prompt=specific`,
which the output and run.json then state as a change from training.
"""

from speciarl_jax.configs.common import paper_source
from speciarl_jax.evaluate import datasets_config, default_config

ORDER = "cub,aircraft,flowers,food,pets,cars"  # the paper's table order


def datasets(root: str) -> dict:
    return {name: paper_source(name, "test", root) for name in ORDER.split(",")}


def get_config(root: str = "/data"):
    config = default_config()
    config.output_dir = "runs/eval/benchmarks"
    config.datasets = datasets_config(datasets(root))
    config.only = ORDER
    # prompt and system_prompt stay unset: the run's own for a training checkpoint, else "general" and none.
    config.decoding.mode = "greedy"
    config.decoding.max_new_tokens = 2048
    config.decoding.batch_size = 64
    # The paper graded its evaluation with Llama-3-70B-Instruct served by vLLM (choice-constrained output).
    config.verifier.kind = "openai"
    config.verifier.model = "meta-llama/Meta-Llama-3-70B-Instruct"
    config.verifier.disable_thinking = False  # Llama has no thinking switch
    return config
