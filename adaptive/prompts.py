"""Prompts in: JSON-lines files, command-line prompts, chat-template encodings and the held-out GSM8K questions.

Every decode-side command reads its prompts through here, so a bad file is the same one `error:` line everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import UserError


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
