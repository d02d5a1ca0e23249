"""Policy optimisation: group-relative advantages, PPO-style clipped losses, DAPO extras and the jitted update.

Modules: `advantages` (GRPO / Dr.GRPO advantages), `losses` (ratio clipping, aggregation modes, KL estimators),
`dapo` (overlong shaping, dynamic sampling), `logprobs` (per-token log-probabilities of rollouts),
`update` (configuration presets and the `Learner` that runs mini- and micro-batched optimizer steps).
"""
