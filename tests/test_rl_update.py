"""The update: rollout log-probabilities (with images), gradient accumulation, sharding over 8 fake devices,
full fine-tuning, and the errors a malformed batch or configuration raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from speciarl_jax import parallel
from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import Qwen25VL, from_pretrained, get_position_ids
from speciarl_jax.rl import update
from speciarl_jax.rl.batch import check_batch, make_rollout_batch
from test_model_parity import random_image

LORA = lora.LoRAConfig(rank=4, alpha=8.0)
FAST = {"xla_backend_optimization_level": 0}  # quicker CPU compiles for the tiny model


def adapted_model(path, mesh=None):
    model = from_pretrained(path, mesh=mesh)
    lora.apply_lora(model, LORA)
    return model


def text_batch(config, rows=8, samples=4, response=6, seed=0):
    """`rows` rollouts of rows // samples left-padded text prompts, random responses of random lengths."""
    rng = np.random.default_rng(seed)
    prompts = rows // samples
    ids = rng.integers(20, 300, (prompts, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    responses = rng.integers(20, 300, (rows, response))
    lengths = rng.integers(1, response + 1, rows)
    lengths[-1] = 0  # an empty response row: it must not count anywhere
    response_mask = (np.arange(response)[None] < lengths[:, None]).astype(np.int32)
    advantages = rng.normal(size=rows).astype(np.float32)
    return make_rollout_batch(config, {"input_ids": ids, "attention_mask": mask}, responses, response_mask,
                              advantages, num_samples=samples)


def test_rollout_logprobs_with_images_match_a_full_forward(tiny_checkpoint, tiny_processor):
    """Two image prompts x 2 samples. The shared image table is random (the vision tower is not under test):
    what matters is that every rollout's image tokens read its prompt's rows of the table."""
    model = adapted_model(tiny_checkpoint)
    for i, (_, layer) in enumerate(lora.lora_layers(model)):  # adapters that matter
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    images = [random_image(0, 56, 84), random_image(1, 84, 84)]
    texts = [tiny_processor.chat_prompt("What is it?", 1), tiny_processor.chat_prompt("Which bird?", 1)]
    prompts = tiny_processor(texts, images=images)
    samples, response = 2, 5
    rng = np.random.default_rng(1)
    responses = rng.integers(20, 300, (4, response))
    response_mask = (np.arange(response)[None] < np.array([5, 3, 1, 4])[:, None]).astype(np.int32)
    per_prompt = (prompts["input_ids"] == model.config.image_token_id).sum(1)
    table = rng.normal(size=(per_prompt.sum() + 3, 64)).astype(np.float32)  # 3 rows of bucket padding
    batch = make_rollout_batch(model.config, prompts, responses, response_mask, np.zeros(4), num_samples=samples,
                               image_features=table, pad_token_id=tiny_processor.pad_token_id)
    learner = update.Learner(model, update.RLConfig(micro_batch_size=2, logprob_chunk=2), compiler_options=FAST)
    got = np.asarray(learner.rollout_logprobs(batch))
    reference = np.asarray(learner.rollout_logprobs(batch, reference=True))

    # The oracle: positions from the full token rows, image features copied out for every rollout in order.
    row_grids = np.repeat(np.asarray(prompts["image_grid_thw"]), samples, axis=0)
    positions, _ = get_position_ids(batch.input_ids, batch.attention_mask, row_grids, config=model.config)
    live = batch.attention_mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(batch.position_ids)[:, live], positions[:, live])
    starts = np.concatenate([[0], np.cumsum(per_prompt)[:-1]])
    row_features = np.concatenate([table[starts[r // samples] : starts[r // samples] + per_prompt[r // samples]]
                                   for r in range(4)])
    graphdef, state = nnx.split(model)

    @jax.jit
    def oracle(state):
        m = nnx.merge(graphdef, state)
        forward = lambda: m(batch.input_ids, batch.attention_mask, position_ids=positions,  # noqa: E731
                            image_features=jnp.asarray(row_features)).logits
        on = forward()
        with lora.adapters_disabled(m):
            off = forward()
        t = batch.input_ids.shape[1]
        targets = batch.input_ids[:, t - response :, None]
        pick = lambda logits: jnp.take_along_axis(  # noqa: E731
            jax.nn.log_softmax(logits[:, t - response - 1 : t - 1]), targets, -1)[..., 0]
        return pick(on), pick(off)

    expected, expected_reference = map(np.asarray, oracle(state))
    on = response_mask.astype(bool)
    np.testing.assert_allclose(got[on], expected[on], atol=2e-5)
    np.testing.assert_allclose(reference[on], expected_reference[on], atol=2e-5)
    assert np.abs(got - reference)[on].max() > 1e-3

    # The bucketed path: rows sorted by length into two micro-batches of two rows (a budget of two rows), the
    # table padded to its bucket, output-layer chunks of 3 tokens; the same log-probabilities.
    prompt_columns = batch.input_ids.shape[1] - response
    bucketed = update.Learner(model, update.RLConfig(micro_batch_tokens=2 * (prompt_columns + response),
                                                     logprob_chunk_tokens=3), compiler_options=FAST)
    plan = bucketed.plan(response_mask.sum(1), prompt_columns, response)
    assert [m.real for m in plan] == [2, 2] and sorted(plan[0].rows) == [0, 3]  # the longest two first
    table = bucketed._image_table(batch.image_features)
    for use_adapters, oracle_values in ((True, expected), (False, expected_reference)):
        values = bucketed._bucketed_logprobs(batch, table, bucketed.state.params, use_adapters)
        np.testing.assert_allclose(values[on], oracle_values[on], atol=1e-4)


def _updated(model, config, batch, mesh=None):
    learner = update.Learner(model, config, mesh=mesh, compiler_options=FAST)
    metrics = learner.step(batch)
    params = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(learner.state.params)}
    return learner, metrics, params


def test_eight_devices_with_accumulation_give_the_same_update_as_one_device(tiny_checkpoint):
    """8 rows, mini-batches of 4 (two optimizer steps). On one device the mini-batch runs as two accumulated
    micro-batches of 2; on a data=1 x fsdp=4 x tensor=2 mesh as one micro-batch of 4 rows split over the
    devices. Same loss parts, gradient norms and adapters: both the accumulation and the sharding preserve the
    update. The GRPO preset's KL term and an entropy bonus are on."""
    settings = dict(mini_batch_size=4, learning_rate=1e-2, logprob_chunk=4, remat=False, entropy_coef=0.01)
    model = adapted_model(tiny_checkpoint)
    rng = np.random.default_rng(5)
    # Old and reference log-probabilities given, as a trainer may pass them: only the train step compiles.
    batch = text_batch(model.config).replace(old_logprobs=rng.normal(-6.3, 0.2, (8, 6)).astype(np.float32),
                                             ref_logprobs=rng.normal(-6.3, 0.2, (8, 6)).astype(np.float32))
    learner, metrics, params = _updated(model, update.preset("grpo", micro_batch_size=2, **settings), batch)
    assert metrics["optimizer_steps"] == 2
    assert metrics["tokens"] == float(batch.response_mask.sum())
    assert 0 < metrics["grad_norm"] and np.isfinite(metrics["loss"]) and metrics["kl_loss"] >= 0
    # The model object now computes with the updated adapters.
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, lora.LoRAWeight))}
    for name, value in params.items():
        np.testing.assert_array_equal(after[name], value)
    assert any(np.abs(v).max() > 0 for k, v in params.items() if k.endswith("lora_b"))

    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sharded_model = adapted_model(tiny_checkpoint, mesh=mesh)
    sharded_learner, sharded_metrics, sharded_params = _updated(
        sharded_model, update.preset("grpo", micro_batch_size=4, **settings), batch, mesh=mesh)
    trained = dict(nnx.to_flat_state(sharded_learner.state.params))
    up_a = trained[("language_model", "layers", 0, "mlp", "up_proj", "lora_a")]
    assert len(up_a[...].sharding.device_set) == 8
    for key in ("loss", "pg_loss", "kl_loss", "entropy", "clip_fraction", "grad_norm"):
        assert sharded_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    for name in params:
        np.testing.assert_allclose(sharded_params[name], params[name], rtol=1e-4, atol=2e-5)
    # A second step reuses the compiled program (same shapes, same shardings).
    sharded_learner.step(batch)
    assert sharded_learner.train_step._cache_size() == 1


def test_full_finetuning_trains_the_language_model_against_a_frozen_copy(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint)
    vision_before = np.asarray(model.visual.blocks[0].attn.qkv.kernel[...])
    head_before = np.asarray(model.lm_head.kernel[...])
    batch = text_batch(model.config, rows=4, samples=2)
    config = update.preset("grpo", learning_rate=1e-3, remat=False, shuffle=True)
    learner = update.Learner(model, config, compiler_options=FAST)
    reference_before = np.asarray(learner.rollout_logprobs(batch, reference=True))
    metrics = learner.step(batch)
    assert metrics["optimizer_steps"] == 1 and np.isfinite(metrics["loss"])
    assert np.abs(np.asarray(model.lm_head.kernel[...]) - head_before).max() > 0
    np.testing.assert_array_equal(np.asarray(model.visual.blocks[0].attn.qkv.kernel[...]), vision_before)
    np.testing.assert_array_equal(np.asarray(learner.rollout_logprobs(batch, reference=True)), reference_before)
    assert np.abs(np.asarray(learner.rollout_logprobs(batch)) - reference_before).max() > 0


def test_malformed_batches_and_sizes_are_named(tiny_checkpoint):
    model = adapted_model(tiny_checkpoint)
    batch = text_batch(model.config)
    with pytest.raises(ValueError, match=r"RolloutBatch.old_logprobs has shape \(8, 3\), expected \(8, 6\)"):
        check_batch(batch.replace(old_logprobs=np.zeros((8, 3))))
    with pytest.raises(ValueError, match="RolloutBatch.advantages"):
        check_batch(batch.replace(advantages=np.zeros(7)))
    with pytest.raises(ValueError, match="image_features and image_offsets go together"):
        check_batch(batch.replace(image_features=np.zeros((4, 64))))
    with pytest.raises(ValueError, match="2 prompts x 4 samples need 8 response rows"):
        make_rollout_batch(model.config, {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3))},
                           np.ones((6, 2)), np.ones((6, 2)), np.zeros(6), num_samples=4)
    learner = update.Learner(model, update.RLConfig(mini_batch_size=3, kl_coef=0.0))
    with pytest.raises(ValueError, match="not a multiple of RLConfig.mini_batch_size=3"):
        learner.step(batch.replace(old_logprobs=np.zeros((8, 6), np.float32)))
    vision_adapted = from_pretrained(tiny_checkpoint)
    lora.apply_lora(vision_adapted, lora.LoRAConfig(rank=2, targets=(r"visual\.merger\..*",), excludes=()))
    with pytest.raises(ValueError, match="keeps the vision tower frozen"):
        update.Learner(vision_adapted, update.RLConfig())
    with pytest.raises(ValueError, match="selects no variables"):
        update.Learner(from_pretrained(tiny_checkpoint), update.RLConfig(), trainable=lora.LoRAWeight)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_bucketed_update_equals_the_single_program_update(tiny_checkpoint, mode):
    """Rows of long-tailed lengths: the bucketed path (micro-batches grouped by length, cut to their widths) and
    the single-program path (every micro-batch at full width) take the same optimizer steps: per-step loss and
    gradient norm, and parameters within a small fraction of how far they moved."""
    settings = dict(mini_batch_size=8, micro_batch_size=4, loss_agg_mode=mode, learning_rate=1e-2, logprob_chunk=8,
                    kl_coef=0.01 if mode == "token-mean" else 0.0)
    lengths = np.array([40, 3, 35, 5, 9, 12, 2, 7, 1, 40, 6, 20, 33, 4, 8, 10])  # long-tailed, two at the cap
    start = None
    results = []
    for tokens in (None, 7 * 4 + 32 * 2):
        model = adapted_model(tiny_checkpoint)
        batch = text_batch(model.config, rows=16, samples=4, response=40, seed=3)
        batch = batch.replace(response_mask=(np.arange(40)[None] < lengths[:, None]).astype(np.int32))
        learner = update.Learner(model, update.RLConfig(**settings, micro_batch_tokens=tokens), compiler_options=FAST)
        if start is None:
            start = [np.asarray(x) for x in jax.tree.leaves(learner.state.params)]
        steps = [learner.step(batch) for _ in range(2)]
        results.append((steps, [np.asarray(x) for x in jax.tree.leaves(learner.state.params)]))
        if tokens:  # several widths, and fewer token slots than the full-width layout
            plan = learner.plan(lengths[:8], 7, 40)
            assert len({m.response_width for m in plan}) >= 2 and sum(m.real for m in plan) == 8
    (single, single_params), (bucketed, bucketed_params) = results
    for a, b in zip(single, bucketed):
        for key in ("loss", "pg_loss", "grad_norm", "entropy", "tokens", "optimizer_steps"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    moved = np.sqrt(sum(((p - s0) ** 2).sum() for p, s0 in zip(single_params, start)))
    gap = np.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(single_params, bucketed_params)))
    assert moved > 0.1 and gap < 1e-3 * moved, (gap, moved)


def test_remat_keeps_gradients_and_holds_one_layer_of_activations(tiny_checkpoint):
    """Gradient checkpointing changes nothing in the gradients (LoRA and full fine-tuning), and XLA's buffer
    assignment of an 8-layer update shows it keeping one layer's activations instead of all of them."""
    batch = text_batch(from_pretrained(tiny_checkpoint).config, rows=8, samples=4, response=6)
    batch = batch.replace(old_logprobs=np.full((8, 6), -5.0, np.float32))
    totals = {"tokens": np.float32(batch.response_mask.sum()), "rows": np.float32(7), "num_micro": np.float32(1),
              "max_len": np.float32(6)}
    for rank in (4, 0):
        grads = []
        for remat in (True, False):
            model = from_pretrained(tiny_checkpoint)
            if rank:
                lora.apply_lora(model, lora.LoRAConfig(rank=rank))
                for i, (_, layer) in enumerate(lora.lora_layers(model)):
                    layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
            learner = update.Learner(model, update.RLConfig(remat=remat, kl_coef=0.0, micro_batch_tokens=4096),
                                     trainable=None if rank else lora.trainable_filter(lora.LoRAConfig(rank=0)),
                                     compiler_options=FAST)
            acc = learner._accumulate(learner._zero_acc(learner.state.params), learner.state.params, learner.frozen,
                                      learner.place(batch), totals)
            grads.append([np.asarray(g) for g in jax.tree.leaves(acc[0])])
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    from speciarl_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig
    from speciarl_jax.rl.batch import abstract_batch

    text = TextConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(16, 8, 8))
    config = Qwen25VLConfig(text=text, vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                           out_hidden_size=256, fullatt_block_indexes=(0,)),
                            image_token_id=1000, video_token_id=1001, vision_start_token_id=1002,
                            vision_end_token_id=1003, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    shapes = abstract_batch(8, 512, 64)
    temporaries = {}
    for remat in (True, False):
        model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
        lora.apply_lora(model, lora.LoRAConfig(rank=4))
        learner = update.Learner(model, update.preset("grpo", remat=remat, micro_batch_tokens=4096))
        acc = jax.eval_shape(learner._zero_acc, learner.state.params)
        compiled = learner._accumulate.lower(acc, learner.state.params, learner.frozen, shapes,
                                             update.abstract_totals()).compile()
        temporaries[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries[True] * 4 < temporaries[False], temporaries  # 5.6x measured


def test_drgrpo_loss_has_verls_scale_whatever_the_micro_batching(tiny_checkpoint):
    """seq-mean-token-sum-norm as verl runs it: micro-batches of norm_micro_batch_rows rows, each summed over
    T_max, averaged. A mini-batch of 16 rows with reference micro-batches of 4 is sum(L m) / (T_max x 4). The
    first step's loss and gradient (ratio 1, so L = -A) come out so for every micro-batching of ours, and match a
    gradient taken by hand through a plain forward."""
    rows, response, parts = 16, 6, 4
    base = adapted_model(tiny_checkpoint)
    for i, (_, layer) in enumerate(lora.lora_layers(base)):
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    batch = text_batch(base.config, rows=rows, samples=4, response=response, seed=5)
    mask = np.asarray(batch.response_mask, np.float32)
    advantages = np.asarray(batch.advantages)
    scale = response * (rows / parts)
    expected_loss = float((-advantages[:, None] * mask).sum() / scale)

    graphdef, params, rest = nnx.split(base, lora.LoRAWeight, ...)

    def surrogate(params):  # -(1/scale) sum_i A_i sum_t m_it logp_it, from the full logits
        m = nnx.merge(graphdef, params, rest)
        logits = m(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids).logits[:, -response - 1:-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.input_ids[:, -response:, None], -1)[..., 0]
        return -(advantages[:, None] * mask * logp).sum() / scale

    expected_norm = float(optax_norm(jax.grad(surrogate)(params)))
    for micro, tokens in ((16, None), (8, 4 * 13)):  # one micro-batch; and length-bucketed ones of 8 rows
        model = adapted_model(tiny_checkpoint)
        nnx.update(model, params)
        config = update.preset("drgrpo", mini_batch_size=rows, micro_batch_size=micro, max_response_len=response,
                               norm_micro_batch_rows=parts, micro_batch_tokens=tokens, max_grad_norm=None)
        metrics = update.Learner(model, config, compiler_options=FAST).step(batch)
        assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4), (micro, tokens)
        assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-3), (micro, tokens)


def optax_norm(tree):
    return jnp.sqrt(sum((x.astype(jnp.float32) ** 2).sum() for x in jax.tree.leaves(tree)))



def numpy_per_token(logits, targets, old, ref, advantages, eps_low, eps_high, clip_c):
    """The GRPO-family loss terms per response token, written out in float64 numpy from full logits:
    log-probabilities, the clipped policy loss (with the dual clip), the low-variance KL and the entropy."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    logp = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
    a = np.asarray(advantages, np.float64)[:, None]
    ratio = np.exp(logp - old)
    policy = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    policy = np.where(a < 0, np.minimum(policy, -a * clip_c), policy)
    d = ref - logp
    return logp, policy, np.exp(d) - d - 1, entropy


def numpy_reduce(values, mask, mode):
    if mode == "token-mean":
        return (values * mask).sum() / mask.sum()
    live = mask.sum(1) > 0  # seq-mean-token-mean: the mean over rows with tokens of each row's token mean
    return ((values * mask).sum(1)[live] / mask.sum(1)[live]).mean()


@pytest.mark.parametrize("bucketed", [False, True])
def test_combined_loss_equals_numpy_from_a_full_forward(tiny_checkpoint, bucketed):
    """loss = policy loss + kl_coef x KL - entropy_coef x entropy, accumulated over four micro-batches of two
    rows (token-mean), or over length-bucketed ones (seq-mean-token-mean), equals the same formula in numpy over
    one plain forward's logits. Old log-probs off the policy's own put some tokens in the ratio clip and some
    negative-advantage tokens past the dual clip."""
    rows, response, eps_high, clip_c, kl_coef, entropy_coef = 8, 6, 0.28, 3.0, 0.05, 0.02
    mode = "seq-mean-token-mean" if bucketed else "token-mean"
    model = adapted_model(tiny_checkpoint)
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    batch = text_batch(model.config, rows=rows, samples=4, response=response, seed=7)
    logits = np.asarray(model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids).logits)
    logits = logits[:, -response - 1:-1]
    targets = np.asarray(batch.input_ids)[:, -response:]
    mask = np.asarray(batch.response_mask, np.float64)
    advantages = np.asarray(batch.advantages)
    logp = numpy_per_token(logits, targets, 0, 0, advantages, 0.2, eps_high, clip_c)[0]
    rng = np.random.default_rng(11)
    old = logp + rng.normal(0, 0.3, logp.shape)
    old[advantages < 0, 0] -= 1.5  # a ratio of e^1.5 > clip_c on negative advantages: the dual clip
    ref = logp + rng.normal(0, 0.2, logp.shape)
    _, policy, kl, entropy = numpy_per_token(logits, targets, old, ref, advantages, 0.2, eps_high, clip_c)
    expected = {"pg_loss": numpy_reduce(policy, mask, mode), "kl_loss": numpy_reduce(kl, mask, mode),
                "entropy": numpy_reduce(entropy, mask, "token-mean")}  # the entropy metric is a token mean
    expected["loss"] = expected["pg_loss"] + kl_coef * expected["kl_loss"] - entropy_coef * numpy_reduce(
        entropy, mask, mode)

    batch = batch.replace(old_logprobs=old.astype(np.float32), ref_logprobs=ref.astype(np.float32))
    config = update.preset("grpo", mini_batch_size=rows, micro_batch_size=2, loss_agg_mode=mode, eps_high=eps_high,
                           clip_c=clip_c, kl_coef=kl_coef, entropy_coef=entropy_coef, remat=False, logprob_chunk=4,
                           micro_batch_tokens=3 * batch.input_ids.shape[1] if bucketed else None)
    metrics = update.Learner(model, config, compiler_options=FAST).step(batch)
    assert metrics["optimizer_steps"] == 1
    assert 0 < metrics["clip_fraction"] < 1 and metrics["dual_clip_fraction"] > 0
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
