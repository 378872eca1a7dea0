"""`mtp bench-decode` smoke test on the tiny model (timings are reported, never asserted)."""

from __future__ import annotations

import json
import math

import pytest

from adaptive.bench import format_table, held_out_questions
from distill.cli import main as mtp_main
from distill.errors import UserError


def test_bench_decode_json(tiny_model_dir, gsm8k_path, capsys):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, "--dataset", str(gsm8k_path), "--prompts", "3",
                   "--max-new-tokens", "5", "--batch-sizes", "1,2", "--k-max", "4", "--tau", "0.5", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)  # the whole stdout is one JSON document
    assert doc["batch_sizes"] == [1, 2] and doc["prompts"] == 3
    modes = ["hf-greedy", "hf-prompt-lookup", "static(k=1)", "static(k=3)", "confadapt(tau=0.5,k_max=4)",
             "selfspec(k_max=4)"]
    rows = doc["results"]
    assert [(r["batch_size"], r["mode"]) for r in rows] == [(b, m) for b in (1, 2) for m in modes]
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0 and math.isfinite(r["ratio_vs_hf_greedy"])
        assert r["ratio_vs_hf_greedy"] > 0 and r["tokens_per_forward"] >= 1.0
        assert r["tokens"] <= 3 * 5
    by = {(r["batch_size"], r["mode"]): r for r in rows}
    for b in (1, 2):
        assert by[(b, "hf-greedy")]["ratio_vs_hf_greedy"] == 1.0
        assert by[(b, "static(k=3)")]["tokens_per_forward"] > 1.0
        # Lossless modes reproduce greedy decoding on every prompt (fp32, tiny model).
        for mode in ("hf-prompt-lookup", "static(k=1)", "selfspec(k_max=4)"):
            assert by[(b, mode)]["lossless"] and by[(b, mode)]["equal_to_hf_greedy"] == "3/3"
        assert not by[(b, "confadapt(tau=0.5,k_max=4)")]["lossless"]
    assert by[(2, "hf-prompt-lookup")]["note"].startswith("row-by-row") and by[(1, "hf-prompt-lookup")]["note"] == ""
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 2 and "row-by-row" in table


def test_bench_decode_k_max_list_with_auto(tiny_model_dir, gsm8k_path, capsys):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, "--dataset", str(gsm8k_path), "--prompts", "2",
                   "--max-new-tokens", "4", "--batch-sizes", "2", "--k-max", "4,auto:3", "--tau", "0.5", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    modes = [r["mode"] for r in doc["results"]]
    assert modes == ["hf-greedy", "hf-prompt-lookup", "static(k=1)", "static(k=3)", "confadapt(tau=0.5,k_max=4)",
                     "confadapt(tau=0.5,k_max=auto:3)", "selfspec(k_max=4)", "selfspec(k_max=auto:3)"]
    by = {r["mode"]: r for r in doc["results"]}
    assert by["static(k=1)"]["ratio_vs_k1"] == 1.0 and by["selfspec(k_max=auto:3)"]["equal_to_hf_greedy"] == "2/2"
    acc = by["confadapt(tau=0.5,k_max=4)"]["acceptance"]
    assert acc["mean_acceptance_length"] == pytest.approx(by["confadapt(tau=0.5,k_max=4)"]["tokens_per_forward"])
    assert "acceptance" not in by["hf-greedy"]
    assert doc["k_max"] == [4, "auto:3"]


def test_held_out_questions_are_the_tail(gsm8k_path):
    lines = gsm8k_path.read_text().splitlines()
    assert held_out_questions(gsm8k_path, 2) == [json.loads(x)["question"] for x in lines[-2:]]


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--tau", "0"], "tau"),
    (["--dataset", "/nonexistent.jsonl"], "does not exist"),
    (["--k-max", "4,banana"], "k_max"),
])
def test_bench_decode_bad_input(tiny_model_dir, capsys, argv, message):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:")


def test_held_out_questions_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "a"}\n{"answer": "b"}\n')
    with pytest.raises(UserError, match=r"q.jsonl:2:"):
        held_out_questions(bad, 1)
