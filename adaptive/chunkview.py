"""Show which tokens each forward pass produced (paper Fig. 1: "chunk sizes 1..7, average 3.04").

A `GenerationResult` records the generated ids and how many were committed by each forward (`accepted_per_step`);
consecutive slices of those sizes are the chunks. Two renderings:

* terminal: chunks in alternating ANSI background colours, or `[chunk]` brackets when colour is off (not a TTY); on
  a TTY the model's own control characters are shown escaped, never sent raw;
* HTML: a self-contained page, one coloured span per chunk with its size as a superscript and a tooltip, and a
  legend with the mean tokens per forward pass.

Chunk text comes from decoding growing prefixes of the ids and taking the new suffix, so a character split across
two chunks (multi-byte UTF-8 in byte-level BPE) is shown once, in the chunk that completes it. The first stop token
(and anything after it, which the decoder never emits) is shown as a small marker instead of its raw text.
"""

from __future__ import annotations

import html
import unicodedata
from pathlib import Path

from distill.files import write_text_atomically

# Two backgrounds, alternating per forward pass, with black text so both read on dark and light terminals.
ANSI_BACKGROUNDS = ("\033[30;48;5;153m", "\033[30;48;5;223m")
ANSI_MARK = "\033[2m"
ANSI_RESET = "\033[0m"
HTML_COLOURS = ("#cfe3ff", "#ffe0b8")
STOP_MARK = "⏎"


def chunk_ids(result) -> list[list[int]]:
    """Split `result.token_ids` into the chunks committed by each forward pass (the last one may be cut short)."""
    chunks, start = [], 0
    for n in result.accepted_per_step:
        if start >= len(result.token_ids):
            break
        chunks.append(result.token_ids[start : start + n])
        start += n
    if start < len(result.token_ids):  # ids beyond the recorded steps: keep them visible rather than drop them
        chunks.append(result.token_ids[start:])
    return chunks


def chunk_pieces(result, tokenizer, stop_token_ids=()) -> list[tuple[str, int, bool]]:
    """[(text, size, ends_with_stop)] per forward pass; text excludes the stop token."""
    stops = set(int(t) for t in stop_token_ids)
    pieces, ids, shown, stopped = [], [], "", False
    chunks = chunk_ids(result)
    for c, chunk in enumerate(chunks):
        has_stop = False
        for tok in chunk:
            if stopped:
                break
            if tok in stops:
                stopped = has_stop = True
                break
            ids.append(tok)
        full = tokenizer.decode(ids, skip_special_tokens=False)
        if c < len(chunks) - 1 and not stopped:
            full = full.rstrip("\ufffd")  # an incomplete character: let the next chunk show it whole
        if full.startswith(shown):
            text, shown = full[len(shown):], full
        else:  # decoding is not prefix-stable here (clean-up of spaces): fall back to the chunk alone
            text = tokenizer.decode([t for t in chunk if t not in stops], skip_special_tokens=False)
            shown = full
        pieces.append((text, len(chunk), has_stop))
    return pieces


def terminal_safe(text: str) -> str:
    """`text` with control characters (ESC, BEL, CR, C1 codes, ... but not newline and tab) shown as `\\xNN` escapes,
    so model output cannot move the cursor, retitle or reprogram the user's terminal."""
    return "".join(f"\\x{ord(ch):02x}" if ch not in "\n\t" and unicodedata.category(ch) == "Cc" else ch
                   for ch in text)


def render_terminal(result, tokenizer, *, color: bool, stop_token_ids=()) -> str:
    """The generated text with each forward pass's chunk coloured (or bracketed when `color` is False). Coloured
    output goes to a terminal: its control characters are escaped (`terminal_safe`)."""
    out = []
    for i, (text, _, has_stop) in enumerate(chunk_pieces(result, tokenizer, stop_token_ids)):
        mark = STOP_MARK if has_stop else ""
        if color:
            text = terminal_safe(text)
            bg = ANSI_BACKGROUNDS[i % 2]
            # Re-open the colour after each newline so the background does not bleed across the line.
            body = text.replace("\n", f"{ANSI_RESET}\n{bg}")
            out.append(f"{bg}{body}{ANSI_RESET}{ANSI_MARK + mark + ANSI_RESET if mark else ''}")
        else:
            out.append(f"[{text}{mark}]")
    return "".join(out)


def summary_line(result, strategy_label: str = "") -> str:
    seconds = result.prefill_seconds + result.decode_seconds
    rate = len(result.token_ids) / seconds if seconds > 0 else float("nan")
    label = f" [{strategy_label}]" if strategy_label else ""
    return (f"{len(result.token_ids)} tokens, {result.forward_passes} forwards, "
            f"{result.tokens_per_forward:.2f} tokens/forward, {rate:.1f} tok/s, finish={result.finish_reason}{label}")


def size_histogram(results) -> str:
    """'size×count' over every forward pass, e.g. '1×12  2×5  4×1'."""
    counts: dict[int, int] = {}
    for r in results:
        for size in (len(c) for c in chunk_ids(r)):
            counts[size] = counts.get(size, 0) + 1
    return "  ".join(f"{size}×{n}" for size, n in sorted(counts.items()))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.legend { background: #f6f6f6; border: 1px solid #ddd; padding: .5rem .8rem; border-radius: 4px; }
.legend span.chunk { padding: 0 .3em; }
.prompt { white-space: pre-wrap; color: #555; border-left: 3px solid #ccc; padding-left: .8rem; }
.gen { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9; }
.chunk { border-radius: 3px; padding: 1px 0; }
.c0 { background: %s; } .c1 { background: %s; }
.chunk sup { font-size: .6em; color: #666; margin-left: 1px; font-family: system-ui, sans-serif; }
.stop { color: #999; }
.stats { color: #555; font-size: .9em; }
""" % HTML_COLOURS


def render_html(results, tokenizer, *, title: str = "MTP chunks", strategy_label: str = "",
                stop_token_ids=()) -> str:
    """A self-contained page: per generation the prompt and the coloured, size-annotated chunks."""
    total_tokens = sum(len(r.token_ids) for r in results)
    total_forwards = sum(r.forward_passes for r in results)
    mean = total_tokens / total_forwards if total_forwards else 0.0
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
        '<p class="legend">Each coloured span is the text committed by one forward pass; the superscript is its size '
        f'in tokens (<span class="chunk c0">one pass<sup>n</sup></span><span class="chunk c1">next pass<sup>n</sup>'
        f"</span>). {esc(strategy_label)}{' — ' if strategy_label else ''}<b>mean {mean:.2f} tokens/forward</b> "
        f"({total_tokens} tokens in {total_forwards} forward passes).</p>",
        f'<p class="stats">chunk sizes: {esc(size_histogram(results))}</p>',
    ]
    for n, result in enumerate(results, 1):
        parts.append(f"<h2>Generation {n}</h2>")
        if result.prompt is not None:
            parts.append(f'<div class="prompt">{esc(result.prompt)}</div>')
        spans = []
        for i, (text, size, has_stop) in enumerate(chunk_pieces(result, tokenizer, stop_token_ids)):
            stop = f'<span class="stop">{STOP_MARK}</span>' if has_stop else ""
            tip = f"forward {i + 1}: {size} token{'s' if size != 1 else ''}" + (" (ends with the stop token)" if has_stop else "")
            spans.append(f'<span class="chunk c{i % 2}" title="{esc(tip)}">{esc(text)}{stop}<sup>{size}</sup></span>')
        parts.append(f'<p class="gen">{"".join(spans)}</p>')
        parts.append(f'<p class="stats">{esc(summary_line(result))}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path, results, tokenizer, **kwargs) -> Path:
    """Write `render_html(...)` atomically (temporary file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, render_html(results, tokenizer, **kwargs))
