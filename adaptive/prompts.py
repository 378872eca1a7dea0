"""Prompts in: JSON-lines files, command-line prompts, chat-template encodings, the held-out GSM8K questions and
decoding batches of similar length.

Every decode-side command reads its prompts through here, so a bad file is the same one `error:` line everywhere.

Chat template: a question is fed as one user turn followed by the assistant header (`chat_ids`), the same ids
`mtp generate`, `mtp bench-decode`, `mtp evaluate --format chat` and `mtp train`'s chat format put before an answer.

Held-out tail: the last rows of a dataset (`held_out_tail`) are the ones a default training run is least likely to
have seen; `mtp tune` (its default --n), `mtp calibrate`, `mtp bench-decode` and `mtp demo` take their questions from
there, never from `mtp evaluate`'s test split, and a recipe's `regenerate: true` never regenerates the last
HELD_OUT_TAIL rows.

Batching: prompts decoded together are sorted longest first (`length_sorted_batches`), so similar lengths share a
batch and waste fewer pad columns; callers put the results back in their own order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from distill.errors import UserError

# Rows at the end of a dataset that the tuner (default --n 200), the calibrator (32) and the demo (at most 92) hold
# out; tests/test_regenerate.py checks it covers all three.
HELD_OUT_TAIL = 200


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; a missing file or a bad line is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends sit inside strings
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def read_prompts(prompts: list[str] | None, batch_file: str | None) -> list[str]:
    """--prompt values, then the prompts of a JSON-lines file ({"prompt": ...} per line; blank lines skipped)."""
    out = list(prompts or [])
    if batch_file:
        path = Path(batch_file)
        for lineno, row in read_jsonl(path, "batch file"):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f'{path}:{lineno}: expected an object with a string "prompt" field')
            out.append(row["prompt"])
    if not out:
        raise UserError("no prompt given; pass --prompt TEXT or --batch-file prompts.jsonl")
    for p in out:
        if not p.strip():
            raise UserError("empty prompt")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
            raise UserError(f"prompt {p[:40]!r} is not valid UTF-8 text") from None
    return out


def load_prompts(path, n: int | None = None) -> list[dict]:
    """Unlabelled problems from a JSON-lines file: one object per line with a string "prompt" or "question" field
    (blank lines skipped); the first n. UserError for a missing file, a bad line or a file without prompts."""
    problems = []
    for lineno, row in read_jsonl(path, "--prompts file"):
        text = row.get("prompt", row.get("question")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f'{path}:{lineno}: expected an object with a non-empty string "prompt" or "question" '
                            "field")
        problems.append({"question": text, "answer": None, "index": lineno})
    if not problems:
        raise UserError(f"--prompts file {path} holds no prompts")
    return problems[:n] if n is not None else problems


def chat_ids(tokenizer, question: str) -> list[int]:
    """The token ids of `question` as one user turn of the tokenizer's chat template, assistant header included
    (the caller checks that the tokenizer has a template)."""
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def held_out_tail(rows: Sequence, n: int) -> tuple[Sequence, int]:
    """(the last n rows, the index of the first of them). With fewer than n rows: all of them, from 0; the caller
    says in its own words that it asked for more."""
    start = max(0, len(rows) - n)
    return rows[start:], start


def longest_first(items: Sequence, length: Callable = len) -> list[int]:
    """The indices of `items`, longest first (ties keep their order)."""
    return sorted(range(len(items)), key=lambda i: -length(items[i]))


def length_sorted_batches(items: Sequence, batch_size: int, length: Callable = len) -> Iterator[list[int]]:
    """Chunks of at most `batch_size` indices of `items`, longest first: similar lengths in one batch waste fewer pad
    columns; the caller puts each result back at its index."""
    order = longest_first(items, length)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
