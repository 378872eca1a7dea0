"""The lm-eval adapter (`--model mtp`) on the tiny model: local task YAMLs, offline, checked against direct decoding
and hand-computed log-probabilities."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from distill.decoding_defaults import stop_token_ids
from adaptive.decoder import MTPDecoder
from adaptive.lmeval import MTPLM
from adaptive.strategies import Static
from distill.errors import UserError
from mtp_cli.lmeval import main as lmeval_main

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 12 + 7?", "answer": "12 + 7 = 19\n#### 19"},
    {"question": "Sam ran 5 km on Monday and 6 km on Tuesday. How far did he run?", "answer": "5 + 6 = 11\n#### 11"},
]
MAX_GEN = 16

GENERATE_TASK = """\
task: mtp_gsm8k_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
"""

CHOICE_TASK = """\
task: mtp_choice_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{[answer.split('####')[-1].strip(), '42', 'none']}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small forwards: one thread avoids OpenMP spinning on a shared CPU
    yield MTPLM(pretrained=tiny_model_dir, strategy="static", k=2, batch_size=2, max_gen_toks=MAX_GEN)
    torch.set_num_threads(threads)


def direct(lm: MTPLM, context: str, stop_strings: list[str]) -> str:
    """The same request decoded by MTPDecoder itself (plain tokens, the model's stop tokens)."""
    decoder = MTPDecoder(lm.model, lm.tokenizer, stop_token_ids=stop_token_ids(lm.model, lm.tokenizer))
    ids = lm.tokenizer(context)["input_ids"]
    return decoder.generate([ids], Static(2), MAX_GEN, stop_strings=stop_strings)[0].text


def hand_loglikelihood(lm: MTPLM, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """One forward over context + continuation; sum of log-softmax at the positions that predict the continuation."""
    full = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(lm.model(input_ids=full).logits[0].float(), dim=-1)
    total, greedy = 0.0, True
    for j, token in enumerate(continuation_ids):
        row = logprobs[len(context_ids) - 1 + j]
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, greedy


def _write_tasks(tmp_path: Path, until: list[str]) -> Path:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=data, until=json.dumps(until), max_gen=MAX_GEN))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    return tasks


def test_simple_evaluate_with_local_tasks(lm, tmp_path):
    # a stop string the model really produces (on the first question), so `until` is exercised
    eos = lm.tokenizer.decode([lm.eot_token_id])
    free = direct(lm, f"Q: {ROWS[0]['question']}\nA:", [eos])
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    until = [stop, "Q:"]
    tasks = _write_tasks(tmp_path, until)
    steps_before = len(lm.accepted_per_step)
    results = lm_eval.simple_evaluate(model=lm, tasks=["mtp_gsm8k_tiny", "mtp_choice_tiny"], limit=3,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      log_samples=True, bootstrap_iters=0)

    assert "exact_match,flexible-extract" in results["results"]["mtp_gsm8k_tiny"]
    samples = results["samples"]["mtp_gsm8k_tiny"]
    assert len(samples) == 3
    for sample in samples:
        (context, gen_kwargs), = sample["arguments"]
        assert gen_kwargs["until"] == until and context.startswith("Q: ") and context.endswith("\nA:")
        assert sample["resps"][0][0] == direct(lm, context, [*until, eos])
    first = next(s for s in samples if s["doc"]["question"] == ROWS[0]["question"])
    assert first["resps"][0][0] == free[: free.index(stop)]  # cut just before the stop string

    # speed bookkeeping: every decoding step of every generation, also reported in the results' config
    steps = lm.accepted_per_step[steps_before:]
    assert 0 < len(steps) and sum(steps) <= 3 * MAX_GEN and set(steps) <= {1, 2}
    assert lm.tokens_per_forward == pytest.approx(statistics.fmean(lm.accepted_per_step))
    config = results["config"]
    assert config["mtp_strategy"] == "static(k=2)" and config["mtp_tokens_per_forward_mean"] == lm.tokens_per_forward
    assert config["mean_acceptance_length"] == pytest.approx(lm.tokens_per_forward)  # vLLM's name, the same number
    assert config["num_drafts"] == len(lm.accepted_per_step) and config["tokens_per_second"] > 0

    # multiple choice runs on plain next-token log-likelihoods: each choice's score is the hand-computed one
    choice = results["samples"]["mtp_choice_tiny"]
    assert "acc,none" in results["results"]["mtp_choice_tiny"] and len(choice) == 3
    for sample in choice:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = lm.tokenizer(context + continuation)["input_ids"]
            n_context = len(lm.tokenizer(context)["input_ids"])
            expected = hand_loglikelihood(lm, whole[:n_context], whole[n_context:])
            assert resp[0][0] == pytest.approx(expected[0], abs=1e-4) and resp[0][1] == expected[1]


def test_loglikelihood_requests(lm):
    tok = lm.tokenizer
    pairs = [("Q: What is 2+2?\nA:", " 4"), ("The sky is", " blue and wide"), ("", "Hello world")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            whole = tok(context + continuation)["input_ids"]
            n = len(tok(context)["input_ids"])
            expected = hand_loglikelihood(lm, whole[:n], whole[n:])
        else:  # an empty context is conditioned on the prefix token
            expected = hand_loglikelihood(lm, [lm.prefix_token_id], tok(continuation)["input_ids"])
        assert logprob == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]
        assert logprob < 0
    # the greedy flag is really checked: the model's own argmax continuation is greedy
    context_ids = tok("Q: What is 2+2?\nA:")["input_ids"]
    with torch.no_grad():
        best = int(lm.model(input_ids=torch.tensor([context_ids])).logits[0, -1].argmax())
    (logprob, greedy), = lm._loglikelihood_tokens([(None, context_ids, [best])])
    assert greedy and logprob == pytest.approx(hand_loglikelihood(lm, context_ids, [best])[0], abs=1e-5)

    text = "Natalia sold clips to 48 of her friends in April."
    rolling = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,),
                                                 idx=0)], disable_tqdm=True)
    assert rolling[0] == pytest.approx(hand_loglikelihood(lm, [lm.prefix_token_id], tok(text)["input_ids"])[0],
                                       abs=1e-4)


def test_model_args_and_refusals(lm, tiny_model_dir):
    made = MTPLM.create_from_arg_string(f"pretrained={tiny_model_dir},strategy=selfspec,k_max=3,batch_size=4,"
                                        "max_gen_toks=7", {"batch_size": 1, "device": None, "max_batch_size": None})
    assert made.batch_size == 4 and made.max_gen_toks == 7 and made.strategy.label == "selfspec(k_max=3)"
    assert MTPLM.create_from_arg_string(f"pretrained={tiny_model_dir}", {"batch_size": "auto"}).batch_size == 16
    assert lm_eval.api.registry.get_model("mtp") is MTPLM
    for args, error in [("strategy=confadapt,tau=2", UserError), ("batch_size=0", UserError),
                        ("dtype=int8", UserError), ("taus=0.5", TypeError)]:
        with pytest.raises(error):
            MTPLM.create_from_arg_string(f"pretrained={tiny_model_dir},{args}")
    sampling = Instance(request_type="generate_until", doc={}, idx=0,
                        arguments=("Q: hi\nA:", {"until": ["Q:"], "do_sample": True, "temperature": 0.7}))
    with pytest.raises(UserError, match="greedily"):
        lm.generate_until([sampling], disable_tqdm=True)


@pytest.mark.slow  # lm-eval's command line indexes its ~15k built-in task YAMLs first: about 15 s on 2 cores
def test_command_line_runs_a_task_yaml(tiny_model_dir, tmp_path, capsys):
    tasks = _write_tasks(tmp_path, ["Q:"])
    out = tmp_path / "out"
    rc = lmeval_main(["--model", "mtp", "--model_args", f"pretrained={tiny_model_dir},strategy=static,k=2,batch_size=3",
                      "--tasks", str(tasks / "generate.yaml"), "--limit", "2", "--output_path", str(out)])
    assert rc == 0
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert "exact_match,flexible-extract" in results["results"]["mtp_gsm8k_tiny"]
    assert results["config"]["mtp_strategy"] == "static(k=2)" and results["config"]["mtp_forward_passes"] > 0
    assert "mtp_gsm8k_tiny" in capsys.readouterr().out  # lm-eval's results table
