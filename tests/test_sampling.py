"""Sampling is what PPO assumes: tokens are drawn from softmax(logits / T) of the policy,
whatever the checkpoint's generation_config.json ships, and under bf16 the KL forwards of
policy and reference run at the same precision (KL exactly 0 before the first update)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf import rl_math as rl
from rlhf import stages
from rlhf.config import load_params
from rlhf.data.tokenize import encode
from rlhf.generation import generate, only_this_config, sampling_config
from rlhf.models.loading import lm_logits, load_causal_lm, load_tokenizer
from rlhf.paths import Paths
from rlhf.stages.ppo import response_logprobs
from rlhf.tracking import RecordingLogger

from .conftest import REPO, TINY_OVERRIDES
from .test_architectures import save_tiny_model

TEMPERATURE = 0.7
SHIPPED = {"repetition_penalty": 1.1, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
           "suppress_tokens": list(range(100, 200)), "do_sample": True}


@pytest.fixture(scope="module")
def shipped_model(tmp_path_factory):
    """A tiny Llama whose generation_config.json ships sampling fields, as many hub models do."""
    out = save_tiny_model("llama", tmp_path_factory.mktemp("llama-gen"))
    path = out / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **SHIPPED}))
    return out


def queries(tokenizer):
    prompts = ["3+4=", "\n\nHuman: 2+2?\n\nAssistant:", "TL;DR: sum", "1"]
    return [encode(tokenizer, p) for p in prompts]


def sampled_and_scored(model, tokenizer, generation, max_new_tokens=8):
    """Per sampled token: its log-prob in the distribution generate sampled from (its
    processed scores), and its log-prob from a separate forward as PPO computes it."""
    from rlhf.data.tokenize import collate_sequences

    query, query_mask = collate_sequences(queries(tokenizer), tokenizer.pad_token_id, "left")
    config = sampling_config(tokenizer, max_new_tokens, TEMPERATURE)
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    with torch.no_grad():
        out = generation(model, config, query, query_mask)
        responses = out.sequences[:, query.shape[1]:]
        steps = torch.stack(out.scores, 1).float()  # (B, R, V), what was sampled from
        seen = torch.log_softmax(steps, -1).gather(-1, responses[..., None]).squeeze(-1)
        responses = rl.truncate_after_eos(responses, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id)
        mask = rl.mask_from_lengths(rl.response_lengths(responses, tokenizer.eos_token_id),
                                    responses.shape[1])
        logits = lm_logits(model, torch.cat([query, responses], 1),
                           torch.cat([query_mask, mask.long()], 1))
        scored, _ = response_logprobs(logits, responses, query.shape[1], TEMPERATURE)
    return seen[mask], scored[mask]


def test_the_checkpoint_ships_sampling_fields(shipped_model):
    model = load_causal_lm(shipped_model)
    assert model.generation_config.repetition_penalty == 1.1
    assert model.generation_config.suppress_tokens == SHIPPED["suppress_tokens"]


def test_sampled_logprobs_equal_the_scored_ones(shipped_model):
    """The log-prob of each sampled token under the distribution generate drew it from
    equals the one PPO computes from a separate forward."""
    model = load_causal_lm(shipped_model).eval()
    tokenizer = load_tokenizer(shipped_model)

    def ours(model, config, query, mask):
        with only_this_config(model, config):
            return model.generate(input_ids=query, attention_mask=mask, generation_config=config)

    seen, scored = sampled_and_scored(model, tokenizer, ours)
    assert seen.numel() >= 8
    torch.testing.assert_close(seen, scored, atol=1e-5, rtol=0)
    assert model.generation_config.repetition_penalty == 1.1  # the model's own is restored

    # Without it, generate fills the unset fields from generation_config.json: another
    # distribution than the one PPO scores.
    def plain(model, config, query, mask):
        return model.generate(input_ids=query, attention_mask=mask, generation_config=config)

    seen, scored = sampled_and_scored(model, tokenizer, plain)
    assert (seen - scored).abs().max() > 0.05


def test_generate_samples_what_ppo_scores(shipped_model):
    """`generate` (what PPO, the reward normalisation and evaluate call) samples from
    softmax(logits / T) of the model itself, with and without LoRA adapters around it: the
    logits its sampler saw are those of a separate forward (the checkpoint's sampling fields
    never touched them), and each token is argmax(those / T + the row's Gumbel noise)."""
    from rlhf.config import ModelConfig
    from rlhf.generation import SeededGumbel
    from rlhf.models.lora import add_adapters

    tokenizer = load_tokenizer(shipped_model)
    prompts = queries(tokenizer)
    for wrap in (False, True):
        model = load_causal_lm(shipped_model).eval()
        if wrap:
            model = add_adapters(model, ModelConfig(lora=True), "CAUSAL_LM").eval()
        sampler = SeededGumbel(7, range(len(prompts)), TEMPERATURE)
        sampler.record = True
        query, query_mask, responses = generate(model, tokenizer, prompts, 8, TEMPERATURE,
                                                torch.device("cpu"), sampler=sampler)
        steps = len(sampler.seen)
        seen = torch.log_softmax(torch.stack(sampler.seen, 1), -1)  # (B, steps, V)
        drawn = responses[:, :steps]
        seen_logprobs = seen.gather(-1, drawn[..., None]).squeeze(-1)
        responses = rl.truncate_after_eos(responses, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id)
        mask = rl.mask_from_lengths(rl.response_lengths(responses, tokenizer.eos_token_id),
                                    responses.shape[1])
        with torch.no_grad():
            logits = lm_logits(model, torch.cat([query, responses], 1),
                               torch.cat([query_mask, mask.long()], 1))
        scored, _ = response_logprobs(logits, responses, query.shape[1], TEMPERATURE)
        valid = mask[:, :steps]
        assert valid.sum() >= 8
        torch.testing.assert_close(seen_logprobs[valid], scored[:, :steps][valid], atol=1e-5,
                                   rtol=0)
        assert model.generation_config.repetition_penalty == 1.1  # the model's own is restored
        # No suppressed token was ever drawn by the checked path either; nothing else checks
        # that the shipped suppress_tokens were ignored, so check the tokens can occur.
        _, _, many = generate(model, tokenizer, prompts * 16, 8, TEMPERATURE,
                              torch.device("cpu"), seed=2)
        assert ((many >= 100) & (many < 200)).any()


def test_gumbel_max_samples_follow_the_softmax():
    """argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T): frequencies over
    40000 rows are within 4 standard errors of the probabilities."""
    from rlhf.generation import SeededGumbel

    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    rows = 40_000
    drawn = SeededGumbel(0, range(rows), TEMPERATURE)(None, logits.expand(rows, 5)).argmax(1)
    frequency = torch.bincount(drawn, minlength=5).double() / rows
    probability = torch.softmax(logits.double() / TEMPERATURE, 0)
    standard_error = (probability * (1 - probability) / rows).sqrt()
    assert ((frequency - probability).abs() <= 4 * standard_error).all(), (frequency, probability)


def test_a_row_samples_the_same_whatever_batch_it_is_in(shipped_model):
    """Row i draws its noise from the generator of (seed, i): sampling the batch in two
    shards (two processes) gives what sampling it whole gives; another seed, other samples."""
    model = load_causal_lm(shipped_model).eval()
    tokenizer = load_tokenizer(shipped_model)
    prompts = queries(tokenizer) * 2
    cpu = torch.device("cpu")
    _, _, whole = generate(model, tokenizer, prompts, 8, TEMPERATURE, cpu, seed=5)
    _, _, first = generate(model, tokenizer, prompts[:3], 8, TEMPERATURE, cpu, seed=5)
    _, _, rest = generate(model, tokenizer, prompts[3:], 8, TEMPERATURE, cpu, seed=5,
                          first_row=3)
    assert torch.equal(torch.cat([first, rest]), whole)
    _, _, other = generate(model, tokenizer, prompts, 8, TEMPERATURE, cpu, seed=6)
    assert not torch.equal(other, whole)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process, fixed at its first mixed-precision setting."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("extra", [[], ["model.lora=true"], ["ppo.value_model=policy_head"]],
                         ids=["full", "lora", "policy_head"])
def test_bf16_kl_is_exactly_zero_before_the_first_update(upstream_copy, fresh_accelerate_state,
                                                         extra):
    """Under bf16 autocast (on CPU here) the first rollout's policy, reference and reward
    forwards run at one precision: the policy is still the reference, so the KL is 0.0."""
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        "train.precision=bf16", "ppo.steps=1", "ppo.checkpoint_every=100", *extra])
    logger = RecordingLogger()
    stages.get("ppo")(params, Paths(upstream_copy), logger)
    first = next(metrics for step, metrics in logger.metrics if step == 1)
    assert first["objective/kl"] == 0.0
    assert first["objective/non_score_reward"] == 0.0
