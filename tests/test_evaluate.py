"""`mtp evaluate`: GSM8K answer extraction, lm-eval's gsm8k_cot prompt, run_eval arithmetic and the command end to end.

The decoding tests use the tiny random Llama with the lm_head rows of the digit tokens (and the space) pushed along
random directions, so its generations are numbers and the answers to compare are not all None.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from adaptive.decoder import MTPDecoder
from adaptive.evaluate import parse_strategies, run_eval
from adaptive.gsm8k import (COT_SUFFIX, STOP_STRINGS, build_prompt, extract_answer, gold_answer, load_problems,
                            normalize_number)
from adaptive.strategies import SelfSpeculative, Static
from mtp_cli.main import main as mtp_main
from distill.errors import UserError
from distill.models import load_model, load_tokenizer

# (model output, expected answer): formats real GSM8K generations take
EXTRACTION_TABLE = [
    # lm-eval strict-match: "The answer is N" (the 8 exemplars' closing sentence)
    ("So there must have been 21 - 15 = 6. The answer is 6.", "6"),
    ("The answer is 1,234.", "1234"),  # thousands separator
    ("He pays 3 * 6 = $18. The answer is $18.", "18"),  # dollar sign
    ("The answer is -3.", "-3"),  # negative
    ("The answer is -3.50.", "-3.5"),  # decimal, trailing zero
    ("The answer is 18.00.", "18"),  # integral decimal
    ("The answer is 0.25", "0.25"),
    ("The answer is: 5", "5"),
    ("The answer is $1,234.50.", "1234.5"),
    ("The answer is 5. Q: Next question has 7 apples and 12 pears", "5"),  # trailing text after the answer
    ("The answer is 12 apples and 3 pears.", "12"),  # the first strict match, not the last number
    ("the answer is 40", "40"),
    # GSM8K's own "#### N" line (what a model distilled on GSM8K solutions writes)
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 72", "72"),
    ("#### 1,000,000", "1000000"),
    ("It drops by 4.\n#### -4\nThe next day it rains 7 mm.", "-4"),
    # lm-eval flexible-extract: the last number
    ("5 + 4 = 9. So he has 9 toys now.", "9"),
    ("She has $18.00 left.", "18"),
    ("Each costs $5, so 3 cost 3 * 5 = 15 dollars", "15"),
    ("The temperature falls to -12 degrees", "-12"),
    ("1/2 of 10 is 5", "5"),
    ("They have 2 cats and 3 dogs, so 5 pets in total.", "5"),
    ("In total 1,250 people came.", "1250"),
    ("He ran 3.5 km, then 0.5 km more: 4.0 km", "4"),
    ("The total is 42...", "42"),  # a trailing ellipsis is not a number (lm-eval's regex would take "...")
    ("It costs $5. That's it...", "5"),
    ("x = 7.", "7"),
    ("He had 07 apples", "7"),
    # numbers inside words are names, not results
    ("Step 2: add 8 and 4 to get 12. Saved as file2", "12"),
    ("Water is H2O", None),
    # no number at all
    ("I don't know.", None),
    ("", None),
    ("The answer is unknown.", None),
    ("$.", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_TABLE)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


# Model outputs for `mtp evaluate`'s default extraction, which must read exactly what lm-eval's gsm8k_cot
# "flexible-extract" filter reads (including where the project's extraction reads something else).
FLEXIBLE_OUTPUTS = [
    "So there must have been 21 - 15 = 6. The answer is 6.",
    "The answer is $1,234.50.",
    "The answer is 12 apples and 3 pears.",  # the last number, not the first strict match
    "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18",
    "It drops by 4.\n#### -4\nThe next day it rains 7 mm.",
    "She has $18.00 left.",
    "The temperature falls to -12 degrees",
    "In total 1,250 people came.",
    "The total is 42...",  # lm-eval takes the dots with the number
    "It costs $5. That's it...",  # and "..." alone
    "Water is H2O",  # and a digit inside a word
    "He had 07 apples",
    "x = -0.5 or x = 3",
    "$.",
    "I don't know.",
    "",
]


def _lm_eval_flexible_extract(texts: list[str]) -> list[str]:
    """lm-eval's own filters, built from gsm8k-cot.yaml's "flexible-extract" pipeline as lm-eval's Task builds them,
    applied in sequence as its FilterEnsemble applies them (one response per document)."""
    from lm_eval.filters import build_filter_ensemble

    import adaptive.gsm8k as gsm8k

    (pipeline,) = [f["filter"] for f in gsm8k.gsm8k_cot_config()["filter_list"] if f["name"] == "flexible-extract"]
    assert [step["function"] for step in pipeline] == ["regex", "take_first"]
    assert pipeline[0]["group_select"] == -1 and pipeline[0]["regex_pattern"] == gsm8k.FLEXIBLE_PATTERN
    components = [(step["function"], {k: v for k, v in step.items() if k != "function"}) for step in pipeline]
    ensemble = build_filter_ensemble("flexible-extract", components)
    responses = [[text] for text in texts]
    for make_filter in ensemble.filters:
        responses = make_filter().apply(responses, [{} for _ in texts])
    return list(responses)


def test_default_extraction_is_lm_evals_flexible_extract():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from adaptive.gsm8k import IGNORED_PATTERNS, answer_key, flexible_extract, gold_key, gsm8k_cot_config

    theirs = _lm_eval_flexible_extract(FLEXIBLE_OUTPUTS)
    assert len(theirs) == len(FLEXIBLE_OUTPUTS) and theirs.count("[invalid]") == 2
    for text, expected in zip(FLEXIBLE_OUTPUTS, theirs):
        assert flexible_extract(text) == (None if expected == "[invalid]" else expected), text
    # the comparison with the gold is lm-eval's exact_match with gsm8k-cot.yaml's options
    (metric,) = gsm8k_cot_config()["metric_list"]
    assert tuple(metric["regexes_to_ignore"]) == IGNORED_PATTERNS and metric["ignore_case"]
    options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    for gold_field in ("18 * 1 = 18\n#### 18", "#### 1,250", "#### -4", "#### 42", "#### 3", "#### 6"):  # GSM8K's
        gold = gold_answer(gold_field)
        for text, filtered in zip(FLEXIBLE_OUTPUTS, theirs):
            reference = gold_field.split("####")[-1].strip()  # gsm8k-cot.yaml's doc_to_target
            lm_eval_correct = exact_match_hf_evaluate([filtered], [reference], **options)["exact_match"] == 1.0
            ours = answer_key(text, "flexible")
            assert (ours is not None and ours == gold_key(gold, "flexible")) == lm_eval_correct, (text, gold_field)
    assert answer_key("The answer is 12 apples and 3 pears.", "project") == "12"
    with pytest.raises(UserError, match="extraction"):
        answer_key("5", "strict")


def test_normalize_number_and_gold_answer():
    for raw, expected in [("18.00", "18"), ("-3.50", "-3.5"), ("$1,234", "1234"), ("72.", "72"), ("-0.0", "0"),
                          (" 5 ", "5"), ("3.4.5", "3.4.5"), ("", None), ("$", None), ("-", None)]:
        assert normalize_number(raw) == expected, raw
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gold_answer("so 1,080 in total\n#### 1,080") == "1080"
    assert gold_answer("72") == "72" and gold_answer(" -3.50 ") == "-3.5"
    for bad in ("She sold 72 clips.", "####", "#### ", 72):
        with pytest.raises(UserError):
            gold_answer(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and problems
# ---------------------------------------------------------------------------------------------------------------------
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cot8_prompt_is_lm_evals_gsm8k_cot_context(tmp_path):
    prompt = build_prompt(QUESTION)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9 and prompt.count("Q: ") == 9
    assert blocks[0].startswith("Q: There are 15 trees in the grove.") and blocks[7].startswith("Q: Olivia has $23.")
    for block in blocks[:8]:  # exemplars: "Q: {question}\nA: {target}", each closing "The answer is N."
        question, answer = block.split("\nA: ")
        assert question.startswith("Q: ") and extract_answer(answer) == answer.rsplit(" ", 1)[1].rstrip(".")
    assert blocks[8] == f"Q: {QUESTION}\nA: Let's think step by step."
    assert STOP_STRINGS["cot8"] == ["Q:", "</s>", "<|im_end|>"]

    # the same context lm-eval itself builds for its gsm8k_cot task (its YAML, pointed at a local data file)
    from lm_eval.tasks import TaskManager

    import adaptive.gsm8k as gsm8k

    data = _write_jsonl(tmp_path / "test.jsonl", [{"question": QUESTION, "answer": "3 + 4 = 7\n#### 7"}])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cot.yaml").write_text(
        f"include: {gsm8k.gsm8k_cot_path()}\ntask: gsm8k_cot_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    task = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(["gsm8k_cot_local"])
    task = task["tasks"]["gsm8k_cot_local"]
    doc = next(iter(task.test_docs()))
    assert prompt == task.fewshot_context(doc, 8) + COT_SUFFIX


def test_chat_prompt_and_bad_formats(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = build_prompt(QUESTION, "chat", tokenizer)
    assert ids == list(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
    assert STOP_STRINGS["chat"] is None
    with pytest.raises(UserError, match="chat template"):
        build_prompt(QUESTION, "chat")
    with pytest.raises(UserError, match="prompt format"):
        build_prompt(QUESTION, "fewshot")
    with pytest.raises(UserError, match="empty"):
        build_prompt("  ")


def test_load_problems_local_file(tmp_path):
    rows = [{"question": f"Q{i}: what is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}000"} for i in range(6)]
    path = _write_jsonl(tmp_path / "gsm.jsonl", rows)
    problems = load_problems(str(path), limit=3, start=2)
    assert [p["index"] for p in problems] == [2, 3, 4]
    assert [p["question"] for p in problems] == [rows[i]["question"] for i in (2, 3, 4)]
    assert [p["answer"] for p in problems] == ["3000", "4000", "5000"]
    assert len(load_problems(str(path))) == 6 and len(load_problems(str(path), start=5, limit=10)) == 1
    with pytest.raises(UserError, match="past the end"):
        load_problems(str(path), start=6)
    for kwargs in ({"limit": 0}, {"start": -1}):
        with pytest.raises(UserError):
            load_problems(str(path), **kwargs)
    with pytest.raises(UserError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    _write_jsonl(path, rows[:2] + [{"question": "q", "answer": "no final line"}])
    with pytest.raises(UserError, match="row 2"):
        load_problems(str(path))


def test_parse_strategies():
    defaults = {"strategy": "confadapt", "k_max": 8, "tau": 0.95}
    got = parse_strategies("static:3, confadapt:0.9:16,confadapt,selfspec:4,selfspec,static:3", defaults)
    assert [s.label for s in got] == ["static(k=3)", "confadapt(tau=0.9,k_max=16,raw)", "confadapt(tau=0.95,k_max=8,raw)",
                                      "selfspec(k_max=4)", "selfspec(k_max=8)"]
    for bad in ("static", "static:x", "confadapt:2", "beam:4", "selfspec:4:5", "static:0"):
        with pytest.raises(UserError):
            parse_strategies(bad, defaults)


# ---------------------------------------------------------------------------------------------------------------------
# run_eval on the digit-emitting tiny model
# ---------------------------------------------------------------------------------------------------------------------
PROBLEMS = [
    {"question": "Tom has 3 apples. How many?", "answer": "3"},
    {"question": "What is 12 + 7?", "answer": "19"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?", "answer": "3"},
    {"question": "Sam ran 5 km on Monday and 6 km on Tuesday. How far did he run?", "answer": "11"},
]


@pytest.fixture(scope="module")
def numeric_decoder(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small forwards: one thread avoids OpenMP spinning on a shared CPU
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    boosted = [tokenizer.convert_tokens_to_ids(t) for t in [*"0123456789", "Ġ", "()"]]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in boosted:
            model.lm_head.weight[t] = 0.1 * torch.randn(model.config.hidden_size, generator=generator)
    yield MTPDecoder(model, tokenizer)
    torch.set_num_threads(threads)


def test_run_eval_arithmetic(numeric_decoder):
    decoder = numeric_decoder
    kwargs = dict(prompt_format="chat", max_new_tokens=13, batch_size=3, progress=False)  # 13 = 4 x 3 + 1
    ref = run_eval(decoder, PROBLEMS, Static(1), **kwargs)
    again = run_eval(decoder, PROBLEMS, Static(1), reference=ref, **kwargs)
    assert again.agreement == 1.0 and again.answers == ref.answers and ref.agreement is None

    run = run_eval(decoder, PROBLEMS, Static(3), **kwargs)
    assert all(a is not None for a in run.answers) and len(set(run.answers)) >= 2, run.answers
    assert run.answers == [extract_answer(r.text) for r in run.results] and run.texts == [r.text for r in run.results]
    # accuracy: make problems 0 and 2 correct by construction
    problems = [dict(p, answer=run.answers[i] if i in (0, 2) else "-1") for i, p in enumerate(PROBLEMS)]
    scored = run_eval(decoder, problems, Static(3), reference=ref, **kwargs)
    assert scored.answers == run.answers and scored.correct == [True, False, True, False]
    assert scored.accuracy == 0.5 and scored.stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert scored.agreement == sum(a == b for a, b in zip(run.answers, ref.answers)) / 4
    fake_ref = dataclasses.replace(ref, answers=[run.answers[0], "x", run.answers[2], None])
    assert run_eval(decoder, problems, Static(3), reference=fake_ref, **kwargs).agreement == 0.5
    # speed: over all decoding steps of all generations
    steps = [k for r in scored.results for k in r.accepted_per_step]
    assert scored.forwards == len(steps) and scored.tokens == sum(len(r.token_ids) for r in scored.results)
    assert scored.tokens_per_forward_mean == pytest.approx(sum(steps) / len(steps))
    assert scored.tokens_per_forward_std == pytest.approx(statistics.pstdev(steps)) and scored.tokens_per_forward_std > 0
    assert scored.seconds > 0 and scored.tokens_per_second == pytest.approx(scored.tokens / scored.seconds)
    assert sum(scored.finish_reasons.values()) == 4
    # JSON-able, without the GenerationResults; NaN stderr (n = 1) becomes null
    data = json.loads(json.dumps(scored.to_dict()))
    assert "results" not in data and data["answers"] == scored.answers and data["accuracy"] == 0.5
    one = run_eval(decoder, problems[:1], Static(3), **kwargs)
    assert math.isnan(one.stderr) and one.to_dict()["stderr"] is None
    with pytest.raises(UserError, match="reference"):
        run_eval(decoder, problems[:2], Static(3), reference=ref, **kwargs)
    with pytest.raises(UserError, match="no problems"):
        run_eval(decoder, [], Static(3), **kwargs)


def test_run_side_by_side_interleaves_forwards_and_answers_like_run_eval(numeric_decoder, monkeypatch):
    """Oracle: every run's report equals run_eval's (texts, answers, agreement with the first run, tokens/forward);
    on each batch the runs take turns forward by forward, in an order rotated by the batch."""
    from adaptive.evaluate import run_side_by_side

    decoder = numeric_decoder
    kwargs = dict(prompt_format="chat", max_new_tokens=9, batch_size=2, progress=False)
    strategies = [Static(1), Static(3), SelfSpeculative(3)]
    alone = [run_eval(decoder, PROBLEMS, strategies[0], **kwargs)]
    alone += [run_eval(decoder, PROBLEMS, s, reference=alone[0], **kwargs) for s in strategies[1:]]
    calls, steps = [], []  # (label, prompts) per decoding; the decoding each step belongs to
    generate_steps = decoder.generate_steps

    def recording(prompts, strategy, *args, **kw):
        call, inner = len(calls), generate_steps(prompts, strategy, *args, **kw)
        calls.append((strategy.label, len(prompts)))
        while True:
            try:
                next(inner)
            except StopIteration as done:
                return done.value
            steps.append(call)
            yield

    monkeypatch.setattr(decoder, "generate_steps", recording)
    together = run_side_by_side([(decoder, s) for s in strategies], PROBLEMS, **kwargs)
    for a, b in zip(alone, together):
        assert (b.label, b.texts, b.answers, b.agreement) == (a.label, a.texts, a.answers, a.agreement)
        assert (b.tokens, b.forwards, b.tokens_per_forward_mean) == (a.tokens, a.forwards, a.tokens_per_forward_mean)
        assert b.seconds > 0 and b.tokens_per_second == pytest.approx(b.tokens / b.seconds)
    labels = [s.label for s in strategies]
    assert calls[:3] == [(label, 1) for label in labels]  # one untimed warm-up generation per run
    assert [label for label, _ in calls[3:9]] == labels + labels[1:] + labels[:1]  # batch 2: the order rotated
    for batch in ([3, 4, 5], [6, 7, 8]):  # every run's first forward, then again one of each unfinished run
        own = [call for call in steps if call in batch]
        assert own[:6] == batch + batch
    assert max(steps.index(call) for call in [3, 4, 5]) < min(steps.index(call) for call in [6, 7, 8])
    with pytest.raises(UserError, match="no runs"):
        run_side_by_side([], PROBLEMS, **kwargs)
    with pytest.raises(UserError, match="no problems"):
        run_side_by_side([(decoder, Static(1))], [], **kwargs)


def test_run_eval_flexible_extraction(numeric_decoder):
    from adaptive.gsm8k import answer_key, gold_key

    kwargs = dict(prompt_format="chat", max_new_tokens=7, batch_size=4, progress=False)
    run = run_eval(numeric_decoder, PROBLEMS, Static(1), extract="flexible", **kwargs)
    assert run.answers == [answer_key(r.text, "flexible") for r in run.results]
    gold = [gold_key(p["answer"], "flexible") for p in PROBLEMS]
    assert run.correct == [a is not None and a == g for a, g in zip(run.answers, gold)]
    with pytest.raises(UserError, match="extraction"):
        run_eval(numeric_decoder, PROBLEMS, Static(1), extract="strict", **kwargs)


def test_run_eval_prompts_stops_and_on_step(numeric_decoder, monkeypatch):
    decoder = numeric_decoder
    tokenizer = decoder.tokenizer
    calls = []
    generate = decoder.generate

    def spy(input_ids, strategy, max_new_tokens, stop_strings=None, on_step=None):
        calls.append(stop_strings)
        return generate(input_ids, strategy, max_new_tokens, stop_strings=stop_strings, on_step=on_step)

    monkeypatch.setattr(decoder, "generate", spy)
    traces = []
    report = run_eval(decoder, PROBLEMS[:2], SelfSpeculative(3), prompt_format="cot8", max_new_tokens=6,
                      progress=False, on_step=traces.append)
    assert calls == [STOP_STRINGS["cot8"]] and not hasattr(decoder, "on_step")  # the hook is an argument
    assert len(traces) == max(r.forward_passes for r in report.results)  # one trace per batched forward
    prefill = traces[0]
    for i, query in zip(prefill.rows, prefill.query_ids):  # the prompt really is the 8-shot text, as plain tokens
        assert query[: -2] == tokenizer(build_prompt(PROBLEMS[i]["question"]))["input_ids"]
    run_eval(decoder, PROBLEMS[:2], Static(1), prompt_format="chat", max_new_tokens=2, progress=False)
    assert calls[-1] is None


# ---------------------------------------------------------------------------------------------------------------------
# mtp evaluate
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_gsm8k(tmp_path) -> Path:
    rows = [{"question": p["question"], "answer": f"Reasoning.\n#### {p['answer']}"} for p in PROBLEMS]
    return _write_jsonl(tmp_path / "gsm8k.jsonl", rows)


def _evaluate(capsys, *argv):
    rc = mtp_main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_mtp_evaluate_end_to_end(tiny_model_dir, small_gsm8k, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    rc, out, err = _evaluate(capsys, "--model", tiny_model_dir, "--dataset", str(small_gsm8k), "--limit", "3",
                             "--max-new-tokens", "8", "--strategies", "static:2,confadapt:0.9:3,selfspec:3,static:1",
                             "--json", str(out_json))
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["static(k=1)", "static(k=2)", "confadapt(tau=0.9,k_max=3,raw)", "selfspec(k_max=3)"]
    assert report["n"] == 3 and report["reference"] == "static(k=1)" and report["format"] == "cot8"
    assert report["gold"] == [p["answer"] for p in PROBLEMS[:3]] and report["indices"] == [0, 1, 2]
    ref, static2, _, spec = report["runs"]
    assert ref["agreement"] is None and static2["agreement"] is not None and spec["speedup_vs_k1"] > 0
    assert spec["answers"] == ref["answers"] and spec["agreement"] == 1.0  # self-speculative decoding is lossless
    assert static2["tokens_per_forward_mean"] > 1 and ref["tokens_per_forward_mean"] == 1
    for run in report["runs"]:
        assert len(run["answers"]) == len(run["correct"]) == len(run["texts"]) == 3 and run["seconds"] > 0
        # vLLM's acceptance metrics under their names (adaptive/metrics.py), consistent with the report's own speed
        assert run["mean_acceptance_length"] == pytest.approx(run["tokens_per_forward_mean"])
        assert run["num_drafts"] == run["forwards"] and sum(run["acceptance_histogram"]) == run["forwards"]
        assert len(run["per_position_acceptance_rate"]) == len(run["acceptance_histogram"]) - 1
    assert static2["per_position_acceptance_rate"][0] > 0 and ref["acceptance_histogram"] == [ref["forwards"]]
    table = out.strip().splitlines()
    assert len(table) == 5 and table[0].split()[:2] == ["strategy", "accuracy"] and " ref " in table[1]


def test_mtp_evaluate_uses_a_fitted_calibrator(tiny_model_dir, small_gsm8k, tmp_path, capsys, monkeypatch):
    from adaptive import loading

    class Sure:  # a scorer that is certain of every position: ConfAdapt then accepts all k_max tokens
        method = "test"

        def __call__(self, logits):
            return torch.ones(logits.shape[:-1])

    monkeypatch.setattr(loading, "load_model_calibrator", lambda model: Sure())
    argv = ["--model", tiny_model_dir, "--dataset", str(small_gsm8k), "--limit", "2", "--max-new-tokens", "6",
            "--strategies", "static:3,confadapt:0.99:3", "--format", "chat"]
    rc, _, err = _evaluate(capsys, *argv, "--calibrated", "--json", str(tmp_path / "cal.json"))
    assert rc == 0, err
    report = json.loads((tmp_path / "cal.json").read_text())
    static3, conf = report["runs"][1:]
    assert report["calibrated"] and conf["texts"] == static3["texts"]
    assert conf["tokens_per_forward_mean"] == static3["tokens_per_forward_mean"] > 1
    rc, _, err = _evaluate(capsys, *argv, "--no-calibration", "--json", str(tmp_path / "raw.json"))
    assert rc == 0, err
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert not raw["calibrated"] and raw["runs"][2]["tokens_per_forward_mean"] == 1  # random model: never sure


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "/nonexistent/gsm8k.jsonl"], "does not exist"),
    (["--limit", "0"], "limit"),
    (["--strategies", "static"], "static"),
    (["--strategies", "confadapt:1.5"], "tau"),
    (["--format", "fewshot"], "format"),
    (["--extract", "strict"], "--extract"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--bogus"], "unrecognized"),
    (["--json", "/nonexistent/dir/report.json"], "--json"),
])
def test_mtp_evaluate_bad_input(tiny_model_dir, small_gsm8k, capsys, extra, message):
    argv = ["--model", tiny_model_dir, "--dataset", str(small_gsm8k), "--max-new-tokens", "4", *extra]
    rc, out, err = _evaluate(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_mtp_evaluate_requires_model(capsys):
    rc, _, err = _evaluate(capsys, "--limit", "3")
    assert rc == 2 and "--model" in err
