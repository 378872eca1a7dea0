"""distill/data.py: loading + column mapping, chat/plain formatting, seeded (grouped) split, the collator."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distill.data import MTPCollator, format_and_tokenize, load_examples, resolve_format, train_eval_split
from distill.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from distill.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_columns_are_mapped(gsm8k_path):
    ds = load_examples(str(gsm8k_path))
    assert ds.column_names == ["query", "response"] and len(ds) == 7473
    assert ds[0]["query"].startswith("Natalia sold clips") and ds[0]["response"].endswith("#### 72")


def test_metamathqa_columns_keep_the_seed_question_as_group(tmp_path):
    rows = [{"query": f"q{i}", "response": f"r{i}", "type": "GSM_Rephrased", "original_question": f"seed{i % 3}"}
            for i in range(9)]
    ds = load_examples(str(write_jsonl(tmp_path / "mm.jsonl", rows)))
    assert sorted(ds.column_names) == ["group", "query", "response"]
    assert ds[4] == {"query": "q4", "response": "r4", "group": "seed1"}


def test_explicit_columns_override_and_swap(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "question": "qq", "answer": "aa"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    ds = load_examples(str(path), question_column="prompt", answer_column="completion")
    assert ds[0] == {"query": "p", "response": "c"}
    swapped = load_examples(str(path), question_column="answer", answer_column="question")
    assert swapped[0] == {"query": "aa", "response": "qq"}


def test_parquet_file(tmp_path, gsm8k_path):
    import datasets

    path = tmp_path / "g.parquet"
    datasets.load_dataset("json", data_files=str(gsm8k_path), split="train").select(range(5)).to_parquet(str(path))
    assert len(load_examples(str(path))) == 5


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"a": "1", "b": "2"}])
    with pytest.raises(UserError, match="name the question and answer columns"):
        load_examples(str(odd))
    with pytest.raises(UserError, match="no column 'nope'"):
        load_examples(str(odd), question_column="nope", answer_column="b")
    with pytest.raises(UserError, match="both"):
        load_examples(str(odd), question_column="a")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="unsupported"):
        load_examples(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match="cannot read"):
        load_examples(str(broken))


def test_hub_name_offline_is_a_user_error():
    with pytest.raises(UserError, match="cannot load dataset 'openai/gsm8k'"):
        load_examples("openai/gsm8k")


def _one_row():
    import datasets

    return datasets.Dataset.from_dict({"query": ["What is 2+3?"], "response": ["2+3 = 5.\n#### 5"]})


def test_chat_format_is_the_template_tokenized_once(tokenizer):
    ids = format_and_tokenize(_one_row(), tokenizer, fmt="chat", max_length=512)[0]["input_ids"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5.\n#### 5"}],
        tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no extra BOS


def test_plain_format_is_bos_query_blank_line_response_eos(tokenizer):
    ids = format_and_tokenize(_one_row(), tokenizer, fmt="plain", max_length=512)[0]["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == "What is 2+3?\n\n2+3 = 5.\n#### 5"


def test_plain_format_without_bos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    ids = format_and_tokenize(_one_row(), tok, fmt="plain", max_length=512)[0]["input_ids"]
    assert tok.decode(ids) == "What is 2+3?\n\n2+3 = 5.\n#### 5" + tok.eos_token


def test_format_choice(tokenizer):
    assert resolve_format("auto", tokenizer) == "chat"
    plain_tok = copy.deepcopy(tokenizer)
    plain_tok.chat_template = None
    assert resolve_format("auto", plain_tok) == "plain"
    with pytest.raises(UserError, match="no chat template"):
        resolve_format("chat", plain_tok)
    with pytest.raises(UserError, match="unknown dataset format"):
        resolve_format("markdown", tokenizer)


def test_truncation_to_max_length(tokenizer, gsm8k_path):
    ds = load_examples(str(gsm8k_path)).select(range(20))
    out = format_and_tokenize(ds, tokenizer, fmt="chat", max_length=40)
    assert out.column_names == ["input_ids"]
    lengths = [len(r) for r in out["input_ids"]]
    assert max(lengths) == 40
    full = format_and_tokenize(ds, tokenizer, fmt="chat", max_length=10_000)
    assert all(a == b[:40] for a, b in zip(out["input_ids"], full["input_ids"]))


def test_split_is_seeded_and_disjoint(gsm8k_path):
    ds = load_examples(str(gsm8k_path)).select(range(200))
    train, ev = train_eval_split(ds, 0.1, seed=3)
    assert len(ev) == 20 and len(train) == 180
    assert set(train["query"]).isdisjoint(ev["query"])
    assert train_eval_split(ds, 0.1, seed=3)[1]["query"] == ev["query"]
    assert train_eval_split(ds, 0.1, seed=4)[1]["query"] != ev["query"]
    assert train_eval_split(ds, 0.0, seed=3) == (ds, None)
    with pytest.raises(UserError):
        train_eval_split(ds, 1.0, seed=3)


def test_grouped_split_keeps_seed_questions_together():
    import datasets

    groups = [f"g{i % 7}" for i in range(70)]
    ds = datasets.Dataset.from_dict({"query": [str(i) for i in range(70)], "response": ["r"] * 70, "group": groups})
    train, ev = train_eval_split(ds, 0.2, seed=0)
    assert set(train["group"]).isdisjoint(ev["group"])
    assert len(train) + len(ev) == 70 and len(ev) >= 14 and len(train) > 0


def test_collator_right_pads_to_max_length():
    collate = MTPCollator(pad_token_id=2, max_length=6)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [9, 2, 8, 2, 4, 4, 4, 4]}, {"input_ids": []}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 2, 2], [9, 2, 8, 2, 4, 4], [2] * 6]
    assert batch["lengths"].tolist() == [3, 6, 0]  # lengths, not the first pad/EOS id (ChatML reuses it)
    assert batch["input_ids"].dtype == torch.long
