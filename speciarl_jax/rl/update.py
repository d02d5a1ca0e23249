"""The policy update: recompute rollout log-probabilities, then mini-batched optimizer steps with gradient
accumulation over micro-batches, all inside one jitted function per batch shape.

How the pieces fit (see docs/rl.md for the trainer's view):

    model (LoRA applied)  --nnx.split-->  graphdef, params (trainable: LoRAWeight, or base Params for full
                                          fine-tuning), frozen (everything else, never copied)
    TrainState(step, params, opt_state)   the only thing an optimizer step changes; donated to the step
    logprob_step(params, frozen, batch, use_adapters)   -> [B, R] log-probabilities (old policy or reference)
    train_step(state, frozen, batch)                     -> new state, per-optimizer-step metrics

Both step functions are pure: they merge the model from (graphdef, params, frozen) inside the trace. The
reference policy is the same merge with the adapters switched off (`lora.adapters_disabled`), or, for full
fine-tuning with a KL term, a copy of the initial trainable parameters.

`Learner` is the thin stateful wrapper a trainer uses: it owns the split model and the state, jits the two
steps once per shape (with fixed output shardings so later calls never recompile), and writes the new
trainable weights back into the model object, which the sampler keeps using.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from .. import buckets, parallel
from ..models import lora
from . import losses, micro_batches
from .batch import RolloutBatch, check_batch, to_device
from .logprobs import response_logprobs


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Loss, batching and optimizer settings of the update, plus the algorithm's rollout-side switches.

    Batch sizes count rollout rows. `mini_batch_size` rows make one optimizer step (None: the whole batch);
    `micro_batch_size` rows make one forward/backward whose gradients are accumulated (None: the mini-batch).
    """

    algorithm: str = "grpo"
    # advantages and rollout-side DAPO switches (read by the trainer)
    normalize_std: bool = True
    overlong_buffer: int | None = None  # None: no overlong shaping
    overlong_factor: float = 1.0
    dynamic_sampling: bool = False
    max_generation_batches: int = 10
    # loss
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_c: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    max_response_len: int | None = None  # T_max of `seq-mean-token-sum-norm`; None: the batch's response width
    # `seq-mean-token-sum-norm` as verl applies it: each micro-batch of this many rows per GPU (its
    # ppo_micro_batch_size_per_gpu; 32 in the paper) sums its token losses over T_max, and the micro-batches are
    # averaged (gradient accumulation, then the mean over GPUs). The loss is therefore
    # sum(L m) / (T_max x mini-batch rows / norm_micro_batch_rows) whatever our own micro-batching.
    norm_micro_batch_rows: int = 32
    kl_coef: float = 0.01
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0
    # batching
    mini_batch_size: int | None = None
    micro_batch_size: int | None = None
    ppo_epochs: int = 1
    shuffle: bool = False
    seed: int = 0
    # optimizer
    learning_rate: float = 3e-5
    lr_schedule: str = "constant"  # constant | linear | cosine (decays to 0 at total_steps)
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    # compute
    logprob_chunk: int = 512
    remat: bool = True
    # Tokens (rows x columns) one device runs in one forward/backward. Set: rows are grouped by response length
    # into micro-batches cut to their own width (`micro_batches`), micro_batch_size only caps their rows, and the
    # update's cost follows the real tokens. None: every micro-batch spans the batch's full width, as one program.
    micro_batch_tokens: int | None = None
    logprob_chunk_tokens: int = 2048  # the bucketed path's output-layer chunk, in tokens per device (see above)

    def __post_init__(self):
        losses._check_mode(self.loss_agg_mode, self.max_response_len or 1)
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"RLConfig.kl_coef ({self.kl_coef}) and entropy_coef ({self.entropy_coef}) must be >= 0.")
        losses.canonical_kl_kind(self.kl_kind)
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(
                f"RLConfig needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low} / {self.eps_high}.")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError(f"RLConfig.clip_c must be > 1 or None, got {self.clip_c}.")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"RLConfig.lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}.")
        if self.lr_schedule != "constant" and not self.total_steps:
            raise ValueError(f"RLConfig.lr_schedule={self.lr_schedule!r} decays to 0 at total_steps; set total_steps.")
        for key in ("mini_batch_size", "micro_batch_size", "max_response_len", "overlong_buffer", "micro_batch_tokens",
                    "norm_micro_batch_rows"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"RLConfig.{key} must be >= 1 or None, got {value}.")
        if self.ppo_epochs < 1 or self.logprob_chunk < 1:
            raise ValueError(
                f"RLConfig.ppo_epochs ({self.ppo_epochs}) and logprob_chunk ({self.logprob_chunk}) must be >= 1.")

    @property
    def uses_kl(self) -> bool:
        return self.kl_coef > 0


# Algorithm presets (docs/method.md, the update). Everything else keeps the RLConfig defaults (the paper's optimizer).
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(normalize_std=True, loss_agg_mode="token-mean", kl_coef=0.01, kl_kind="low_var_kl",
                 eps_low=0.2, eps_high=0.2, clip_c=3.0),
    "drgrpo": dict(normalize_std=False, loss_agg_mode="seq-mean-token-sum-norm", kl_coef=0.0,
                   eps_low=0.2, eps_high=0.2, clip_c=3.0),
    "dapo": dict(normalize_std=True, loss_agg_mode="token-mean", kl_coef=0.0, eps_low=0.2, eps_high=0.28,
                 clip_c=10.0, overlong_buffer=512, overlong_factor=1.0, dynamic_sampling=True,
                 max_generation_batches=10),
}


def preset(algorithm: str, **overrides) -> RLConfig:
    """RLConfig for `grpo`, `drgrpo` or `dapo`, with any field overridden by keyword."""
    if algorithm not in PRESETS:
        raise ValueError(f"Unknown algorithm {algorithm!r}; presets exist for {sorted(PRESETS)}.")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(RLConfig)}
    if unknown:
        raise ValueError(f"RLConfig has no field(s) {sorted(unknown)}.")
    return RLConfig(**{**PRESETS[algorithm], "algorithm": algorithm, **overrides})


def learning_rate_schedule(config: RLConfig) -> optax.Schedule:
    peak = config.learning_rate
    decay_steps = max((config.total_steps or 1) - config.warmup_steps, 1)
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.lr_schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: RLConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay applies to matrices only (adapters, kernels), not to
    biases or norm scales."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


@struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any  # nnx.State of the trainable variables
    opt_state: Any


# ---------------------------------------------------------------------------------------------------------------
# The loss of one micro-batch


def micro_batch_loss(model, batch: RolloutBatch, config: RLConfig, totals: dict, num_micro: int,
                     chunk: int | None = None):
    """This micro-batch's share of the mini-batch loss, and its share of the metrics.

    `totals` holds the mini-batch's masked `tokens` and non-empty `rows`; the shares are chosen so that summing
    over the micro-batches gives the mini-batch's aggregate (see losses.aggregation_share).
    """
    logp, entropy = response_logprobs(model, batch, chunk or config.logprob_chunk)
    mask = batch.response_mask.astype(jnp.float32)
    # T_max: configured, or the whole batch's response width (a micro-batch cut narrower passes it in totals).
    mode, max_len = config.loss_agg_mode, config.max_response_len or totals.get("max_len", mask.shape[1])
    share = losses.aggregation_share(mask, totals["tokens"], totals["rows"], num_micro, mode)
    token_share = mask.sum() / jnp.maximum(totals["tokens"], 1.0)

    pg_loss, pg_metrics = losses.policy_loss(
        logp, batch.old_logprobs, batch.advantages, mask, config.eps_low, config.eps_high, config.clip_c, mode, max_len,
    )
    loss = pg_loss
    metrics = {name: value * token_share for name, value in pg_metrics.items()}
    metrics["pg_loss"] = pg_loss * share
    if config.uses_kl:
        kl = losses.aggregate(losses.kl_penalty(logp, batch.ref_logprobs, config.kl_kind), mask, mode, max_len)
        loss = loss + config.kl_coef * kl
        metrics["kl_loss"] = kl * share
    entropy_agg = losses.aggregate(entropy, mask, mode, max_len)
    if config.entropy_coef > 0:
        loss = loss - config.entropy_coef * entropy_agg
    metrics["entropy"] = losses.aggregate(jax.lax.stop_gradient(entropy), mask, "token-mean") * token_share
    metrics["loss"] = loss * share
    return loss * share, metrics


# ---------------------------------------------------------------------------------------------------------------
# Pure step functions


def _split_rows(batch: RolloutBatch, *shape) -> RolloutBatch:
    """Reshape the row axis of every per-row field into `shape` (leading), keeping the order of rows.

    The shared image table is dropped from the result (it has no row axis, so it cannot be scanned over);
    `_restore_row_axis` puts it back into each piece.
    """
    def split(x, axis):
        x = jnp.moveaxis(x, axis, 0)
        return x.reshape(shape + x.shape[1:])

    return batch.rows(split).replace(image_features=None)


def _restore_row_axis(piece: RolloutBatch, image_features) -> RolloutBatch:
    """A piece cut by `_split_rows` with position_ids back to [3, rows, T] and the shared image table attached."""
    return piece.replace(position_ids=jnp.moveaxis(piece.position_ids, 0, 1), image_features=image_features)


def norm_parts(config: RLConfig, mini_rows: int) -> float:
    """How many reference micro-batches `seq-mean-token-sum-norm` averages over in a mini-batch of `mini_rows`
    (at least one)."""
    return max(1.0, mini_rows / config.norm_micro_batch_rows)


def _batch_sizes(config: RLConfig, rows: int) -> tuple[int, int]:
    mini = config.mini_batch_size or rows
    micro = config.micro_batch_size or mini
    if rows % mini:
        raise ValueError(f"The batch has {rows} rows, not a multiple of RLConfig.mini_batch_size={mini}.")
    if mini % micro:
        raise ValueError(f"RLConfig.mini_batch_size={mini} is not a multiple of micro_batch_size={micro}.")
    return rows // mini, mini // micro


def _spread_rows(batch: RolloutBatch, row_axis: int, mesh) -> RolloutBatch:
    """Shard axis `row_axis` (rows, after `_split_rows`) over the mesh's batch axes, so that every micro-batch is
    spread over the devices rather than sitting on a few of them after the reshape."""
    if mesh is None:
        return batch

    def put(x, _):
        names = [None] * x.ndim
        names[row_axis] = "batch"
        spec = parallel.logical_to_spec(tuple(names), x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return batch.rows(put)


def metric_names(config: RLConfig) -> tuple[str, ...]:
    """The per-micro-batch metrics `micro_batch_loss` returns, in a fixed order."""
    names = ("clip_fraction", "approx_kl", "ratio_mean", "dual_clip_fraction", "pg_loss", "entropy", "loss")
    return names + (("kl_loss",) if config.uses_kl else ())


def make_train_step(graphdef, config: RLConfig, tx: optax.GradientTransformation, mesh=None):
    """A pure function (state, frozen, batch) -> (new state, metrics of each optimizer step [num_steps]).

    The batch must carry old_logprobs (and ref_logprobs when the KL term is on). Rows are taken in order,
    mini-batch k being rows [k M, (k + 1) M), unless config.shuffle permutes them (seeded by the step).
    """

    def train_step(state: TrainState, frozen, batch: RolloutBatch):
        if batch.old_logprobs is None:
            raise ValueError("train_step needs batch.old_logprobs; Learner.step recomputes them when absent.")
        if config.uses_kl and batch.ref_logprobs is None:
            raise ValueError("The KL term is on (kl_coef > 0) but batch.ref_logprobs is missing.")
        rows = batch.num_rows
        num_mini, num_micro = _batch_sizes(config, rows)
        micro = rows // (num_mini * num_micro)

        def mini_step(state: TrainState, mini_batch):
            mask = mini_batch.response_mask.astype(jnp.float32)  # [num_micro, micro, R]
            totals = {"tokens": mask.sum(), "rows": (mask.sum(-1) > 0).sum().astype(jnp.float32)}

            def micro_step(carry, micro_batch):
                def loss_fn(params):
                    model = nnx.merge(graphdef, params, frozen, copy=True)
                    return micro_batch_loss(model, _restore_row_axis(micro_batch, batch.image_features), config, totals,
                                            norm_parts(config, rows // num_mini))

                (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
                return jax.tree.map(jnp.add, carry, (grads, metrics)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.float32(0) for k in metric_names(config)})
            (grads, metrics), _ = jax.lax.scan(micro_step, zeros, mini_batch)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics.update(grad_norm=grad_norm, tokens=totals["tokens"])
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

        all_metrics = []
        for epoch in range(config.ppo_epochs):
            epoch_batch = batch
            if config.shuffle:
                key = jax.random.fold_in(jax.random.key(config.seed), state.step * config.ppo_epochs + epoch)
                order = jax.random.permutation(key, rows)
                epoch_batch = batch.rows(lambda x, axis: jnp.take(x, order, axis=axis))
            split = _spread_rows(_split_rows(epoch_batch, num_mini, num_micro, micro), 2, mesh)
            state, metrics = jax.lax.scan(mini_step, state, split)
            all_metrics.append(metrics)
        metrics = jax.tree.map(lambda *m: jnp.concatenate(m), *all_metrics)
        return state, metrics

    return train_step


def make_logprob_step(graphdef, config: RLConfig, mesh=None):
    """A pure function (params, frozen, batch, use_adapters) -> log-probabilities [B, R] of the response tokens.

    Runs forward only, in micro-batches of config.micro_batch_size rows (or the mini-batch size). With
    use_adapters=False the LoRA adapters are off: the reference policy. `use_adapters` is static.
    """

    def logprob_step(params, frozen, batch: RolloutBatch, use_adapters: bool = True):
        rows = batch.num_rows
        size = config.micro_batch_size or config.mini_batch_size or rows
        if rows % size:
            raise ValueError(f"The batch has {rows} rows, not a multiple of the micro-batch size {size}.")
        chunks = _spread_rows(_split_rows(batch, rows // size, size), 1, mesh)

        def one(micro_batch):
            model = nnx.merge(graphdef, params, frozen, copy=True)
            micro_batch = _restore_row_axis(micro_batch, batch.image_features)
            if use_adapters:
                return response_logprobs(model, micro_batch, config.logprob_chunk)[0]
            with lora.adapters_disabled(model):
                return response_logprobs(model, micro_batch, config.logprob_chunk)[0]

        logp = jax.lax.map(one, chunks)
        return logp.reshape(rows, -1)

    return logprob_step


def bucketed_chunk(config: RLConfig, rows: int, shards: int = 1) -> int:
    """Output-layer positions per chunk for a micro-batch of `rows` rows over `shards` devices: about
    `logprob_chunk_tokens` tokens per device, so a [tokens, vocab] float32 block stays the same size whether a
    micro-batch holds many short rows or a few long ones."""
    return max(1, config.logprob_chunk_tokens // max(1, rows // shards))


# The mini-batch scalars `make_accumulate_step` reads (see there).
TOTALS = ("tokens", "rows", "num_micro", "max_len")


def abstract_totals() -> dict:
    return {k: jax.ShapeDtypeStruct((), np.float32) for k in TOTALS}


def make_accumulate_step(graphdef, config: RLConfig, shards: int = 1):
    """A pure function (acc, params, frozen, micro_batch, totals) -> acc + (gradients, metrics) of the micro-batch.

    The bucketed update (`RLConfig.micro_batch_tokens`) runs it once per micro-batch, each cut to its own width
    (one program per width bucket), then `make_apply_step` once per optimizer step. `totals` holds the
    mini-batch's `tokens`, `rows`, `num_micro` and `max_len` (its full response width) as scalars.
    """

    def accumulate(acc, params, frozen, batch: RolloutBatch, totals):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen, copy=True)
            chunk = bucketed_chunk(config, batch.num_rows, shards)
            return micro_batch_loss(model, batch, config, totals, totals["num_micro"], chunk)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(jnp.add, acc, (grads, metrics))

    return accumulate


def make_apply_step(tx: optax.GradientTransformation):
    """A pure function (state, (gradients, metrics)) -> (new state, metrics with grad_norm): one optimizer step."""

    def apply(state: TrainState, acc):
        grads, metrics = acc
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), dict(
            metrics, grad_norm=optax.tree.norm(grads))

    return apply


def make_rows_logprobs(graphdef, config: RLConfig, shards: int = 1):
    """A pure function (params, frozen, micro_batch, use_adapters) -> [rows, R] log-probabilities, in one pass."""

    def logprobs(params, frozen, batch: RolloutBatch, use_adapters: bool = True):
        model = nnx.merge(graphdef, params, frozen, copy=True)
        chunk = bucketed_chunk(config, batch.num_rows, shards)
        if use_adapters:
            return response_logprobs(model, batch, chunk)[0]
        with lora.adapters_disabled(model):
            return response_logprobs(model, batch, chunk)[0]

    return logprobs


# ---------------------------------------------------------------------------------------------------------------
# The stateful wrapper the trainer uses


class Learner:
    """Owns the split policy, the optimizer state and the compiled steps.

    Args:
      model: the policy (LoRA already applied with `lora.apply_lora`, or not, for full fine-tuning); loaded
        sharded on `mesh` if one is given. It stays usable (e.g. by the sampler) and always holds the latest
        trainable weights after `step`.
      config: an RLConfig (see `preset`).
      trainable: nnx filter of the trained variables; default `lora.LoRAWeight` when the model has adapters,
        else every parameter of the language model and lm_head (full fine-tuning).
      mesh: the device mesh; rows are sharded over its batch axes.
      compiler_options: passed to jax.jit for both steps (e.g. {"xla_backend_optimization_level": 0} makes
        CPU compilation of small test models faster).
    """

    def __init__(self, model, config: RLConfig, *, trainable=None, mesh=None, compiler_options=None):
        self.config = config
        self.mesh = mesh
        self.high_water = buckets.HighWater()
        adapted = [name for name, _ in lora.lora_layers(model)]
        self.has_adapters = bool(adapted)
        in_vision = [name for name in adapted if name.startswith("visual.")]
        if in_vision:
            # The update reads precomputed image features, so these adapters would never get a gradient.
            raise ValueError(f"The update keeps the vision tower frozen, but {in_vision[:3]} hold LoRA adapters; "
                             "exclude visual.* from LoRAConfig.targets.")
        if trainable is None:
            trainable = lora.LoRAWeight if self.has_adapters else lora.trainable_filter(lora.LoRAConfig(rank=0))
        if hasattr(model, "language_model") and hasattr(model.language_model, "remat"):
            model.language_model.remat = config.remat  # gradient checkpointing: recompute each block's activations
        self.model = model
        self.graphdef, params, self.frozen = nnx.split(model, trainable, ...)
        if not jax.tree.leaves(params):
            raise ValueError("The trainable filter selects no variables of the model.")
        self.tx = make_optimizer(config)
        # Copies, so the model's own arrays survive the donation of the first state.
        params = jax.tree.map(jnp.copy, params)
        self.uses_adapter_reference = self.has_adapters and trainable is lora.LoRAWeight
        # Full fine-tuning needs its own frozen reference weights for the KL term.
        self.reference = None
        if config.uses_kl and not self.uses_adapter_reference:
            self.reference = jax.tree.map(jnp.copy, params)
        opt_state = self.tx.init(params)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
        state_shardings = None
        if mesh is not None:
            # Arrays without a mesh placement (step counters) are replicated; the rest keep their split.
            replicated = NamedSharding(mesh, PartitionSpec())
            state_shardings = jax.tree.map(
                lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
            # Built from the host value: device_put of a one-device array onto devices of several processes
            # gives an array whose shards orbax cannot read (a checkpoint before the first step failed so).
            state = jax.tree.map(
                lambda x, s: x if x.sharding == s else jax.make_array_from_callback(
                    x.shape, s, lambda index, value=np.asarray(x): value[index]), state, state_shardings)
        self.state = state
        self._state_shardings = state_shardings
        self._train_step = jax.jit(
            make_train_step(self.graphdef, config, self.tx, mesh), donate_argnums=(0,),
            out_shardings=(state_shardings, None) if mesh is not None else None, compiler_options=compiler_options,
        )
        self._logprob_step = jax.jit(make_logprob_step(self.graphdef, config, mesh), static_argnums=(3,),
                                     compiler_options=compiler_options)
        # The bucketed path: one program per micro-batch shape, gradients accumulated in place.
        shards = parallel.batch_shards(mesh)
        replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        acc_shardings = None if mesh is None else (
            state_shardings.params, {k: replicated for k in metric_names(config)})
        self._zero_acc = jax.jit(
            lambda params: (jax.tree.map(jnp.zeros_like, params), {k: jnp.float32(0) for k in metric_names(config)}),
            out_shardings=acc_shardings)
        self._accumulate = jax.jit(make_accumulate_step(self.graphdef, config, shards), donate_argnums=(0,),
                                   out_shardings=acc_shardings, compiler_options=compiler_options)
        self._apply = jax.jit(make_apply_step(self.tx), donate_argnums=(0,),
                              out_shardings=(state_shardings, None) if mesh is not None else None,
                              compiler_options=compiler_options)
        self._rows_logprobs = jax.jit(make_rows_logprobs(self.graphdef, config, shards), static_argnums=(3,),
                                      compiler_options=compiler_options)

    # -- pure functions, for callers that keep their own state --
    @property
    def train_step(self):
        """jitted (state, frozen, batch) -> (state, metrics); donates `state`."""
        return self._train_step

    @property
    def logprob_step(self):
        """jitted (params, frozen, batch, use_adapters) -> [B, R] log-probabilities."""
        return self._logprob_step

    def place(self, batch: RolloutBatch, check: bool = True) -> RolloutBatch:
        """Check shapes and move a host batch onto the devices, rows split over the mesh's batch axes."""
        if check:
            check_batch(batch)
        if self.mesh is None:
            return to_device(batch)

        def sharding_for(value, row_axis):
            names = [None] * np.ndim(value)
            if row_axis is not None:
                names[row_axis] = "batch"
            return parallel.named_sharding(tuple(names), np.shape(value), self.mesh)

        return to_device(batch, sharding_for)

    def rollout_logprobs(self, batch: RolloutBatch, *, reference: bool = False) -> jax.Array:
        """[B, R] log-probabilities of the responses under the current policy, or the reference policy."""
        batch = self.place(batch)
        if not reference:
            return self._logprob_step(self.state.params, self.frozen, batch, True)
        if self.uses_adapter_reference:
            return self._logprob_step(self.state.params, self.frozen, batch, False)
        if self.reference is None:
            raise ValueError("No reference policy: full fine-tuning keeps one only when kl_coef > 0.")
        return self._logprob_step(self.reference, self.frozen, batch, True)

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """One update on a rollout batch: fills in old (and reference) log-probabilities if missing, runs the
        optimizer steps, writes the new weights into the model. Returns metrics averaged over the optimizer
        steps (`tokens` summed, `optimizer_steps` counted, `learning_rate` of the last step)."""
        if self.config.micro_batch_tokens:
            return self._bucketed_step(batch)
        batch = self.place(batch)
        if batch.old_logprobs is None:
            batch = batch.replace(old_logprobs=self.rollout_logprobs(batch))
        if self.config.uses_kl and batch.ref_logprobs is None:
            batch = batch.replace(ref_logprobs=self.rollout_logprobs(batch, reference=True))
        steps_before = int(self.state.step)
        self.state, metrics = self._train_step(self.state, self.frozen, batch)
        nnx.update(self.model, self.state.params)
        out = {k: float(np.sum(v)) if k == "tokens" else float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        out["optimizer_steps"] = int(self.state.step) - steps_before
        out["learning_rate"] = float(learning_rate_schedule(self.config)(int(self.state.step) - 1))
        return out

    # -- the bucketed path (RLConfig.micro_batch_tokens) --

    def plan(self, response_lengths, prompt_columns: int, response_columns: int):
        """The micro-batches of these rows (see `micro_batches.plan`), with this learner's budget and mesh."""
        return micro_batches.plan(response_lengths, prompt_columns, response_columns,
                                  token_budget=self.config.micro_batch_tokens, shards=parallel.batch_shards(self.mesh),
                                  max_rows=self.config.micro_batch_size)

    def _piece(self, host: RolloutBatch, rows: np.ndarray, micro: micro_batches.MicroBatch, table) -> RolloutBatch:
        """Rows `rows[micro.rows]` of a host batch cut to the micro-batch's width, on the devices."""
        index = rows[micro.rows]
        width = micro.response_width
        keep = host.input_ids.shape[1] - host.response_len + width
        real = (np.arange(len(index)) < micro.real)[:, None]

        def cut(value, axis):
            value = np.take(value, index, axis=axis)
            if value.ndim == 1:
                return value
            if axis == 1:  # position_ids [3, rows, T]
                return value[:, :, :keep]
            columns = keep if value.shape[1] == host.input_ids.shape[1] else width
            return value[:, :columns]

        piece = host.replace(image_features=None).rows(cut)
        piece = piece.replace(response_mask=piece.response_mask * real)  # padding rows count nowhere
        return self.place(piece, check=False).replace(image_features=table)  # the whole batch was checked

    def _image_table(self, table):
        """The batch's image-feature table, rows padded to a bucket, placed once for all micro-batches (replicated)."""
        if table is None:
            return None
        rows = self.high_water("image_tokens", buckets.power_of_two(max(table.shape[0], 64)))
        if rows != table.shape[0]:  # a table the sampler gave is bucketed already; others are padded here
            table = np.asarray(table)
            table = np.pad(table, ((0, rows - table.shape[0]), (0, 0)))
        return jax.device_put(table, None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec()))

    def _bucketed_logprobs(self, host: RolloutBatch, table, params, use_adapters: bool) -> np.ndarray:
        rows = np.arange(host.num_rows)
        prompt_columns = host.input_ids.shape[1] - host.response_len
        out = np.zeros(np.shape(host.response_mask), np.float32)
        for micro in self.plan(np.asarray(host.response_mask).sum(1), prompt_columns, host.response_len):
            logp = self._rows_logprobs(params, self.frozen, self._piece(host, rows, micro, table), use_adapters)
            out[micro.rows[:micro.real], :micro.response_width] = parallel.to_host(logp)[:micro.real]
        return out

    def _bucketed_step(self, batch: RolloutBatch) -> dict[str, float]:
        check_batch(batch)
        table = self._image_table(batch.image_features)
        host = jax.tree.map(parallel.to_host, batch.replace(image_features=None))
        if host.old_logprobs is None:
            host = host.replace(old_logprobs=self._bucketed_logprobs(host, table, self.state.params, True))
        if self.config.uses_kl and host.ref_logprobs is None:
            if self.uses_adapter_reference:
                ref = self._bucketed_logprobs(host, table, self.state.params, False)
            elif self.reference is not None:
                ref = self._bucketed_logprobs(host, table, self.reference, True)
            else:
                raise ValueError("No reference policy: full fine-tuning keeps one only when kl_coef > 0.")
            host = host.replace(ref_logprobs=ref)

        rows = host.num_rows
        mini = self.config.mini_batch_size or rows
        if rows % mini:
            raise ValueError(f"The batch has {rows} rows, not a multiple of RLConfig.mini_batch_size={mini}.")
        num_mini = rows // mini
        prompt_columns = host.input_ids.shape[1] - host.response_len
        lengths = np.asarray(host.response_mask).sum(1)
        steps_before = int(self.state.step)
        all_metrics = []
        for epoch in range(self.config.ppo_epochs):
            order = np.arange(rows)
            if self.config.shuffle:
                order = np.random.default_rng([self.config.seed, steps_before, epoch]).permutation(rows)
            for k in range(num_mini):
                members = order[k * mini:(k + 1) * mini]
                plan = self.plan(lengths[members], prompt_columns, host.response_len)
                mask = np.asarray(host.response_mask)[members]
                # seq-mean-token-sum-norm: the scale of verl's micro-batches, whatever the length grouping made.
                totals = {"tokens": np.float32(mask.sum()), "rows": np.float32((mask.sum(-1) > 0).sum()),
                          "num_micro": np.float32(norm_parts(self.config, mini)),
                          "max_len": np.float32(host.response_len)}
                acc = self._zero_acc(self.state.params)
                for micro in plan:
                    acc = self._accumulate(acc, self.state.params, self.frozen,
                                           self._piece(host, members, micro, table), totals)
                self.state, metrics = self._apply(self.state, acc)
                metrics["tokens"] = totals["tokens"]
                all_metrics.append(metrics)
        nnx.update(self.model, self.state.params)
        metrics = jax.device_get(all_metrics)
        out = {k: float(np.sum([m[k] for m in metrics])) if k == "tokens" else float(np.mean([m[k] for m in metrics]))
               for k in metrics[0]}
        out["optimizer_steps"] = int(self.state.step) - steps_before
        out["learning_rate"] = float(learning_rate_schedule(self.config)(int(self.state.step) - 1))
        return out

    def set_state(self, state: TrainState) -> None:
        """Adopt a state (e.g. restored from a checkpoint): placed like the initial one, so the compiled step is
        reused, and written into the model."""
        if self._state_shardings is not None:
            state = jax.device_put(state, self._state_shardings)
        self.state = state
        nnx.update(self.model, state.params)

    def trainable_state(self):
        """The trainable variables (adapters under LoRA): what an adapter checkpoint needs to hold."""
        return self.state.params
