"""Your own images: the paper's GRPO baseline (configs/cub_grpo.py) on a manifest of (image, label) rows
(docs/data.md), chosen on the command line alone:

    python -m speciarl_jax.train --config=configs/manifest.py:/data/train.jsonl --config.model.path=/models/qwen
    python -m speciarl_jax.train --config=configs/manifest.py:/data/train.jsonl,/data/test.jsonl ...

The second manifest, when given, is the held-out set evaluated before and after training. Every other
setting takes its usual command-line form (`--config.rl.algorithm=dapo`, `--config.data.batch_size=64`,
`--config.verifier.kind=rule --config.verifier.taxonomy_path=/data/taxonomy.json`, ...).
"""

from speciarl_jax.configs.cub_grpo import get_config as grpo


def get_config(manifests: str = ""):
    paths = [p for p in manifests.split(",") if p]
    if not 1 <= len(paths) <= 2:
        raise ValueError("configs/manifest.py needs the training manifest after a colon, and optionally the "
                         "held-out one after a comma: --config=configs/manifest.py:/data/train.jsonl[,/data/test.jsonl]")
    c = grpo()
    c.name = "manifest"
    c.data.source = dict(kind="manifest", path=paths[0])
    if len(paths) == 2:
        c.eval.enabled = True
        c.eval.source = dict(kind="manifest", path=paths[1])
    return c
