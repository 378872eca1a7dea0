"""The model's own greedy answers to a dataset's prompts, as training data for `mtp train` (written by `mtp
regenerate`, mtp_cli/regenerate.py, and by a recipe's `regenerate: true`).

At decode time an MTP model conditions on its own greedy text, so distilling on that text keeps the prefixes
on-policy (EAGLE-3, Medusa-2's self-distillation, SpecForge's regenerate_train_data). Each prompt is formatted as
`mtp train` formats a question (the chat template's user turn plus the assistant header, or the plain format's `BOS +
question + blank line`) and decoded greedily with the project's batched decoder: static k=1, or the lossless
self-speculative mode when the model has a trained <MTP> (both lossless: the model's greedy tokens, up to floating-point
near-ties). Each output row is {"row", "question", "answer", "tokens", "forwards", "finish_reason", "round_trip"}; `mtp
train` reads the question and answer columns and ignores the rest.

Rules:
  * Rows are decoded in fixed batches of --batch-size consecutive prompts (a row's batch does not depend on where a
    run stopped), appended to `OUTPUT.partial` batch by batch with flush + fsync, and the file is renamed onto OUTPUT
    only when every row is there. A killed run continues from the last complete batch: no duplicate, no lost row (a
    torn tail is cut off).
  * A fingerprint — the sha256 of the model's weights and of the tokenizer, of the prompts, and every setting that
    changes the output — is written to `OUTPUT.fingerprint.json` (`OUTPUT.partial.json` while running) with the
    sha256 of the data, the exact command and a summary. An up-to-date OUTPUT is reused; one with another fingerprint
    (or a partial run of another one) is an error unless --overwrite; the old file is replaced only once the new one
    is complete.
  * OUTPUT must be a file this command wrote (it has a fingerprint file) or absent: a directory or anyone else's file
    is an error, with or without --overwrite.
  * Round trip: re-encoding question + answer in the training format must give the prompt ids followed by exactly
    the generated answer ids, or the model trains on other tokens than it wrote; each row records whether it does
    and the summary gives the rate.

The last HELD_OUT_TAIL rows of a dataset (adaptive/prompts.py) are what `mtp tune` (its default --n), `mtp calibrate`
and `mtp demo` hold out; a recipe's `regenerate: true` (`regenerate_for_training`) never regenerates them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from adaptive.prompts import HELD_OUT_TAIL, chat_ids
from distill.errors import UserError
from distill.files import write_text_atomically

WRITTEN_BY = "mtp regenerate"
FORMAT_VERSION = 1
SELFSPEC_K_MAX = 4  # drafts per step of the self-speculative mode (a CPU rarely gains from more)


def fingerprint_path(output) -> Path:
    return Path(f"{output}.fingerprint.json")


def _partial_paths(output) -> tuple[Path, Path]:
    return Path(f"{output}.partial"), Path(f"{output}.partial.json")


# ---------------------------------------------------------------------------------------------------------------------
# digests


def model_digest(model) -> str:
    """sha256 over every weight (name, dtype, shape, bytes) of the state dict, in name order."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalisation), chat template and special
    tokens. The truncation / padding state that encoding calls leave behind is not part of it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        clean = Tokenizer.from_str(backend.to_str())
        clean.no_truncation()
        clean.no_padding()
        definition = clean.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"chat_template": getattr(tokenizer, "chat_template", None),
                        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}},
                       sort_keys=True)
    return hashlib.sha256((definition + "\n" + extra).encode()).hexdigest()


def prompts_digest(questions: list[str]) -> str:
    return hashlib.sha256(json.dumps(questions, ensure_ascii=False).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# prompt format and round trip


def encode_prompt(tokenizer, question: str, fmt: str) -> list[int]:
    """The ids `mtp train` puts before the answer: the chat template's user turn + assistant header, or the plain
    format's BOS + question + blank line (distill.data.format_example)."""
    if fmt == "chat":
        return chat_ids(tokenizer, question)
    return list(tokenizer(f"{tokenizer.bos_token or ''}{question}\n\n", add_special_tokens=False)["input_ids"])


def round_trips(tokenizer, question: str, answer: str, prompt_ids: list[int], answer_ids: list[int],
                fmt: str) -> bool:
    """True when the training text of (question, answer) tokenizes to prompt_ids + answer_ids (+ the closing ids)."""
    from distill.data import format_example

    full = tokenizer(format_example(question, answer, tokenizer, fmt), add_special_tokens=False)["input_ids"]
    expected = list(prompt_ids) + list(answer_ids)
    return list(full[: len(expected)]) == expected


# ---------------------------------------------------------------------------------------------------------------------
# files


def read_record(output) -> dict | None:
    """The fingerprint file of OUTPUT if this command wrote it, else None."""
    path = fingerprint_path(output)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY:
        return None
    return record


def check_output_path(output) -> None:
    """UserError unless OUTPUT is absent or a file this command wrote (checked before anything is loaded)."""
    output = Path(output)
    partial, partial_json = _partial_paths(output)
    for path in (output, partial, fingerprint_path(output), partial_json):
        if path.is_dir():
            raise UserError(f"{path} is a directory; --output must name a .jsonl file")
    if output.exists() and read_record(output) is None:
        raise UserError(f"{output} exists and was not written by `mtp regenerate` (no {fingerprint_path(output).name} "
                        "beside it); choose another --output")
    if partial.exists() and not partial_json.is_file():
        raise UserError(f"{partial} exists and was not written by `mtp regenerate`; move it away first")
    if not output.parent.is_dir():
        raise UserError(f"directory {output.parent} does not exist")


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete_rows(partial: Path, first_row: int, questions: list[str], batch_size: int) -> tuple[list[dict], int]:
    """(rows, byte length) of the longest prefix of whole, consecutive, well-formed batches in the partial file."""
    data = partial.read_bytes() if partial.is_file() else b""
    rows, ends, offset = [], [], 0
    for line in data.split(b"\n")[:-1]:  # the text after the last newline is torn
        offset += len(line) + 1
        try:
            row = json.loads(line)
        except ValueError:
            break
        i = len(rows)
        if (not isinstance(row, dict) or row.get("row") != first_row + i or i >= len(questions)
                or row.get("question") != questions[i]):
            break
        rows.append(row)
        ends.append(offset)
    keep = len(rows) if len(rows) == len(questions) else len(rows) // batch_size * batch_size
    return rows[:keep], (ends[keep - 1] if keep else 0)


def summarize(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    ok = sum(bool(r["round_trip"]) for r in rows)
    return {
        "rows": len(rows),
        "round_trip": ok,
        "round_trip_rate": ok / len(rows) if rows else 0.0,
        "finished_by_length": sum(r["finish_reason"] == "length" for r in rows),
        "answer_tokens_mean": tokens / len(rows) if rows else 0.0,
        "tokens_per_forward": tokens / forwards if forwards else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# the work


def default_strategy(model):
    """Self-speculative (lossless greedy, fewer forwards) when the model has a trained <MTP>, else static k=1."""
    from adaptive.strategies import SelfSpeculative, Static

    if getattr(model.config, "mtp_mask_token_id", None) is not None:
        return SelfSpeculative(min(SELFSPEC_K_MAX, int(getattr(model.config, "mtp_k_max", SELFSPEC_K_MAX))))
    return Static(1)


def make_decoder(model, tokenizer, strategy):
    from adaptive.decoder import MTPDecoder
    from distill.decoding_defaults import stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    mask = getattr(model.config, "mtp_mask_token_id", None)
    if mask is None:
        if strategy.k_max != 1:
            raise UserError(f"{strategy.label} needs a model with a trained <MTP>; this one has none (use static k=1)")
        # k = 1 feeds no mask at all; the decoder only needs some valid id that is not a stop token.
        mask = next(t for t in range(model.get_input_embeddings().weight.shape[0]) if t not in set(stops))
    return MTPDecoder(model, tokenizer, stop_token_ids=stops, mask_token_id=mask)


def build_fingerprint(model, tokenizer, questions: list[str], *, start: int, fmt: str, max_new_tokens: int,
                      batch_size: int, strategy, model_sha256: str | None = None) -> dict:
    """Everything that decides the output rows; equal fingerprints mean equal files."""
    return {
        "version": FORMAT_VERSION,
        "model_sha256": model_sha256 or model_digest(model),
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompts_sha256": prompts_digest(questions),
        "start": int(start),
        "rows": len(questions),
        "format": fmt,
        "strategy": strategy.label,
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
    }


def regenerate(model, tokenizer, questions: list[str], output, *, fingerprint: dict, strategy, fmt: str,
               start: int = 0, max_new_tokens: int = 256, batch_size: int = 16, overwrite: bool = False,
               source: dict | None = None, progress: bool = True, on_batch=None) -> dict:
    """Write the greedy answers to `questions` (dataset rows start..start+len-1) to `output`; see the module rules.

    Returns {"path", "reused", "resumed", "generated", "seconds", "summary"}. `on_batch(rows_done)` is called after
    each batch is durable (Python callers: progress, or a test's simulated kill)."""
    from tqdm.auto import tqdm

    output = Path(output)
    check_output_path(output)
    partial, partial_json = _partial_paths(output)
    started = time.perf_counter()

    # 1. an up-to-date output is reused; another fingerprint is refused unless --overwrite
    record = read_record(output)
    if record is not None and output.is_file():
        differ = _differences(record.get("fingerprint", {}), fingerprint)
        intact = record.get("sha256") == _sha256_file(output)
        if not differ and intact:
            if partial_json.is_file() and not partial.exists():
                partial_json.unlink()  # left by a run that stopped between its last two renames
            return {"path": str(output), "reused": True, "resumed": 0, "generated": 0,
                    "seconds": time.perf_counter() - started, "summary": record.get("summary", {})}
        if not overwrite and not partial_json.is_file():
            why = (f"was generated with a different {', '.join(differ)}" if differ
                   else "does not match its recorded sha256 (edited since it was written)")
            raise UserError(f"{output} {why}; pass --overwrite to regenerate it, or choose another --output")

    # 2. a partial run continues if it has this fingerprint
    resumed_rows: list[dict] = []
    if partial_json.is_file():
        try:
            previous = json.loads(partial_json.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        differ = _differences(previous.get("fingerprint", {}), fingerprint)
        if differ and not overwrite:
            raise UserError(f"{partial} is an unfinished run with a different {', '.join(differ)}; pass --overwrite "
                            "to discard it, or choose another --output")
        if differ:  # --overwrite: the unfinished run of other settings goes
            partial.unlink(missing_ok=True)
        else:
            resumed_rows, length = _complete_rows(partial, start, questions, batch_size)
            if partial.is_file() and partial.stat().st_size != length:
                with open(partial, "r+b") as fh:  # cut a torn tail or a half-written batch
                    fh.truncate(length)
                    fh.flush()
                    os.fsync(fh.fileno())
    if not resumed_rows:  # a fresh run (or a discarded one): record what the partial file will hold
        write_text_atomically(partial_json, json.dumps({"written_by": WRITTEN_BY, "fingerprint": fingerprint,
                                                        "source": source or {}}, indent=2) + "\n")
    if not partial.exists():
        partial.touch()

    # 3. decode the remaining batches, each one durable before the next starts
    decoder = make_decoder(model, tokenizer, strategy)
    done = len(resumed_rows)
    generated = 0
    if done < len(questions):
        encoded = [encode_prompt(tokenizer, q, fmt) for q in questions]
        with open(partial, "ab") as fh, tqdm(total=len(questions), initial=done, desc="regenerate", unit="row",
                                              disable=not progress) as bar:
            for lo in range(done, len(questions), batch_size):
                hi = min(lo + batch_size, len(questions))
                results = decoder.generate(encoded[lo:hi], strategy, max_new_tokens)
                lines = []
                stops = set(decoder.stop_token_ids)
                for i, result in zip(range(lo, hi), results):
                    ids = result.token_ids
                    answer_ids = ids[: next((t for t, tok in enumerate(ids) if tok in stops), len(ids))]
                    row = {"row": start + i, "question": questions[i], "answer": result.text,
                           "tokens": len(ids), "forwards": result.forward_passes,
                           "finish_reason": result.finish_reason,
                           "round_trip": round_trips(tokenizer, questions[i], result.text, encoded[i], answer_ids,
                                                     fmt)}
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                fh.write("".join(lines).encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
                generated += hi - lo
                bar.update(hi - lo)
                if on_batch is not None:
                    on_batch(hi)

    # 4. complete: fingerprint (with the data's sha256) first, then the data, then the partial record goes
    rows, length = _complete_rows(partial, start, questions, batch_size)
    if len(rows) != len(questions) or partial.stat().st_size != length:
        raise RuntimeError(f"{partial} holds {len(rows)} of {len(questions)} rows after decoding")
    summary = summarize(rows)
    record = {"written_by": WRITTEN_BY, "fingerprint": fingerprint, "source": source or {},
              "sha256": _sha256_file(partial), "summary": summary}
    write_text_atomically(fingerprint_path(output), json.dumps(record, indent=2) + "\n")
    os.replace(partial, output)
    _fsync_dir(output.parent)
    partial_json.unlink(missing_ok=True)
    return {"path": str(output), "reused": False, "resumed": len(resumed_rows), "generated": generated,
            "seconds": time.perf_counter() - started, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------------
# a recipe's `regenerate: true`


def rows_for_training(config, n_rows: int, world_size: int = 1) -> int:
    """Head rows a training run can consume: max_steps x global batch, plus the eval split's share, rounded up to
    whole decoding batches, never reaching into the held-out tail; every row but the tail when max_steps is unset."""
    available = n_rows - HELD_OUT_TAIL
    if available < 1:
        raise UserError(f"the dataset has {n_rows} rows; regenerate needs more than the {HELD_OUT_TAIL} held-out "
                        "tail rows")
    if config.regenerate_rows:
        wanted = config.regenerate_rows
    elif config.max_steps and config.max_steps > 0:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
        wanted = math.ceil(config.max_steps * per_step / (1.0 - config.eval_fraction))
        if config.max_train_samples:
            wanted = min(wanted, math.ceil(config.max_train_samples / (1.0 - config.eval_fraction)))
        wanted = math.ceil(wanted / config.regenerate_batch_size) * config.regenerate_batch_size
    else:
        wanted = available
    if config.regenerate_rows and wanted > available:
        raise UserError(f"regenerate_rows {wanted} reaches into the last {HELD_OUT_TAIL} rows of the dataset, which "
                        f"tune/calibrate/demo hold out; at most {available}")
    return min(wanted, available)


def find_reusable(fingerprint: dict, questions: list[str], search: list[Path]) -> Path | None:
    """A finished regenerated file (in `search` directories) made with the same model, tokenizer and settings from row
    0 of the same prompts, with at least fingerprint["rows"] rows and none in the held-out tail: the recipe may train
    on it as it is (every row in it is a head row)."""
    same = {k: v for k, v in fingerprint.items() if k not in ("rows", "prompts_sha256")}
    for folder in search:
        for record_file in sorted(Path(folder).glob("*.fingerprint.json")) if Path(folder).is_dir() else []:
            data = Path(str(record_file).removesuffix(".fingerprint.json"))
            record = read_record(data)
            if record is None or not data.is_file():
                continue
            theirs = record.get("fingerprint", {})
            if _differences({k: theirs.get(k) for k in same}, same) or theirs.get("start") != 0:
                continue
            n = int(theirs.get("rows", 0))
            if n < fingerprint["rows"] or n > len(questions) - HELD_OUT_TAIL:
                continue
            if theirs.get("prompts_sha256") != prompts_digest(questions[:n]):
                continue
            if record.get("sha256") != _sha256_file(data):
                continue
            return data
    return None


def regenerate_for_training(config, model_name: str, dtype: str, world_size: int = 1,
                            trust_remote_code: bool = False) -> str:
    """The path of a regenerated copy of config.dataset_name's head rows for this training run: a matching file
    under the repository's data/ or the cache is reused, else it is generated into
    `cache_root()/regenerated/<fingerprint>.jsonl` (resumable like `mtp regenerate`)."""
    import torch

    from distill.data import load_questions, resolve_format
    from distill.models import cache_root, load_model, load_tokenizer

    questions = load_questions(config.dataset_name, config.dataset_split, column=config.question_column)
    n = rows_for_training(config, len(questions), world_size)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    fmt = resolve_format(config.dataset_format, tokenizer)
    model = load_model(model_name, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code).eval()
    strategy = default_strategy(model)
    fingerprint = build_fingerprint(model, tokenizer, questions[:n], start=0, fmt=fmt,
                                    max_new_tokens=config.regenerate_max_new_tokens,
                                    batch_size=config.regenerate_batch_size, strategy=strategy)
    folder = cache_root() / "regenerated"
    repo_data = Path(__file__).resolve().parents[1] / "data"
    found = find_reusable(fingerprint, questions, [*sorted(p for p in repo_data.glob("*") if p.is_dir()), folder])
    if found is not None:
        print(f"regenerate: reusing {found} (same model, tokenizer, prompts and settings)", flush=True)
        return str(found)
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
    output = folder / f"{key}.jsonl"
    print(f"regenerate: decoding the model's own answers to the first {n} prompts of {config.dataset_name} "
          f"({strategy.label}) into {output}", flush=True)
    result = regenerate(model, tokenizer, questions[:n], output, fingerprint=fingerprint, strategy=strategy, fmt=fmt,
                        max_new_tokens=config.regenerate_max_new_tokens, batch_size=config.regenerate_batch_size,
                        source={"model": model_name, "dataset": config.dataset_name, "by": "mtp train"})
    print(f"regenerate: {result['summary']['rows']} rows, round trip "
          f"{100 * result['summary']['round_trip_rate']:.1f}%", flush=True)
    del model
    return str(output)
