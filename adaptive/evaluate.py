"""`mtp evaluate`: GSM8K accuracy and speed of decoding strategies on one checkpoint (paper §3.3, §5.2).

    mtp evaluate --model DIR [--dataset test.jsonl|openai/gsm8k] [--limit N] [--start S] [--format cot8|chat]
                 [--strategies "static:3,confadapt:0.9:16,selfspec:16"] [--max-new-tokens 256] [--json report.json]

The protocol follows the paper's lm-eval setup (§3.3): GSM8K chain-of-thought with lm-eval's 8 `gsm8k_cot` exemplars
("Q: ... A: ...") plus the "Let's think step by step." suffix of the paper's singleshot variant, greedy decoding that
stops at "Q:" or a model stop token, and the answer read with lm-eval's flexible extraction. Accuracy is reported with
lm-eval's standard error sqrt(p(1-p)/(n-1)). `--format chat` instead asks the question zero-shot as one user turn of
the chat template, the format `mtp train` distils on.

Static(1), plain next-token decoding of the same checkpoint, always runs first: every other strategy is compared with
it ("agreement": the fraction of problems where both extract the same answer) because MTP decoding trades agreement
with k=1 for speed. Speed is tokens per forward pass, mean ± std over all decoding steps of all generations (the
paper's "Eff. k", §3.3), and wall-clock generated tokens per second measured around the decoder calls only.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path

from adaptive.loading import DTYPES, GSM8K_LOCAL, load_mtp_model, mtp_defaults, stop_ids
from mtp_cli.args import Parser as _Parser
from distill.errors import UserError

PROMPT_FORMATS = ("cot8", "chat")
# lm-eval gsm8k_cot's `until` (gsm8k-cot.yaml); the chat format stops on the model's stop tokens only.
STOP_STRINGS = {"cot8": ["Q:", "</s>", "<|im_end|>"], "chat": None}
# The paper's singleshot variant of gsm8k_cot appends this to the question's "A:" (§3.3).
COT_SUFFIX = " Let's think step by step."
GSM8K_TEST = GSM8K_LOCAL.with_name("test.jsonl")
DEFAULT_STRATEGIES = "static:3,confadapt,selfspec"

# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction (lm-eval gsm8k-cot.yaml filters)

# strict-match: "The answer is N" (the exemplars' closing sentence); the number must end in a digit, so the sentence's
# full stop is not part of it.
_STRICT = re.compile(r"The answer is[:\s]*\$?\s*(-?[0-9.,]*[0-9])", re.IGNORECASE)
# GSM8K's own answer format, which a model distilled on GSM8K solutions writes.
_MARKED = re.compile(r"####\s*\$?\s*(-?[0-9.,]*[0-9])")
# flexible-extract, verbatim from gsm8k-cot.yaml: the last match wins.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


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
    """The final answer of a GSM8K solution, normalised (see `normalize_number`); None if there is no number.

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


def _gsm8k_cot_path() -> Path:
    """lm-eval's gsm8k_cot task definition in the installed package (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "gsm8k" / "gsm8k-cot.yaml" if spec else None
    if path is None or not path.is_file():
        raise UserError("lm-eval's tasks/gsm8k/gsm8k-cot.yaml not found; install lm-eval (pip install lm-eval==0.4.13)")
    return path


def _gsm8k_cot_config() -> dict:
    """gsm8k-cot.yaml parsed; unknown tags such as `!function` are read as plain values (only data is used here)."""
    import yaml

    path = _gsm8k_cot_path()

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

    config = _gsm8k_cot_config()
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
        return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    raise UserError(f"unknown prompt format {prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")


def encode_prompt(question: str, prompt_format: str, tokenizer) -> list[int]:
    prompt = build_prompt(question, prompt_format, tokenizer)
    return prompt if isinstance(prompt, list) else list(tokenizer(prompt)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# One evaluation run


@dataclass
class EvalReport:
    label: str
    n: int
    accuracy: float
    stderr: float  # lm-eval's sqrt(p(1-p)/(n-1)); NaN for n = 1
    agreement: float | None  # fraction of answers equal to the reference (k=1) run's; None without a reference
    tokens_per_forward_mean: float  # over all decoding steps of all generations (paper §3.3 "Eff. k")
    tokens_per_forward_std: float
    tokens: int
    forwards: int
    seconds: float  # wall-clock inside the decoder calls (prefill + decode)
    tokens_per_second: float
    answers: list[str | None]
    correct: list[bool]
    results: list  # the GenerationResults (not serialised)
    texts: list[str] = field(default_factory=list)  # generated texts, cut at the stop string
    finish_reasons: dict = field(default_factory=dict)  # {"stop": n, "length": m}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "results"}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def run_eval(decoder, problems: list[dict], strategy, *, prompt_format: str = "cot8", max_new_tokens: int = 256,
             batch_size: int = 16, reference: EvalReport | None = None, progress: bool = True,
             on_step=None) -> EvalReport:
    """Decode every problem with `strategy` (batches of similar prompt length), extract answers and score them.

    `on_step`: passed to every `decoder.generate` call of this run (e.g. a calibration collector)."""
    from tqdm.auto import tqdm

    if not problems:
        raise UserError("no problems to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if reference is not None and reference.n != len(problems):
        raise UserError(f"the reference run has {reference.n} answers for {len(problems)} problems")
    prompts = [encode_prompt(p["question"], prompt_format, decoder.tokenizer) for p in problems]
    stop_strings = STOP_STRINGS[prompt_format]
    # similar lengths in one batch waste fewer pad columns; results go back to problem order
    order = sorted(range(len(problems)), key=lambda i: -len(prompts[i]))
    results: list = [None] * len(problems)
    if getattr(strategy, "auto", False):  # the one-time forward-cost measurement stays out of the timed decode
        decoder.forward_cost.prepare(min(batch_size, len(problems)))
    seconds = 0.0
    with tqdm(total=len(problems), desc=f"evaluate {strategy.label}", unit="problem", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            began = time.perf_counter()
            batch = decoder.generate([prompts[i] for i in chunk], strategy, max_new_tokens,
                                     stop_strings=stop_strings, on_step=on_step)
            seconds += time.perf_counter() - began
            for i, result in zip(chunk, batch):
                result.prompt = problems[i]["question"]
                results[i] = result
            bar.update(len(chunk))

    answers = [extract_answer(r.text) for r in results]
    gold = [normalize_number(str(p["answer"])) for p in problems]
    correct = [a is not None and a == g for a, g in zip(answers, gold)]
    n = len(problems)
    accuracy = sum(correct) / n
    steps = [k for r in results for k in r.accepted_per_step]
    tokens = sum(len(r.token_ids) for r in results)
    agreement = None
    if reference is not None:  # two runs that both find no answer agree: they produced the same (missing) answer
        agreement = sum(a == b for a, b in zip(answers, reference.answers)) / n
    reasons: dict = {}
    for r in results:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    return EvalReport(
        label=strategy.label,
        n=n,
        accuracy=accuracy,
        stderr=math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan"),
        agreement=agreement,
        tokens_per_forward_mean=statistics.fmean(steps) if steps else 0.0,
        tokens_per_forward_std=statistics.pstdev(steps) if steps else 0.0,
        tokens=tokens,
        forwards=len(steps),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        answers=answers,
        correct=correct,
        results=results,
        texts=[r.text for r in results],
        finish_reasons=reasons,
    )


# ---------------------------------------------------------------------------------------------------------------------
# mtp evaluate


def parse_strategies(spec: str, defaults: dict) -> list:
    """"static:3,confadapt:0.9:16,selfspec:16" -> strategies. confadapt[:TAU[:K_MAX]] and selfspec[:K_MAX] take the
    model's decoding defaults (generation config, e.g. written by `mtp tune`) for what is left out."""
    from adaptive.strategies import make_strategy

    out, labels = [], set()
    for item in spec.split(","):
        name, *values = [part.strip() for part in item.strip().split(":")]
        name = name.lower()
        arity = {"static": (1, 1), "confadapt": (0, 2), "selfspec": (0, 1)}.get(name)
        if arity is None:
            raise UserError(f"unknown strategy {item.strip()!r} in --strategies; use static:K, confadapt[:TAU[:K_MAX]] "
                            "or selfspec[:K_MAX], comma-separated")
        if not arity[0] <= len(values) <= arity[1]:
            raise UserError(f"--strategies item {item.strip()!r}: {name} takes "
                            + ("K" if name == "static" else "at most " + str(arity[1]) + " value(s)"))
        try:
            if name == "static":
                strategy = make_strategy(name, k=int(values[0]))
            elif name == "confadapt":
                tau = float(values[0]) if values else defaults["tau"]
                strategy = make_strategy(name, tau=tau, k_max=values[1] if len(values) > 1 else defaults["k_max"])
            else:
                strategy = make_strategy(name, k_max=values[0] if values else defaults["k_max"])
        except ValueError:
            raise UserError(f"--strategies item {item.strip()!r}: K and K_MAX must be integers, TAU a number") from None
        if strategy.label not in labels:
            labels.add(strategy.label)
            out.append(strategy)
    return out


def _load_calibrator(model: str):
    """The calibrator saved beside the model by `mtp calibrate`, or None."""
    from adaptive.calibration import load_calibrator
    from distill.models import resolve_model_path

    return load_calibrator(resolve_model_path(model))


def write_json(path: Path, payload: dict) -> Path:
    """Atomic: a reader never sees a half-written report, and a failure leaves any earlier file intact."""
    from distill.files import write_text_atomically

    return write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def format_table(reports: list[EvalReport], reference: EvalReport) -> str:
    lines = [f"{'strategy':<30} {'accuracy':>15} {'agree':>6} {'tok/fwd':>13} {'tok/s':>8} {'x k=1':>6}"]
    for r in reports:
        acc = f"{r.accuracy:.3f}" + (f" ± {r.stderr:.3f}" if math.isfinite(r.stderr) else "")
        agree = "ref" if r is reference else ("-" if r.agreement is None else f"{r.agreement:.3f}")
        ratio = r.tokens_per_second / reference.tokens_per_second if reference.tokens_per_second else float("nan")
        lines.append(f"{r.label:<30} {acc:>15} {agree:>6} "
                     f"{r.tokens_per_forward_mean:>5.2f} ± {r.tokens_per_forward_std:<5.2f} "
                     f"{r.tokens_per_second:>8.1f} {ratio:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import ConfAdapt, Static

    default_dataset = str(GSM8K_TEST)
    parser = _Parser(prog="mtp evaluate", description="GSM8K accuracy (flexible-extract, ± stderr), agreement with "
                     "k=1 decoding of the same checkpoint, tokens per forward and wall-clock speed of each strategy.")
    parser.add_argument("--model", required=True, help="MTP model directory (from mtp train / mtp export) or alias")
    parser.add_argument("--dataset", default=default_dataset,
                        help=f"local .jsonl/.json/.parquet or hub name (default {default_dataset})")
    parser.add_argument("--split", default="test", help="hub split (default test; a local file is one split)")
    parser.add_argument("--limit", type=int, help="number of problems (default: all)")
    parser.add_argument("--start", type=int, default=0, help="first problem (row index)")
    parser.add_argument("--format", choices=PROMPT_FORMATS, default="cot8",
                        help="cot8: lm-eval gsm8k_cot 8-shot + \"Let's think step by step.\" (default); "
                        "chat: zero-shot, one user turn of the chat template")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help="comma-separated static:K, confadapt[:TAU[:K_MAX]], selfspec[:K_MAX]; values left out "
                        f"come from the model's generation config (default {DEFAULT_STRATEGIES!r}); "
                        "static:1 (the reference) always runs first")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-calibration", action="store_true",
                        help="ConfAdapt on raw confidences even if the model has a fitted calibrator")
    parser.add_argument("--json", help="write the full report (every answer and text) to this JSON file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        raise UserError(f"--json {json_path}: not a file in an existing directory")
    strategies = parse_strategies(args.strategies, mtp_defaults(args.model))
    strategies = [s for s in strategies if s.label != Static(1).label]
    problems = load_problems(args.dataset, args.split, limit=args.limit, start=args.start)

    model, tokenizer = load_mtp_model(args.model, args.dtype)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))
    encode_prompt(problems[0]["question"], args.format, tokenizer)  # a bad --format fails before any decoding
    calibrator = None if args.no_calibration else _load_calibrator(args.model)
    if calibrator is not None:
        strategies = [ConfAdapt(s.tau, s.k_max, scorer=calibrator) if isinstance(s, ConfAdapt) else s
                      for s in strategies]
        print(f"ConfAdapt uses the model's fitted {getattr(calibrator, 'method', '')} calibrator "
              "(--no-calibration for raw confidences)", file=sys.stderr)
    print(f"evaluating {args.model} on {len(problems)} problems of {args.dataset} (from row {args.start}), "
          f"format {args.format}, max {args.max_new_tokens} new tokens", file=sys.stderr, flush=True)
    decoder.generate([encode_prompt(problems[0]["question"], args.format, tokenizer)], Static(1), 2)  # warm-up

    common = dict(prompt_format=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    reference = run_eval(decoder, problems, Static(1), **common)
    reports = [reference] + [run_eval(decoder, problems, s, reference=reference, **common) for s in strategies]
    print(format_table(reports, reference))

    if json_path is not None:
        from adaptive.metrics import acceptance_metrics, is_speculative

        runs = []
        for r, strategy in zip(reports, [Static(1)] + strategies):
            ratio = r.tokens_per_second / reference.tokens_per_second if reference.tokens_per_second else None
            # vLLM's acceptance metrics under their names (adaptive/metrics.py); the report's own fields win
            metrics = acceptance_metrics(r.results, speculative=is_speculative(strategy), seconds=r.seconds)
            runs.append({**metrics, **r.to_dict(), "speedup_vs_k1": ratio})
        payload = {
            "model": args.model, "dataset": args.dataset, "split": args.split, "start": args.start,
            "n": len(problems), "format": args.format, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "calibrated": calibrator is not None, "reference": reference.label,
            "indices": [p["index"] for p in problems], "gold": [p["answer"] for p in problems], "runs": runs,
        }
        print(f"wrote {write_json(json_path, payload)}", file=sys.stderr)
    return 0
