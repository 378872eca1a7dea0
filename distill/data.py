"""Training data: question/answer rows -> token ids -> right-padded batches (paper §1.6, §7.2).

One example per row, never packed: every row is `query` and `response` joined either by the tokenizer's chat template
(user = query, assistant = response; the Llama-Magpie recipe) or as `BOS + query + "\\n\\n" + response + EOS` (the
"plain" join of the Qwen recipe; BOS/EOS only where the tokenizer has them). Tokenisation uses
`add_special_tokens=False` (the text already carries them) and truncates each row to the raw tokens one training step
can consume, `raw_tokens_needed(seq_len, num_regions, k_min)`: tokens past it are never seen by any (k, offset).

Rows are right-padded with the pad id and their real length is carried separately: with ChatML the pad/EOS token
`<|im_end|>` also closes every chat turn, so the first EOS id is *not* the end of a row.

Datasets come from the Hub (`openai/gsm8k` config "main", `meta-math/MetaMathQA`, any other with explicit columns) or
from a local .json/.jsonl/.parquet file, always through `datasets`.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError
from distill.files import first_line

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Hub datasets that need a config name.
HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
# (question column, answer column) pairs recognised without flags: GSM8K, MetaMathQA, already-mapped data.
KNOWN_COLUMNS = [("question", "answer"), ("query", "response")]
# MetaMathQA rewrites each GSM8K/MATH seed question many times; the paper's train/val split keeps every rewrite of a
# seed question on one side (§3.1, "stratified by seed question"), so this column is kept as the split group.
GROUP_COLUMN = "original_question"
FORMATS = ("auto", "chat", "plain")
# Local JSON files up to this size are read once up front, so a bad line is named (datasets' own message is not);
# larger ones go straight to datasets.
JSON_PRECHECK_BYTES = 256 * 2**20


def _is_local(name_or_path: str) -> bool:
    path = Path(name_or_path).expanduser()
    return path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or name_or_path.startswith((".", "/", "~"))


def _load_raw(name_or_path: str, split: str):
    import datasets

    if _is_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"dataset file {name_or_path} does not exist")
        builder = LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"unsupported dataset file {path.name}; use .json, .jsonl or .parquet")
        if path.stat().st_size == 0:
            raise UserError(f"dataset file {path} is empty")
        if builder == "json" and path.stat().st_size <= JSON_PRECHECK_BYTES:
            _check_json_file(path)  # names the bad line; datasets' own message does not
        try:  # a local file is a single split; `split` only selects hub splits
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # malformed JSON / parquet surfaces as several different exception types
            raise UserError(f"cannot read {path}: {first_line(exc)}") from exc
    try:
        return datasets.load_dataset(name_or_path, HUB_CONFIGS.get(name_or_path), split=split)
    except Exception as exc:  # offline mode, unknown repo, bad split: one line for the user
        raise UserError(f"cannot load dataset {name_or_path!r} (split {split!r}): {first_line(exc)}") from exc


def _check_json_file(path: Path) -> None:
    """UserError naming the problem (and the line) unless `path` is UTF-8 text holding one JSON document or one JSON
    object per non-blank line."""
    import json

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise UserError(f"dataset file {path} is empty")
    try:
        json.loads(text)
        return  # one JSON document (a list of rows, or a single row)
    except ValueError:
        pass
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends sit inside strings
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"cannot read {path}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"cannot read {path}: line {lineno} is a JSON {type(row).__name__}, not an object")


def _check_text_column(ds, column: str, name_or_path: str) -> None:
    """UserError naming the first row whose value in `column` is missing (null) or not a string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.data.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
        raise UserError(f"dataset {name_or_path}: column {column!r} must hold text, it holds {values.type}")
    if values.null_count:
        first = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
        raise UserError(f"dataset {name_or_path}: row {first} (0-based) has no {column!r} (null); {values.null_count} "
                        "row(s) lack it: drop or fill them")


def load_examples(name_or_path: str, split: str = "train", *, question_column: str | None = None,
                  answer_column: str | None = None):
    """A `datasets.Dataset` with columns "query" and "response" (plus "group" when the source has seed questions)."""
    ds = _load_raw(name_or_path, split)
    columns = ds.column_names
    if (question_column is None) != (answer_column is None):
        raise UserError("give both question_column and answer_column, or neither")
    if question_column is None:
        pair = next(((q, a) for q, a in KNOWN_COLUMNS if q in columns and a in columns), None)
        if pair is None:
            raise UserError(f"dataset {name_or_path} has columns {columns}; name the question and answer columns "
                            "explicitly (question_column / answer_column)")
        question_column, answer_column = pair
    for col in (question_column, answer_column):
        if col not in columns:
            raise UserError(f"dataset {name_or_path} has no column {col!r}; columns are {columns}")
    if question_column == answer_column:
        raise UserError("question_column and answer_column must differ")
    if len(ds) == 0:
        raise UserError(f"dataset {name_or_path} has no rows")
    for col in (question_column, answer_column):
        _check_text_column(ds, col, name_or_path)
    keep = {question_column: "query", answer_column: "response"}
    if GROUP_COLUMN in columns and GROUP_COLUMN not in keep:
        keep[GROUP_COLUMN] = "group"
    ds = ds.select_columns(list(keep))
    # Rename through temporary names so a swap such as query<->response cannot collide.
    ds = ds.rename_columns({old: f"__{new}" for old, new in keep.items()})
    return ds.rename_columns({f"__{new}": new for new in keep.values()})


QUESTION_COLUMNS = ("question", "query", "prompt")


@contextlib.contextmanager
def quiet_datasets():
    """datasets' own progress bars off inside the block (and back on after, if they were on)."""
    import datasets

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            datasets.enable_progress_bars()


def load_questions(name_or_path: str, split: str = "train", *, column: str | None = None) -> list[str]:
    """The prompts of a dataset, in order: `column`, else the first of question / query / prompt it has. A missing
    column or a row whose prompt is not a non-empty string is one UserError."""
    with quiet_datasets():  # the "Generating train split" bar of a local file is noise before a command's own bar
        ds = _load_raw(name_or_path, split)
    columns = ds.column_names
    if column is None:
        column = next((c for c in QUESTION_COLUMNS if c in columns), None)
        if column is None:
            raise UserError(f"dataset {name_or_path} has no prompt column ({' / '.join(QUESTION_COLUMNS)}); columns "
                            f"are {columns}; name it with --question-column")
    elif column not in columns:
        raise UserError(f"dataset {name_or_path} has no column {column!r}; columns are {columns}")
    questions = ds[column]
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"dataset {name_or_path}, row {i}: the {column!r} field is missing or empty")
    return list(questions)


def resolve_format(fmt: str, tokenizer) -> str:
    """"auto" -> "chat" when the tokenizer has a chat template, else "plain"."""
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        return "chat" if has_template else "plain"
    if fmt == "chat" and not has_template:
        raise UserError("the tokenizer has no chat template; use the plain format (dataset_format: plain)")
    return fmt


def format_example(query: str, response: str, tokenizer, fmt: str) -> str:
    """The training text of one row (§1.6): chat template, or BOS + query + "\\n\\n" + response + EOS."""
    if fmt == "chat":
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{tokenizer.bos_token or ''}{query}\n\n{response}{tokenizer.eos_token or ''}"


def prompt_text(query: str, tokenizer, fmt: str) -> str:
    """The head of `format_example` that precedes the response: what decoding conditions on before its first token."""
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{tokenizer.bos_token or ''}{query}\n\n"


def format_and_tokenize(ds, tokenizer, *, fmt: str = "chat", max_length: int, prompt_length: bool = False):
    """Dataset with the column "input_ids" (at most `max_length` ids per row). `fmt`: "chat", "plain" or "auto".
    `prompt_length`: also "prompt_length", the ids before the response (0 where the prompt's ids are not a prefix of
    the row's, so that every position stays eligible)."""
    if max_length < 2:
        raise UserError(f"max_length must be at least 2 (one input and one target), got {max_length}")
    fmt = resolve_format(fmt, tokenizer)
    missing = {"query", "response"} - set(ds.column_names)
    if missing:
        raise UserError(f"dataset lacks column(s) {sorted(missing)}; load it with load_examples first")

    def tokenize(batch):
        texts = [format_example(q, r, tokenizer, fmt) for q, r in zip(batch["query"], batch["response"])]
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"]}
        if prompt_length:
            heads = tokenizer([prompt_text(q, tokenizer, fmt) for q in batch["query"]], add_special_tokens=False)
            out["prompt_length"] = [len(h) if row[: len(h)] == h else 0
                                    for h, row in zip(heads["input_ids"], enc["input_ids"])]
        return out

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing ({fmt})")


def check_row_lengths(ds, min_tokens: int, what: str = "the dataset") -> None:
    """UserError when tokenized rows are too short to hold one MTP problem (a row whose regions all lack a real target
    would give an empty step; the caller computes `min_tokens` from the layout, distill.trainer.min_row_tokens)."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        raise UserError(f"{what} has no rows")
    lengths = pc.list_value_length(ds.with_format("arrow")[:]["input_ids"]).to_numpy(zero_copy_only=False)
    short = np.flatnonzero(lengths < min_tokens)
    if short.size:
        first = int(short[0])
        raise UserError(f"{short.size} of {len(ds)} rows of {what} are shorter than one MTP region (row {first} has "
                        f"{int(lengths[first])} tokens, a region needs {min_tokens}); drop the short rows or use a "
                        "smaller seq_len / more num_regions")


def train_eval_split(ds, eval_fraction: float, seed: int):
    """(train, eval) with a seeded split; eval is None when eval_fraction == 0. Rows sharing a "group" (a seed
    question) land on the same side."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return ds, None
    if len(ds) < 2:
        raise UserError(f"cannot carve an eval split out of {len(ds)} row(s)")
    target = max(1, round(eval_fraction * len(ds)))
    rng = np.random.default_rng(seed)
    if "group" in ds.column_names:
        groups = np.asarray(ds["group"], dtype=object)
        uniq, inverse = np.unique(groups.astype(str), return_inverse=True)
        if len(uniq) < 2:
            raise UserError("all rows share one seed question; cannot split train/eval by group")
        sizes = np.bincount(inverse)
        order = rng.permutation(len(uniq))
        # Take whole groups until the eval side is large enough, but never all of them.
        taken = np.searchsorted(np.cumsum(sizes[order]), target) + 1
        eval_groups = np.zeros(len(uniq), dtype=bool)
        eval_groups[order[: min(taken, len(uniq) - 1)]] = True
        is_eval = eval_groups[inverse]
    else:
        is_eval = np.zeros(len(ds), dtype=bool)
        is_eval[rng.permutation(len(ds))[: min(target, len(ds) - 1)]] = True
    return ds.select(np.flatnonzero(~is_eval)), ds.select(np.flatnonzero(is_eval))


class MTPCollator:
    """Right-pads rows to exactly `max_length` ids (build_layout gathers fixed source indices) and reports lengths."""

    def __init__(self, pad_token_id: int, max_length: int):
        if pad_token_id is None:
            raise UserError("the tokenizer has no pad token id")
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [list(f["input_ids"])[: self.max_length] for f in features]
        input_ids = torch.full((len(rows), self.max_length), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
        batch = {"input_ids": input_ids, "lengths": lengths}
        if features and "prompt_length" in features[0]:
            batch["prompt_lengths"] = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
        return batch
