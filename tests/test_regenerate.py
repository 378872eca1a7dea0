"""`mtp regenerate` (adaptive/regenerate.py) and a recipe's `regenerate: true`, on the tiny random model.

A killed run must continue without duplicates or lost rows and end equal to an uninterrupted run; bad input (missing
model, prompts without the field, an output path holding something else, a fingerprint mismatch) must be one
`error:` line, exit 2, and change nothing; the output must train with `mtp train`; a recipe must never regenerate the
held-out tail and must reuse a matching file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive import regenerate as regen
from mtp_cli import main as cli
from mtp_cli import train as train_command
from mtp_cli.regenerate import main as regenerate_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("restore_environment")


@pytest.fixture
def prompts(gsm8k_path, tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    with open(gsm8k_path) as src:
        path.write_text("".join(next(src) for _ in range(6)))
    return path


def _argv(model: str, dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", model, "--dataset", str(dataset), "--output", str(output), "--max-new-tokens", "6",
            "--batch-size", "2", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class Killed(Exception):
    pass


def _kill_after_first_batch(done: int) -> None:
    raise Killed(done)


def test_interrupted_run_resumes_without_duplicates(tiny_model_dir, prompts, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert regenerate_main(_argv(tiny_model_dir, prompts, whole)) == 0
    assert "6 rows (6 decoded now, 0 resumed)" in capsys.readouterr().out

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        regenerate_main(_argv(tiny_model_dir, prompts, out), on_batch=_kill_after_first_batch)
    partial = Path(f"{out}.partial")
    assert not out.exists() and len(_rows(partial)) == 2
    assert regenerate_main(_argv(tiny_model_dir, prompts, out)) == 0
    assert "6 rows (4 decoded now, 2 resumed)" in capsys.readouterr().out
    assert not partial.exists() and not Path(f"{out}.partial.json").exists()
    assert out.read_bytes() == whole.read_bytes()
    rows = _rows(out)
    assert [r["row"] for r in rows] == list(range(6))
    questions = [json.loads(line)["question"] for line in prompts.read_text().splitlines()]
    assert [r["question"] for r in rows] == questions
    a, b = (json.loads(regen.fingerprint_path(p).read_text()) for p in (whole, out))
    assert a["fingerprint"] == b["fingerprint"] and a["sha256"] == b["sha256"] and a["summary"] == b["summary"]
    assert 0.0 <= b["summary"]["round_trip_rate"] <= 1.0 and b["summary"]["rows"] == 6

    # Run again: up to date, nothing is touched.
    before = _snapshot(tmp_path)
    assert regenerate_main(_argv(tiny_model_dir, prompts, out)) == 0
    assert "up to date" in capsys.readouterr().out
    assert _snapshot(tmp_path) == before


def test_sigkill_after_a_batch_and_a_torn_line_resume_exactly(tiny_model_dir, prompts, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert regenerate_main(_argv(tiny_model_dir, prompts, whole, "--start", "1", "--limit", "5")) == 0
    out = tmp_path / "out.jsonl"
    code = ("import os, signal, sys; from mtp_cli.regenerate import main; "
            "main(sys.argv[1:], on_batch=lambda done: os.kill(os.getpid(), signal.SIGKILL))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *_argv(tiny_model_dir, prompts, out, "--start", "1",
                                                              "--limit", "5")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = Path(f"{out}.partial")
    assert [r["row"] for r in _rows(partial)] == [1, 2]
    with open(partial, "a") as fh:  # a kill in the middle of the next batch's write
        fh.write('{"row": 3, "question": "Bet')
    assert regenerate_main(_argv(tiny_model_dir, prompts, out, "--start", "1", "--limit", "5")) == 0
    assert "5 rows (3 decoded now, 2 resumed)" in capsys.readouterr().out
    assert out.read_bytes() == whole.read_bytes()
    assert [r["row"] for r in _rows(out)] == [1, 2, 3, 4, 5]


def _fails(argv: list[str], capsys, folder: Path, message: str) -> None:
    before = _snapshot(folder)
    assert cli.main(["regenerate", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").strip().splitlines()  # progress bars of loading may come before it
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1, err
    assert _snapshot(folder) == before


def test_bad_input_is_one_error_line_and_changes_nothing(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    _fails(_argv(str(tmp_path / "no-model"), prompts, out), capsys, tmp_path, "does not exist")

    no_field = tmp_path / "answers.jsonl"
    no_field.write_text('{"answer": "4"}\n{"answer": "5"}\n')
    _fails(_argv(tiny_model_dir, no_field, out), capsys, tmp_path, "no prompt column")
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"question": "2+2?"}\n{"answer": "5"}\n')
    _fails(_argv(tiny_model_dir, holes, out), capsys, tmp_path, "row 1: the 'question' field is missing")
    _fails(_argv(tiny_model_dir, prompts, out, "--question-column", "prompt"), capsys, tmp_path,
           "no column 'prompt'")

    folder = tmp_path / "a-directory"
    folder.mkdir()
    _fails(_argv(tiny_model_dir, prompts, folder), capsys, tmp_path, "is a directory")
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"question": "q", "answer": "a"}\n')
    _fails(_argv(tiny_model_dir, prompts, foreign), capsys, tmp_path, "was not written by `mtp regenerate`")
    _fails(_argv(tiny_model_dir, prompts, foreign, "--overwrite"), capsys, tmp_path, "was not written by")
    _fails(_argv(tiny_model_dir, prompts, out, "--batch-size", "0"), capsys, tmp_path, "--batch-size must be >= 1")

    # A fingerprint mismatch: other settings, other prompts, or a partial run of other settings.
    assert regenerate_main(_argv(tiny_model_dir, prompts, out, "--limit", "2")) == 0
    _fails(_argv(tiny_model_dir, prompts, out, "--limit", "2", "--max-new-tokens", "7"), capsys, tmp_path,
           "different max_new_tokens")
    _fails(_argv(tiny_model_dir, prompts, out, "--limit", "2", "--start", "1"), capsys, tmp_path,
           "different prompts_sha256, start")
    other = tmp_path / "other.jsonl"
    with pytest.raises(Killed):
        regenerate_main(_argv(tiny_model_dir, prompts, other, "--limit", "4"), on_batch=_kill_after_first_batch)
    _fails(_argv(tiny_model_dir, prompts, other, "--limit", "4", "--max-new-tokens", "5"), capsys, tmp_path,
           "unfinished run with a different max_new_tokens")
    edited = out.read_text().replace('"row": 0', '"row": 0 ', 1)
    out.write_text(edited)
    _fails(_argv(tiny_model_dir, prompts, out, "--limit", "2"), capsys, tmp_path, "does not match its recorded sha256")

    # --overwrite replaces the file once the new one is complete.
    capsys.readouterr()
    assert regenerate_main(_argv(tiny_model_dir, prompts, out, "--limit", "2", "--max-new-tokens", "7",
                            "--overwrite")) == 0
    assert json.loads(regen.fingerprint_path(out).read_text())["fingerprint"]["max_new_tokens"] == 7


def test_the_output_trains_with_mtp_train(tiny_model_dir, prompts, tmp_path, capsys):
    data = tmp_path / "self.jsonl"
    assert regenerate_main(["--model", tiny_model_dir, "--dataset", str(prompts), "--output", str(data),
                       "--max-new-tokens", "48", "--batch-size", "3"]) == 0
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(out), "--dataset_name", str(data), "--eval_fraction", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--seq_len", "24", "--num_regions", "2", "--k_max", "4",
            "--save_strategy", "no", "--disable_tqdm", "true"]
    assert train_command.main(argv) == 0
    assert f"saved model + tokenizer to {out} (step 1)" in capsys.readouterr().out


def test_held_out_tail_covers_tune_calibrate_and_demo():
    from adaptive import tuner
    from mtp_cli import calibrate as calibration
    from adaptive.demo import Plan

    assert regen.HELD_OUT_TAIL >= max(tuner.DEFAULT_N, calibration.DEFAULT_N, Plan.for_minutes(24 * 60).held_out)


def test_recipe_regenerates_only_the_head_rows_and_reuses_them(tiny_model_dir, gsm8k_path, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("MTP_SELFDISTILL_CACHE", str(tmp_path / "cache"))
    dataset = tmp_path / "gsm8k-head.jsonl"
    with open(gsm8k_path) as src:
        dataset.write_text("".join(next(src) for _ in range(regen.HELD_OUT_TAIL + 10)))

    def args(out: str, *extra: str) -> list[str]:
        return ["--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--model_name_or_path", tiny_model_dir,
                "--output_dir", str(tmp_path / out), "--dataset_name", str(dataset), "--eval_fraction", "0",
                "--max_steps", "2", "--per_device_train_batch_size", "2", "--seq_len", "24", "--num_regions", "2",
                "--k_max", "4", "--save_strategy", "no", "--disable_tqdm", "true", "--regenerate", "true",
                "--regenerate_batch_size", "3", "--regenerate_max_new_tokens", "40", *extra]

    assert train_command.main(args("a")) == 0
    files = list((tmp_path / "cache" / "regenerated").glob("*.jsonl"))
    assert len(files) == 1
    rows = _rows(files[0])
    assert [r["row"] for r in rows] == list(range(6))  # 2 steps x 2 rows, rounded up to whole batches of 3
    assert json.loads(regen.fingerprint_path(files[0]).read_text())["source"]["by"] == "mtp train"
    assert "regenerate: decoding" in capsys.readouterr().out

    # A smaller run reuses the file; other settings make a new one.
    assert train_command.main(args("b", "--max_steps", "1")) == 0
    assert f"reusing {files[0]}" in capsys.readouterr().out
    assert train_command.main(args("c", "--regenerate_rows", "3", "--regenerate_max_new_tokens", "41")) == 0
    assert len(list((tmp_path / "cache" / "regenerated").glob("*.jsonl"))) == 2

    from distill.errors import UserError

    with pytest.raises(UserError, match="reaches into the last 200 rows"):
        train_command.main(args("d", "--regenerate_rows", "11"))


def test_tokenizer_digest_ignores_the_state_encoding_leaves(tiny_model_dir):
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    before = regen.tokenizer_digest(tokenizer)
    tokenizer(["a b c d e f", "g"], truncation=True, max_length=3, padding=True)
    assert regen.tokenizer_digest(tokenizer) == before
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert regen.tokenizer_digest(tokenizer) != before
