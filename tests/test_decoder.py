"""MTPDecoder against oracles: HF greedy `generate`, single-row decoding and from-scratch forwards (paper §4.1, §4.2).

Fast tests use a "rigged" tiny random model: one output row (token BOOST) gets a large random direction, so greedy
text, draft acceptance and ConfAdapt spans all vary (a plain random model never accepts a draft). The slow tests use
SmolLM2-135M-Instruct with an untrained <MTP> token.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig

from adaptive.decoder import GenerationResult, MTPDecoder, StepTrace
from adaptive.strategies import ConfAdapt, SelfSpeculative, Static
from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.tokens import add_mtp_token

N_NEW = 12


# ---------------------------------------------------------------------------------------------------------------------
# Reusable oracles (also meant for trained checkpoints from `mtp train`)
# ---------------------------------------------------------------------------------------------------------------------
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: list[int]) -> list[list[int]]:
    """Plain HF greedy decoding, one prompt at a time (no padding, so no batching numerics): the lossless oracle."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_token_ids),
                              pad_token_id=stop_token_ids[0] if stop_token_ids else 0)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            out.append(y[0, len(ids):].tolist())
    return out


def assert_matches_greedy(model, tokenizer, prompts: list[list[int]], strategy, max_new_tokens: int,
                          reference: list[list[int]] | None = None) -> list[GenerationResult]:
    """Batched decoding with `strategy` (SelfSpeculative, or Static(1)) must equal HF greedy token for token.

    Pass `reference` (from `hf_greedy`) to reuse an oracle across strategies; returns the results for further checks.
    """
    decoder = MTPDecoder(model, tokenizer)
    if reference is None:
        reference = hf_greedy(model, prompts, max_new_tokens, decoder.stop_token_ids)
    results = decoder.generate(prompts, strategy, max_new_tokens=max_new_tokens)
    for i, (result, expected) in enumerate(zip(results, reference)):
        assert result.token_ids == expected, f"prompt {i}: {strategy!r} diverged from greedy"
        assert sum(result.accepted_per_step) == len(expected) and result.forward_passes == len(result.accepted_per_step)
    return results


def check_against_from_scratch(model, traces: list[StepTrace], atol: float = 1e-4) -> int:
    """Every step's logits must equal a cache-free causal forward over committed context + pending + masks."""
    checked = 0
    with torch.inference_mode():
        for trace in traces:
            for context, query, logits in zip(trace.context_ids, trace.query_ids, trace.logits):
                x = torch.tensor([context + query], device=model.device)
                expected = model(input_ids=x, logits_to_keep=logits.shape[0]).logits[0]
                diff = (expected.float() - logits.float()).abs().max().item()
                assert diff <= atol, f"step {trace.step}: logits differ from a from-scratch forward by {diff:.2e}"
                checked += 1
    return checked


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------------
# Fast fixtures: rigged tiny model, 16 mixed-length prompts, their greedy continuations
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 40, 4, 9, 17, 26, 33, 6, 11]  # mixed lengths, including a 1-token prompt
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def greedy(rig, prompts):
    model, tokenizer = rig
    return hf_greedy(model, prompts, N_NEW, MTPDecoder(model, tokenizer).stop_token_ids)


# A tau at the median top-1 probability of the rigged model, so ConfAdapt spans really vary (a random model's
# confidences are ~1/V; the usual 0.9 would always accept one token).
RIG_TAU = 4e-5
STRATEGIES = {
    "static1": Static(1),
    "static3": Static(3),
    "confadapt": ConfAdapt(RIG_TAU, 4),
    "selfspec": SelfSpeculative(4),
}


def test_static1_equals_greedy_tiny(rig, prompts, greedy):
    model, tokenizer = rig
    results = assert_matches_greedy(model, tokenizer, prompts, Static(1), N_NEW, reference=greedy)
    assert all(r.accepted_per_step == [1] * len(r.token_ids) for r in results)


@pytest.mark.parametrize("k_max", [1, 2, 4, 7])
def test_selfspec_equals_greedy_tiny(rig, prompts, greedy, k_max):
    model, tokenizer = rig
    results = assert_matches_greedy(model, tokenizer, prompts, SelfSpeculative(k_max), N_NEW, reference=greedy)
    if k_max > 1:  # drafts were really accepted, so the lossless path is exercised, not just greedy
        assert max(n for r in results for n in r.accepted_per_step) > 1
        assert sum(r.forward_passes for r in results) < sum(len(r.token_ids) for r in results)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batched_equals_single(rig, prompts, name):
    model, tokenizer = rig
    strategy = STRATEGIES[name]
    decoder = MTPDecoder(model, tokenizer)
    batched = decoder.generate(prompts, strategy, max_new_tokens=N_NEW)
    for i, prompt in enumerate(prompts):
        alone = decoder.generate([prompt], strategy, max_new_tokens=N_NEW)[0]
        assert batched[i].token_ids == alone.token_ids, f"prompt {i} differs batched vs alone"
        assert batched[i].accepted_per_step == alone.accepted_per_step
        assert batched[i].finish_reason == alone.finish_reason
    counts = Counter(n for r in batched for n in r.accepted_per_step)
    if name == "confadapt":  # ragged pending lengths inside one batch are what this test is about
        assert len(counts) >= 3, f"ConfAdapt accept counts do not vary enough: {counts}"
        assert any(len(set(r.accepted_per_step[:3])) > 1 for r in batched)


@pytest.mark.parametrize("name", ["static3", "confadapt", "selfspec"])
def test_kv_protocol_matches_from_scratch(rig, prompts, name):
    model, tokenizer = rig
    strategy = STRATEGIES[name]
    decoder = MTPDecoder(model, tokenizer)
    traces: list[StepTrace] = []
    results = decoder.generate(prompts, strategy, max_new_tokens=N_NEW, on_step=traces.append)
    K = strategy.k_max - 1
    assert traces[0].step == 0 and all(ctx == [] for ctx in traces[0].context_ids)  # prefill: the whole prompt pending
    drafts_rejected = 0
    for trace in traces:
        for i, context, query, logits in zip(trace.rows, trace.context_ids, trace.query_ids, trace.logits):
            text = prompts[i] + results[i].token_ids
            # committed context is the true prefix; the pending tokens follow it; masks close the query
            assert context == text[: len(context)]
            pending = query[: len(query) - K]
            assert query[len(query) - K :] == [decoder.mask_token_id] * K
            drafts = len(pending) - 1 if trace.step and name == "selfspec" else 0
            verified = pending[: len(pending) - drafts]
            assert verified == text[len(context) : len(context) + len(verified)]
            if drafts and pending[1:] != text[len(context) + 1 : len(context) + len(pending)]:
                drafts_rejected += 1
            assert logits.shape[0] == (1 + drafts + K if name == "selfspec" else strategy.k_max)
    if name == "selfspec":  # rejected drafts leave holes in the cache; the check below covers them
        assert drafts_rejected > 0
    assert check_against_from_scratch(model, traces) >= len(traces)


def test_dead_kv_columns_are_dropped(rig, prompts):
    # A lone self-speculative row: every rejected draft leaves a hole, which must not stay in the cache.
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer)
    for prompt in prompts[:6]:
        traces: list[StepTrace] = []
        decoder.generate([prompt], SelfSpeculative(4), max_new_tokens=N_NEW, on_step=traces.append)
        assert [t.cache_columns for t in traces] == [len(t.context_ids[0]) for t in traces]


def test_max_new_tokens_is_never_exceeded(rig, prompts):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=[])
    for strategy, budget in [(Static(3), 7), (Static(4), 1), (ConfAdapt(RIG_TAU, 4), 9), (SelfSpeculative(4), 5)]:
        for r in decoder.generate(prompts, strategy, max_new_tokens=budget):
            assert len(r.token_ids) == budget and sum(r.accepted_per_step) == budget
            assert r.finish_reason == "length"
    r = decoder.generate(prompts[:1], Static(3), max_new_tokens=7)[0]
    assert r.accepted_per_step == [3, 3, 1] and r.forward_passes == 3 and r.tokens_per_forward == pytest.approx(7 / 3)


def test_stop_tokens_trim_output(rig, prompts):
    model, tokenizer = rig
    free = MTPDecoder(model, tokenizer, stop_token_ids=[]).generate(prompts, Static(3), max_new_tokens=N_NEW)
    row = next(i for i, r in enumerate(free) if len(set(r.token_ids[2:10])) >= 2)
    ids = free[row].token_ids
    first, second = ids[4], next(t for t in ids[2:10] if t != ids[4])
    for stops in ([first], [first, second], [second, first]):
        cut = min(ids.index(t) for t in stops) + 1  # the earliest stop token of either id ends the text
        r = MTPDecoder(model, tokenizer, stop_token_ids=stops).generate([prompts[row]], Static(3), N_NEW)[0]
        assert r.token_ids == ids[:cut], "generated ids end at (and include) the first stop token"
        assert r.finish_reason == "stop" and sum(r.accepted_per_step) == cut
        assert r.text == tokenizer.decode(ids[: cut - 1], skip_special_tokens=False)


def test_default_stop_ids_come_from_tokenizer_and_generation_config(rig):
    model, tokenizer = rig
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    try:
        assert MTPDecoder(model, tokenizer).stop_token_ids == [tokenizer.eos_token_id, 7]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def test_generate_text_chat_template_order_and_batches(rig):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer)
    texts = ["Hi", "What is 12 + 7?", "A much longer question about apples, pears and the price of both?", "2+2="]
    strategy = ConfAdapt(RIG_TAU, 3)
    results = decoder.generate_text(texts, strategy, max_new_tokens=6, batch_size=3, progress=True)
    chat_ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"] for t in texts]
    direct = decoder.generate(chat_ids, strategy, max_new_tokens=6)
    assert [r.prompt for r in results] == texts
    assert [r.token_ids for r in results] == [r.token_ids for r in direct]
    plain = decoder.generate_text(texts[:2], strategy, max_new_tokens=6, chat_template=False)
    assert plain[0].token_ids == decoder.generate([tokenizer(texts[0])["input_ids"]], strategy, 6)[0].token_ids
    for r in results:
        assert r.tokens_per_forward == pytest.approx(len(r.token_ids) / r.forward_passes)
        assert r.prefill_seconds > 0 and r.decode_seconds >= 0 and r.finish_reason in ("stop", "length")


def test_interleaved_steps_decode_like_generate_and_time_only_their_own(rig, prompts):
    """Two decodings advanced one forward at a time in turn (generate_steps, as run_side_by_side drives them) give
    exactly what `generate` gives each alone, and a decoding's seconds leave out the time spent between its steps."""
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer)
    strategies = [STRATEGIES["confadapt"], STRATEGIES["selfspec"]]
    alone = [decoder.generate(prompts, s, max_new_tokens=N_NEW) for s in strategies]
    live = dict(enumerate(decoder.generate_steps(prompts, s, max_new_tokens=N_NEW) for s in strategies))
    together, pauses = {}, 0
    while live:
        for r, steps in list(live.items()):
            try:
                next(steps)
            except StopIteration as done:
                together[r] = done.value
                del live[r]
        time.sleep(0.1)  # between two steps of each decoding: not its time
        pauses += 1
    for r in range(len(strategies)):
        assert [x.token_ids for x in together[r]] == [x.token_ids for x in alone[r]]
        assert [x.accepted_per_step for x in together[r]] == [x.accepted_per_step for x in alone[r]]
        assert max(x.prefill_seconds + x.decode_seconds for x in together[r]) < 0.1 * pauses / 2
    model.train()
    list(decoder.generate_steps([[5, 6]], Static(2), max_new_tokens=2))
    assert model.training  # eval mode only inside each step
    model.eval()


def test_restores_training_mode_and_rejects_bad_input(rig, tiny_model_dir):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer)
    model.train()
    decoder.generate([[5, 6]], Static(2), max_new_tokens=2)
    assert model.training
    model.eval()
    for bad in ([[]], [[5, model.get_input_embeddings().weight.shape[0]]]):
        with pytest.raises(UserError):
            decoder.generate(bad, Static(1), max_new_tokens=2)
    for budget in (0, -1, 2.0):
        with pytest.raises(UserError, match="max_new_tokens"):
            decoder.generate([[5]], Static(1), max_new_tokens=budget)
    with pytest.raises(UserError, match="strategy"):
        decoder.generate([[5]], "confadapt", max_new_tokens=2)
    with pytest.raises(UserError, match="batch_size"):
        decoder.generate_text(["hi"], Static(1), batch_size=0)
    plain = load_model(tiny_model_dir)
    del plain.config.mtp_mask_token_id
    with pytest.raises(UserError, match="MTP"):
        MTPDecoder(plain, tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Stop strings (lm-eval `until`): checked against a brute-force search over prefixes of the unstopped generation
# ---------------------------------------------------------------------------------------------------------------------
def first_stop(tokenizer, ids: list[int], stop_strings: list[str]) -> int | None:
    """Oracle: the shortest prefix of `ids` whose decoded text contains a stop string (decodes every prefix)."""
    for m in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:m], skip_special_tokens=False)
        if any(s in text for s in stop_strings):
            return m
    return None


def spanning_stop(tokenizer, ids: list[int], first: int, n_tokens: int) -> str:
    """A stop string the model really produces: from the last 2 characters of ids[first] to the first 2 characters of
    ids[first + n_tokens - 1], so it spans n_tokens tokens."""
    pieces = [tokenizer.decode([t]) for t in ids[first : first + n_tokens]]
    return pieces[0][-2:] + "".join(pieces[1:-1]) + pieces[-1][:2]


@pytest.fixture(scope="module")
def unstopped(rig, prompts):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=[])
    return {name: decoder.generate(prompts, strategy, max_new_tokens=N_NEW) for name, strategy in STRATEGIES.items()}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_stop_string_ends_at_the_completing_token(rig, prompts, unstopped, name):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=[])
    # rows whose generation has distinct, non-empty tokens to build a stop string from
    rows = [i for i, r in enumerate(unstopped[name]) if len(set(r.token_ids[4:10])) >= 4][:3]
    assert rows, "the rigged model should produce varied text"
    for i in rows:
        ids = unstopped[name][i].token_ids
        full = tokenizer.decode(ids, skip_special_tokens=False)
        for first, n_tokens in ((5, 2), (3, 5)):  # across one token boundary; across five tokens (and step boundaries)
            stop = spanning_stop(tokenizer, ids, first, n_tokens)
            m = first_stop(tokenizer, ids, [stop])
            assert m is not None and m <= first + n_tokens
            r = decoder.generate([prompts[i]], STRATEGIES[name], max_new_tokens=N_NEW, stop_strings=[stop])[0]
            assert r.token_ids == ids[:m], f"row {i}: must keep tokens up to the one completing {stop!r}"
            assert r.finish_reason == "stop" and sum(r.accepted_per_step) == m
            assert r.text == full[: full.index(stop)], "text ends just before the first occurrence"
            assert r.accepted_per_step[:-1] == unstopped[name][i].accepted_per_step[: len(r.accepted_per_step) - 1]


def test_stop_strings_batched_equal_alone_and_earliest_stop_wins(rig, prompts, unstopped):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=[])
    for name, strategy in STRATEGIES.items():
        # stop strings from three rows' own text: those rows stop (at different steps), rows without them run on
        varied = [i for i, r in enumerate(unstopped[name]) if len(set(r.token_ids)) >= 6][:3]
        stops = [spanning_stop(tokenizer, unstopped[name][i].token_ids, first, 2)
                 for i, first in zip(varied, (1, 4, 8))]
        batched = decoder.generate(prompts, strategy, max_new_tokens=N_NEW, stop_strings=stops)
        reasons = Counter(r.finish_reason for r in batched)
        assert reasons["stop"] >= 3 and reasons["length"] >= 1, reasons
        for i, prompt in enumerate(prompts):
            alone = decoder.generate([prompt], strategy, max_new_tokens=N_NEW, stop_strings=stops)[0]
            assert (batched[i].token_ids, batched[i].text, batched[i].finish_reason, batched[i].accepted_per_step) == (
                alone.token_ids, alone.text, alone.finish_reason, alone.accepted_per_step), f"{name} row {i}"
            free = unstopped[name][i].token_ids
            m = first_stop(tokenizer, free, stops)
            assert batched[i].token_ids == free[: m or N_NEW]
    # a stop token before the stop string ends the row first; a stop string before the stop token wins
    ids = unstopped["confadapt"][6].token_ids
    stop = spanning_stop(tokenizer, ids, 3, 2)
    m = first_stop(tokenizer, ids, [stop])
    late = next(t for t in ids[m:] if t not in ids[:m])
    assert ids[1] != ids[0] and m > 2
    for stop_id, expected in ((ids[1], 2), (late, m)):
        decoder = MTPDecoder(model, tokenizer, stop_token_ids=[stop_id])
        r = decoder.generate([prompts[6]], STRATEGIES["confadapt"], max_new_tokens=N_NEW, stop_strings=[stop])[0]
        assert r.token_ids == ids[:expected] and r.finish_reason == "stop"


def test_stop_strings_text_and_input_forms(rig, prompts, unstopped):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=[])
    ids = unstopped["static3"][7].token_ids
    full = tokenizer.decode(ids)
    late, early = spanning_stop(tokenizer, ids, 8, 2), spanning_stop(tokenizer, ids, 2, 2)
    # text is cut before the earliest stop string, whichever order they are listed in; "" is ignored; one str is fine
    for stops in ([late, early], [early, late, ""], early):
        r = decoder.generate([prompts[7]], Static(3), N_NEW, stop_strings=stops)[0]
        assert r.text == full[: full.index(early)] and r.token_ids == ids[: first_stop(tokenizer, ids, [early])]
    assert decoder.generate([prompts[7]], Static(3), N_NEW, stop_strings=[""])[0].token_ids == ids
    text = decoder.generate_text(["What is 12 + 7?"], Static(3), max_new_tokens=N_NEW)[0]
    stop = text.text[len(text.text) // 2 :][:3]
    cut = decoder.generate_text(["What is 12 + 7?"], Static(3), max_new_tokens=N_NEW, stop_strings=[stop])[0]
    assert cut.text == text.text[: text.text.index(stop)] and cut.finish_reason == "stop"
    for bad in ([3], "x".encode(), [None]):
        with pytest.raises(UserError, match="stop_strings"):
            decoder.generate([prompts[0]], Static(1), 2, stop_strings=bad)


# ---------------------------------------------------------------------------------------------------------------------
# Slow: SmolLM2-135M-Instruct (+ untrained <MTP>) against HF greedy on 20 chat prompts
# ---------------------------------------------------------------------------------------------------------------------
SMOL_NEW = 16
LONG = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 6
SMOL_PROMPTS = [
    "Hi!", "Say only: yes", "What is the capital of Japan?", "What is 12 + 7?", "Write a haiku about autumn.",
    "Translate 'good morning' into French.", "List three prime numbers.", "Explain photosynthesis in one sentence.",
    LONG + "How many clips did Natalia sell altogether?", "Give me a synonym for 'happy'.", "2+2=",
    "Continue the sequence: 1, 2, 3, 4,", "Who wrote Hamlet?", "Name a mammal that can fly.",
    "Is water wet? Answer yes or no.", "What's the opposite of 'cold'?", "Spell 'cat' backwards.",
    "Reply with the number 42 and nothing else.", "Tell me a joke.", "Answer with one word: what color is the sky?",
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    model = load_model(smollm2_dir)
    tokenizer = load_tokenizer(smollm2_dir)
    add_mtp_token(model, tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in SMOL_PROMPTS]
    reference = hf_greedy(model, prompts, SMOL_NEW, MTPDecoder(model, tokenizer).stop_token_ids)
    return model, tokenizer, prompts, reference


@pytest.mark.slow
def test_static1_equals_hf_generate_smollm2(smol):
    model, tokenizer, prompts, reference = smol
    results = assert_matches_greedy(model, tokenizer, prompts, Static(1), SMOL_NEW, reference=reference)
    reasons = Counter(r.finish_reason for r in results)
    assert reasons["stop"] >= 1 and reasons["length"] >= 1  # both endings are covered
    assert max(len(p) for p in prompts) > 4 * min(len(p) for p in prompts)  # long and short prompts in one batch


@pytest.mark.slow
def test_selfspec_equals_hf_generate_smollm2_untrained(smol):
    model, tokenizer, prompts, reference = smol
    results = assert_matches_greedy(model, tokenizer, prompts, SelfSpeculative(4), SMOL_NEW, reference=reference)
    # even the untrained <MTP> guesses right now and then, so verified drafts are part of this check
    assert max(n for r in results for n in r.accepted_per_step) > 1


@pytest.mark.slow
def test_selfspec_equals_hf_generate_trained_checkpoint(trained_smollm2_dir):
    """The same lossless check on a checkpoint written by `mtp train` (fixture: the 30-step SmolLM2 run)."""
    model = load_model(trained_smollm2_dir)
    tokenizer = load_tokenizer(trained_smollm2_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in SMOL_PROMPTS]
    results = assert_matches_greedy(model, tokenizer, prompts, SelfSpeculative(8), SMOL_NEW)
    assert max(n for r in results for n in r.accepted_per_step) > 1
