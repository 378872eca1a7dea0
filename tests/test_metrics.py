"""Acceptance metrics under vLLM's names (adaptive/metrics.py): hand-counted cases, the self-speculative draft count
checked against the decoder's own step traces, and the JSON of `mtp generate --json`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from adaptive.decoder import MTPDecoder
from adaptive.metrics import acceptance_metrics
from adaptive.strategies import ConfAdapt, SelfSpeculative
from mtp_cli.main import main as mtp_main
from tests.conftest import rigged_tiny_model


def _result(accepted, masks):
    return SimpleNamespace(token_ids=[7] * sum(accepted), accepted_per_step=accepted, masks_per_step=masks)


def test_confadapt_counts_by_hand():
    m = acceptance_metrics([_result([3, 1, 2], [3, 3, 3])], seconds=2.0)
    assert m["num_drafts"] == 3 and m["num_accepted_tokens"] == 3 and m["num_draft_tokens"] == 9
    assert m["mean_acceptance_length"] == pytest.approx(2.0) == m["tokens_per_forward"]  # 1 + 3 / 3 = 6 / 3
    assert m["acceptance_histogram"] == [1, 1, 1]  # one forward each kept 0, 1 and 2 drafts
    assert m["num_accepted_tokens_per_pos"] == [2, 1]
    assert m["per_position_acceptance_rate"] == pytest.approx([2 / 3, 1 / 3])
    assert m["draft_acceptance_rate"] == pytest.approx(3 / 9)
    assert m["tokens"] == 6 and m["tokens_per_second"] == pytest.approx(3.0)


def test_selfspec_counts_the_drafts_each_forward_verified():
    # prefill verifies nothing and proposes 3; forward 2 keeps 2 of them (rejects one: no proposal kept);
    # forward 3 verifies nothing and proposes 3; forward 4 keeps 1 of those 3
    m = acceptance_metrics([_result([1, 3, 1, 2], [3, 3, 3, 3])], speculative=True)
    assert m["num_draft_tokens"] == 6 and m["num_accepted_tokens"] == 3
    assert m["draft_acceptance_rate"] == pytest.approx(0.5) and m["mean_acceptance_length"] == pytest.approx(7 / 4)
    assert m["tokens_per_second"] is None  # no wall-clock time given
    # rows pool: every forward of every row counts once
    both = acceptance_metrics([_result([1, 3, 1, 2], [3, 3, 3, 3]), _result([1, 1], [0, 0])], speculative=True)
    assert both["num_drafts"] == 6 and both["acceptance_histogram"] == [4, 1, 1]


def test_empty_and_inconsistent_records():
    m = acceptance_metrics([])
    assert m["num_drafts"] == 0 and m["mean_acceptance_length"] == 0.0 and m["draft_acceptance_rate"] is None
    with pytest.raises(ValueError, match="one entry per forward"):
        acceptance_metrics([_result([1, 2], [3])])


@pytest.mark.parametrize("strategy", [SelfSpeculative(4), ConfAdapt(4e-5, 4)], ids=["selfspec", "confadapt"])
def test_draft_counts_match_the_decoders_step_traces(tiny_model_dir, strategy):
    """The drafts each forward verified (self-speculative) or read (ConfAdapt) as the decoder saw them: logits are
    read at the last pending token, at every draft and at every mask."""
    import random

    model, tokenizer = rigged_tiny_model(tiny_model_dir)
    decoder = MTPDecoder(model, tokenizer)
    offered = []

    def on_step(trace):
        for query, logits in zip(trace.query_ids, trace.logits):
            masks = sum(1 for t in query if t == decoder.mask_token_id)
            drafts = logits.shape[0] - 1 - masks
            offered.append(drafts if strategy.name == "selfspec" else masks)

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (3, 9, 17, 30)]
    results = decoder.generate(prompts, strategy, max_new_tokens=24, on_step=on_step)
    m = acceptance_metrics(results, speculative=strategy.name == "selfspec")
    assert m["num_draft_tokens"] == sum(offered) > 0
    assert m["num_accepted_tokens"] > 0  # drafts were really kept
    assert m["num_drafts"] == len(offered) == sum(r.forward_passes for r in results)
    assert m["mean_acceptance_length"] == pytest.approx(sum(len(r.token_ids) for r in results) / len(offered))


def test_generate_json_carries_the_metrics(tiny_model_dir, capsys):
    rc = mtp_main(["generate", "--model", tiny_model_dir, "--prompt", "Hello", "--prompt", "Two plus two",
                   "--strategy", "static", "--k", "2", "--max-new-tokens", "6", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    for row in rows:
        m = row["metrics"]
        assert m["tokens"] == len(row["token_ids"]) and m["num_drafts"] == row["forward_passes"]
        assert m["mean_acceptance_length"] == pytest.approx(row["tokens_per_forward"])
        assert m["tokens_per_second"] > 0 and len(m["acceptance_histogram"]) >= 1
