"""GSM8K as the paper evaluates it (§3.3): lm-eval's `gsm8k_cot` prompt, its stop strings and its answer extraction.

The protocol follows the paper's lm-eval setup (§3.3): GSM8K chain-of-thought with lm-eval's 8 `gsm8k_cot` exemplars
("Q: ... A: ...") plus the "Let's think step by step." suffix of the paper's singleshot variant, greedy decoding that
stops at "Q:" or a model stop token, and the answer read with lm-eval's flexible extraction. `--format chat` instead
asks the question zero-shot as one user turn of the chat template, the format `mtp train` distils on. The exemplars
and the template are read from the installed lm-eval package (tasks/gsm8k/gsm8k-cot.yaml), so the prompt is the one
lm-eval itself builds.

Two answer extractions (`EXTRACTIONS`), each with the comparison that goes with it (`answer_key`, `gold_key`):

* "flexible": lm-eval gsm8k_cot's "flexible-extract" filter, exactly: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`
  (`flexible_extract`), compared as lm-eval's exact_match compares it: ",", "$" and one final "." dropped, lower case
  (`exact_match_form`). The gold is the "#### N" number of the GSM8K answer, which for GSM8K's integer answers is
  lm-eval's reference after the same regexes. `mtp evaluate` scores with this one by default.
* "project": the first "The answer is N" (lm-eval strict-match), else the first "#### N" (GSM8K's format), else the
  last number (`extract_answer`), compared as numbers (`normalize_number`). It differs from lm-eval's flexible regex
  twice, deliberately: a match without a digit ("...", "$.") is skipped instead of taken as the answer, and so is a
  number glued to the end of a word ("H2O", "mp3", "Q2"), which is part of a name, not a result. The tuner and
  `mtp demo` (through `run_eval`'s default) read answers with it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from adaptive.prompts import chat_ids
from distill.errors import UserError

PROMPT_FORMATS = ("cot8", "chat")
# lm-eval gsm8k_cot's `until` (gsm8k-cot.yaml); the chat format stops on the model's stop tokens only.
STOP_STRINGS = {"cot8": ["Q:", "</s>", "<|im_end|>"], "chat": None}
# The paper's singleshot variant of gsm8k_cot appends this to the question's "A:" (§3.3).
COT_SUFFIX = " Let's think step by step."
EXTRACTIONS = ("flexible", "project")

# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction (lm-eval gsm8k-cot.yaml filters and metric)

# strict-match: "The answer is N" (the exemplars' closing sentence); the number must end in a digit, so the sentence's
# full stop is not part of it.
_STRICT = re.compile(r"The answer is[:\s]*\$?\s*(-?[0-9.,]*[0-9])", re.IGNORECASE)
# GSM8K's own answer format, which a model distilled on GSM8K solutions writes.
_MARKED = re.compile(r"####\s*\$?\s*(-?[0-9.,]*[0-9])")
# flexible-extract, verbatim from gsm8k-cot.yaml: the last match wins.
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)
# exact_match's regexes_to_ignore in gsm8k-cot.yaml, applied in this order (with ignore_case: true).
IGNORED_PATTERNS = (",", r"\$", "(?s).*#### ", r"\.$")


def normalize_number(raw: str) -> str | None:
    """"$1,234.50" -> "1234.5", "18.00" -> "18", "72." -> "72"; a string that is not one number is kept as written
    (minus commas and "$"); None when nothing is left. What lm-eval's exact_match ignores (",", "$", a final ".") is
    dropped, and equal numbers written differently compare equal."""
    text = raw.replace(",", "").replace("$", "").strip().rstrip(".")
    if not text or text == "-":
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    out = format(value.normalize(), "f")
    return "0" if out == "-0" else out


def extract_answer(text: str) -> str | None:
    """The project's extraction: the final answer of a GSM8K solution, normalised (see `normalize_number`); None if
    there is no number.

    Order: the first "The answer is N" (lm-eval strict-match), else the first "#### N" (GSM8K's format), else the last
    number (lm-eval flexible-extract). Two deliberate differences from lm-eval's flexible regex: a match without a
    digit ("...", "$.") is skipped instead of taken as the answer, and so is a number glued to the end of a word
    ("H2O", "mp3", "Q2"), which is part of a name, not a result.
    """
    if not isinstance(text, str):
        return None
    for pattern in (_STRICT, _MARKED):
        match = pattern.search(text)
        if match and (value := normalize_number(match.group(1))) is not None:
            return value
    for match in reversed(list(_FLEXIBLE.finditer(text))):
        start = match.start()
        if not any(c.isdigit() for c in match.group(0)) or (start and text[start - 1].isalpha()):
            continue
        if (value := normalize_number(match.group(0))) is not None:
            return value
    return None


def flexible_extract(text: str) -> str | None:
    """lm-eval gsm8k_cot's "flexible-extract" filter (RegexFilter with group_select -1, then take_first): the last
    match of FLEXIBLE_PATTERN, its non-empty group, stripped; None where lm-eval writes its fallback "[invalid]"."""
    matches = _FLEXIBLE.findall(text) if isinstance(text, str) else []
    if not matches:
        return None
    groups = [group for group in matches[-1] if group]
    return groups[0].strip() if groups else None


def exact_match_form(answer: str) -> str:
    """What lm-eval's exact_match compares for gsm8k_cot: IGNORED_PATTERNS removed in order, then lower case."""
    for pattern in IGNORED_PATTERNS:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def answer_key(text: str, extract: str = "project") -> str | None:
    """A generation's answer in the form compared with the gold and between runs; None when there is none."""
    if extract == "flexible":
        raw = flexible_extract(text)
        return None if raw is None else exact_match_form(raw)
    if extract == "project":
        return extract_answer(text)
    raise UserError(f"unknown answer extraction {extract!r}; choose one of: {', '.join(EXTRACTIONS)}")


def gold_key(gold: str, extract: str = "project") -> str | None:
    """A gold answer (a `gold_answer` string) in the form `answer_key` gives for `extract`."""
    return exact_match_form(gold) if extract == "flexible" else normalize_number(gold)


def gold_answer(answer_field: str) -> str:
    """The number after "####" in a GSM8K answer (normalised); a bare number is accepted as its own answer."""
    if not isinstance(answer_field, str):
        raise UserError(f"answer must be a string, got {type(answer_field).__name__}")
    marked = "####" in answer_field
    value = normalize_number(answer_field.rsplit("####", 1)[-1] if marked else answer_field)
    if value is None or (not marked and extract_answer(answer_field) != value):
        raise UserError(f"answer has no final '#### N' line: {answer_field[-60:]!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Problems and prompts


def load_problems(dataset: str, split: str = "test", *, limit: int | None = None, start: int = 0) -> list[dict]:
    """[{"question", "answer" (gold, normalised), "index"}] from a hub name (openai/gsm8k, config "main") or a local
    .jsonl/.json/.parquet file with question/answer columns; rows start .. start+limit."""
    from distill.data import load_examples

    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise UserError(f"start must be a non-negative integer, got {start!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, got {limit!r}")
    ds = load_examples(dataset, split)
    if start >= len(ds):
        raise UserError(f"dataset {dataset} has {len(ds)} rows; --start {start} is past the end")
    end = len(ds) if limit is None else min(len(ds), start + limit)
    rows = ds.select(range(start, end))
    problems = []
    for index, question, answer in zip(range(start, end), rows["query"], rows["response"]):
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"dataset {dataset} row {index}: empty or non-text question")
        try:
            gold = gold_answer(answer)
        except UserError as exc:
            raise UserError(f"dataset {dataset} row {index}: {exc}") from None
        problems.append({"question": question, "answer": gold, "index": index})
    return problems


def gsm8k_cot_path() -> Path:
    """lm-eval's gsm8k_cot task definition in the installed package (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "gsm8k" / "gsm8k-cot.yaml" if spec else None
    if path is None or not path.is_file():
        raise UserError("lm-eval's tasks/gsm8k/gsm8k-cot.yaml not found; install lm-eval (pip install lm-eval==0.4.13)")
    return path


def gsm8k_cot_config() -> dict:
    """gsm8k-cot.yaml parsed; unknown tags such as `!function` are read as plain values (only data is used here)."""
    import yaml

    path = gsm8k_cot_path()

    class Lenient(yaml.SafeLoader):
        pass

    def any_tag(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)

    Lenient.add_multi_constructor("!", any_tag)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Lenient)


@functools.lru_cache(maxsize=1)
def cot8_context() -> tuple[str, str]:
    """(8-shot context, question template) exactly as lm-eval renders gsm8k_cot without a chat template: each exemplar
    is doc_to_text + target delimiter " " + target, each closed by the few-shot delimiter "\\n\\n"."""
    from lm_eval.utils import apply_template

    config = gsm8k_cot_config()
    shots = config["fewshot_config"]["samples"][: config.get("num_fewshot", 8)]
    target_delimiter = config.get("target_delimiter", " ")
    fewshot_delimiter = config.get("fewshot_delimiter", "\n\n")
    context = "".join(apply_template(config["doc_to_text"], shot) + target_delimiter + shot["target"]
                      + fewshot_delimiter for shot in shots)
    return context, config["doc_to_text"]


def build_prompt(question: str, prompt_format: str = "cot8", tokenizer=None) -> str | list[int]:
    """"cot8": the 8-shot plain-text prompt ending "A: Let's think step by step." (feed without a chat template, stop at
    STOP_STRINGS["cot8"]). "chat": the token ids of the question as one user turn of the chat template (needs the
    tokenizer), zero-shot."""
    if not isinstance(question, str) or not question.strip():
        raise UserError("empty question")
    if prompt_format == "cot8":
        from lm_eval.utils import apply_template

        context, template = cot8_context()
        return context + apply_template(template, {"question": question}) + COT_SUFFIX
    if prompt_format == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("--format chat needs a tokenizer with a chat template; use --format cot8")
        return chat_ids(tokenizer, question)
    raise UserError(f"unknown prompt format {prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")


def encode_prompt(question: str, prompt_format: str, tokenizer) -> list[int]:
    prompt = build_prompt(question, prompt_format, tokenizer)
    return prompt if isinstance(prompt, list) else list(tokenizer(prompt)["input_ids"])
