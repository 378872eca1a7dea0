"""Batched KV-cache decoding of an MTP model with a ragged span length per row (paper §4.1, §4.2, §7.5).

KV protocol (§4.1). Per row, `committed` tokens have their KV in the cache; `pending` tokens were accepted last step
and have no KV yet. One forward feeds  pending ⊕ (k_max−1)·<MTP>  at the true positions that follow the committed
prefix, reads k_max logits (the last pending token, then every mask), and afterwards the mask KV is cropped away, so
masks never persist: the pending tokens' KV is what the forward commits. The first forward is the same step with
pending = the whole prompt (prefill); prompts of very different lengths are prefilled in separate groups and their
caches stacked, so one long prompt does not make every short one pay for its padding.

Batching (not in the reference code, §7.5; the authors' serving fork cannot batch variable k, §6.2). Rows accept a
different number of tokens per step, so their pending segments have different lengths. Each step left-pads every
row's pending segment to the batch maximum L with pad tokens whose attention-mask entry is 0. Then all rows' k_max−1
masks sit in the same final columns of the cache, and cropping them is one uniform `DynamicCache.crop`. The cache is
therefore a grid of columns, not of positions: a 2-D attention mask over all cache columns (0 at pad holes) says which
columns each row may attend to, and explicit per-row position_ids carry the true RoPE positions. The column-causal
mask HF builds is still correct because each row's tokens appear in column order. Finished rows leave the batch
(`DynamicCache.batch_select_indices`), and columns no remaining row uses are dropped.

Self-speculative mode (lossless; the paper's future-work item iii). Pending = [a] + drafts d_1..d_n, where a is the
last verified token and the drafts are the previous step's mask argmaxes. The logit at a gives g_1 and the logit at
d_i gives g_{i+1}: the model's own greedy predictions. The longest prefix with d_i == g_i is accepted plus the bonus
g_{j+1}, so the output is greedy decoding exactly. Only a and the accepted drafts keep their KV; rejected drafts
become attention-mask holes. If every draft was accepted, the masks were conditioned on the right tokens and their
argmaxes are the next drafts; otherwise the next step has none. `SelfSpeculative.accept` makes this decision; the
decoder commits it.

Span control (`k_max="auto"`, adaptive/controller.py). Every forward above appends k_max − 1 masks. With an auto
strategy the number of masks K is chosen before each forward (0 … k_max − 1, one K for the batch) from the measured
forward cost and the acceptance observed so far; K = 0 is plain next-token decoding. Everything above holds with the
step's K in place of k_max − 1: ConfAdapt reads K + 1 positions, self-speculative proposes K drafts.

Phases (adaptive/strategies.py `Strategy` is all the loop asks of a strategy; no per-strategy branches).
`generate_steps` is a short loop over `_step`, one forward and its phases, and yields after each (`generate` runs it to
the end; a caller timing several decodings side by side interleaves them step by step):
  masks    K for this forward: k_max − 1, or the span controller's choice under k_max auto;
  forward  `_prefill` at step 0 (groups of similar prompt length, caches stacked), `_forward_step` after; the
           `on_step` hook of `generate` sees the step's `StepTrace`;
  accept   the strategy decides per row (`Strategy.accept`): tokens taken, pending tokens whose KV is kept, the next
           pending tokens and drafts; the span controller observes the decision;
  commit   crop the mask KV, mask rejected drafts, advance each row, append its tokens (budget, stop tokens, stop
           strings: `_extend`);
  retire   finished rows leave the batch and columns nobody attends to are dropped.

Context. A prompt plus max_new_tokens plus the k_max - 1 mask positions must fit the model's
`max_position_embeddings`; anything longer is refused before the first forward, never truncated silently.

Stop strings (lm-eval's `until`). After every step each row decodes only a short tail (the new tokens plus as many
earlier tokens as the longest stop string has characters, and a little slack for multi-byte characters), so a stop
string spread over several tokens is still found and the check costs microseconds. A row whose text now contains a
stop string keeps its tokens up to and including the one that completes the first occurrence; its `text` ends just
before the stop string.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adaptive.controller import ForwardCost, SpanController
from adaptive.prompts import chat_ids, length_sorted_batches, longest_first
from adaptive.strategies import Accepted, Strategy
from distill.decoding_defaults import stop_token_ids as model_stop_ids
from distill.errors import UserError
from distill.tokens import get_mtp_token_id

# Prefill groups: a prompt joins the current group if it is at most this many times shorter than the group's longest,
# which bounds left-padding waste at (ratio - 1) x the real prompt tokens.
PREFILL_GROUP_RATIO = 1.5
# Stop-string search: tokens decoded before the new ones = longest stop string (characters) + this slack. A token
# decodes to at least one character, except byte-fallback pieces of one multi-byte character.
STOP_STRING_SLACK = 8


@dataclass
class GenerationResult:
    prompt: str | None
    token_ids: list[int]  # generated ids only, stop token included if emitted
    text: str  # decoded generated text, cut at the first stop token or just before the first stop string
    accepted_per_step: list[int]  # tokens committed by each forward pass
    masks_per_step: list[int]  # <MTP> masks appended in each forward pass (k_max - 1 unless k_max is auto)
    forward_passes: int
    tokens_per_forward: float  # len(token_ids) / forward_passes
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str  # "stop" | "length"


@dataclass
class StepTrace:
    """One forward pass as each row saw it; passed to the `on_step` hook of `MTPDecoder.generate`.

    For row b, a plain causal forward over context_ids[b] + query_ids[b] with no cache must give `logits[b]` at the
    last `logits[b].shape[0]` positions: that is the whole KV protocol in one sentence.
    """

    step: int
    rows: list[int]  # indices into the batch given to `generate`
    context_ids: list[list[int]]  # tokens whose KV was in the cache, in order
    query_ids: list[list[int]]  # pending tokens + masks fed in this forward (pad columns left out)
    logits: list[torch.Tensor]  # [n_read, V] at the last n_read query tokens (k_max; + drafts when self-speculative)
    cache_columns: int  # cache width before this forward: committed KV plus holes (pads, rejected drafts)


@dataclass
class _Row:
    """Decoding state of one prompt. tokens = prompt + generated; KV exists for tokens[:position]."""

    tokens: list[int]
    pending: list[int]  # fed next forward: Static/ConfAdapt the last accepted tokens, SelfSpeculative [a] + drafts
    drafts: int = 0  # how many trailing pending tokens are unverified drafts (SelfSpeculative only)
    position: int = 0  # number of committed tokens = position of pending[0]
    generated: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    masks_per_step: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    finished_at: float = 0.0


@dataclass
class _Batch:
    """Decoding state of one `generate` call. The cache has one row per `active` entry, in that order."""

    rows: list[_Row]
    active: list[int]  # indices into `rows` still decoding; the order is fixed by the prefill
    strategy: Strategy
    controller: SpanController | None  # k_max auto only
    max_new_tokens: int
    stop_strings: list[str]
    cache: DynamicCache | None = None
    attn: torch.Tensor | None = None  # [len(active), cache columns]: 1 where a row may attend
    step: int = 0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent outside this decoding's steps (`generate_steps` between two steps)
    prefill_seconds: float = 0.0
    now: float = 0.0  # when this step's forward (and the on_step hook) ended, on a clock stopped while paused

    def clock(self) -> None:
        self.now = time.perf_counter() - self.paused
        if self.step == 0:
            self.prefill_seconds = self.now - self.start


class MTPDecoder:
    def __init__(self, model, tokenizer, *, stop_token_ids: list[int] | None = None, mask_token_id: int | None = None,
                 forward_cost=None):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id) if mask_token_id is not None else get_mtp_token_id(model)
        self.vocab_rows = model.get_input_embeddings().weight.shape[0]
        if not 0 <= self.mask_token_id < self.vocab_rows:
            raise UserError(f"<MTP> id {self.mask_token_id} is outside the embedding matrix ({self.vocab_rows} rows)")
        if stop_token_ids is None:
            stop_token_ids = model_stop_ids(model, tokenizer)
        self.stop_token_ids = [int(t) for t in dict.fromkeys(stop_token_ids)]
        if self.mask_token_id in self.stop_token_ids:
            raise UserError("the <MTP> mask id cannot also be a stop token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.stop_token_ids or [0])[0]
        self.pad_token_id = int(pad)  # only fills attention-mask holes, so any valid id does
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # c(q, b) in seconds for k_max="auto": measured on first use (adaptive/controller.py) unless given.
        self._forward_cost = forward_cost
        # What the span controller learned per strategy (its label), carried from one generate call to the next:
        # only the first batch a decoder sees starts from the prior.
        self._span_memory: dict[str, dict] = {}

    @property
    def forward_cost(self) -> Callable[[int, int], float]:
        if self._forward_cost is None:
            self._forward_cost = ForwardCost(self.model, self.mask_token_id)
        return self._forward_cost

    # ----------------------------------------------------------------------------------------------------------------
    def generate(self, input_ids: list[list[int]], strategy: Strategy, max_new_tokens: int = 256,
                 stop_strings: list[str] | None = None,
                 on_step: Callable[[StepTrace], None] | None = None) -> list[GenerationResult]:
        """Decode every row of `input_ids` (token ids, no padding, any lengths) as one batch.

        `stop_strings`: a row also finishes ("stop") once its generated text contains one of them (empty strings are
        ignored, as lm-eval does). `on_step`: called with a `StepTrace` after every forward (KV-protocol checks,
        calibration samples, debugging)."""
        steps = self.generate_steps(input_ids, strategy, max_new_tokens, stop_strings, on_step)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def generate_steps(self, input_ids: list[list[int]], strategy: Strategy, max_new_tokens: int = 256,
                       stop_strings: list[str] | None = None, on_step: Callable[[StepTrace], None] | None = None):
        """`generate`, one forward at a time: a generator that yields after every step and returns (StopIteration's
        value) what `generate` returns. Between two steps the caller may run anything, e.g. other decodings side by
        side. Every step runs in inference mode with the model in eval mode, and the results' prefill and decode
        seconds count only the time spent inside this decoding's steps. Bad input raises at the first `next`."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        k_max = getattr(strategy, "k_max", None)
        if (not isinstance(k_max, int) or k_max < 1 or not hasattr(strategy, "name")
                or not hasattr(strategy, "accept")):
            raise UserError(f"not a decoding strategy: {strategy!r} (use adaptive.strategies.make_strategy)")
        stop_strings = _check_stop_strings(stop_strings)
        rows = [list(map(int, ids)) for ids in input_ids]
        if not rows:
            return []
        for ids in rows:
            if not ids:
                raise UserError("cannot decode an empty prompt")
            if min(ids) < 0 or max(ids) >= self.vocab_rows:
                raise UserError(f"prompt token id outside the vocabulary [0, {self.vocab_rows})")
        _check_context(self.model.config, max(map(len, rows)), max_new_tokens, k_max)
        batch = self._start(rows, strategy, max_new_tokens, stop_strings)
        while batch.active:
            with self._decoding_mode():
                self._step(batch, on_step)
            paused = time.perf_counter()
            yield
            batch.paused += time.perf_counter() - paused
        if batch.controller is not None:
            self._span_memory[strategy.label] = batch.controller.state()
        return [self._result(r, batch.start + batch.prefill_seconds, batch.prefill_seconds, stop_strings)
                for r in batch.rows]

    def generate_text(self, prompts: list[str], strategy: Strategy, max_new_tokens: int = 256,
                      chat_template: bool = True, batch_size: int = 16, progress: bool = False,
                      stop_strings: list[str] | None = None,
                      on_step: Callable[[StepTrace], None] | None = None) -> list[GenerationResult]:
        """Tokenize (as one user turn of the chat template, or as-is), decode in batches, return results in order.
        `stop_strings`, `on_step`: as for `generate`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self._encode(p, chat_template) for p in prompts]
        results: list[GenerationResult | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=f"generate {strategy.name}", unit="prompt", disable=not progress) as bar:
            for chunk in length_sorted_batches(encoded, batch_size):  # results go back to the caller's order
                batch = self.generate([encoded[i] for i in chunk], strategy, max_new_tokens, stop_strings,
                                      on_step=on_step)
                for i, result in zip(chunk, batch):
                    result.prompt = prompts[i]
                    results[i] = result
                bar.update(len(chunk))
        return results

    # ----------------------------------------------------------------------------------------------------------------
    def _encode(self, prompt: str, chat_template: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise UserError(f"prompts must be strings, got {type(prompt).__name__}")
        if chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError("the tokenizer has no chat template; feed the text as-is (chat_template=False)")
            return chat_ids(self.tokenizer, prompt)
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise UserError("cannot decode an empty prompt")
        return list(ids)

    @contextmanager
    def _decoding_mode(self):
        """Inference mode with the model in eval mode, restored after (one step; decodings may interleave)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()

    def _step(self, batch: _Batch, on_step: Callable[[StepTrace], None] | None) -> None:
        """One forward and what follows from it: masks, forward (prefill at step 0), accept, commit, retire."""
        masks = self._masks(batch)
        columns = batch.attn.shape[1] if batch.step else 0  # cache width before this forward
        logits = self._prefill(batch, masks) if batch.step == 0 else self._forward_step(batch, masks)
        if on_step is not None:
            on_step(self._trace(batch, logits, masks, columns))
        batch.clock()
        self._commit(batch, self._accept(batch, logits, masks), masks)
        self._retire(batch)

    # ---- phases of one step: masks, forward (prefill at step 0), accept, commit, retire ------------------------------
    def _start(self, prompts: list[list[int]], strategy, max_new_tokens: int, stop_strings: list[str]) -> _Batch:
        """Every prompt pending in full (prefill), and for k_max auto the span controller, resuming what this decoder
        learned for the strategy in earlier calls."""
        controller = None
        if strategy.auto:
            if hasattr(self.forward_cost, "prepare"):
                self.forward_cost.prepare(len(prompts))
            controller = SpanController(strategy.k_max - 1, self.forward_cost, speculative=strategy.speculative)
            controller.restore(self._span_memory.get(strategy.label))
        return _Batch(rows=[_Row(tokens=list(p), pending=list(p)) for p in prompts], active=list(range(len(prompts))),
                      strategy=strategy, controller=controller, max_new_tokens=max_new_tokens,
                      stop_strings=stop_strings)

    @staticmethod
    def _masks(batch: _Batch) -> int:
        """K, the masks of this forward (one K for the batch): k_max − 1, or under k_max auto the span controller's
        choice from the longest pending segment, the number of rows and each row's drafts."""
        if batch.controller is None:
            return batch.strategy.k_max - 1
        rows = [batch.rows[i] for i in batch.active]
        return batch.controller.choose(max(len(r.pending) for r in rows), len(rows), [r.drafts for r in rows])

    def _forward_step(self, batch: _Batch, masks: int) -> torch.Tensor:
        """A decoding forward (§4.1 step 2) over the batch cache; returns the logits read."""
        logits, batch.cache, batch.attn = self._forward(batch.rows, batch.active, batch.cache, batch.attn, masks)
        return logits

    def _accept(self, batch: _Batch, logits: torch.Tensor, masks: int) -> list[Accepted]:
        """The strategy decides what each row takes from this forward; the span controller learns from it."""
        rows = [batch.rows[i] for i in batch.active]
        accepted = batch.strategy.accept(logits, [r.pending for r in rows], [r.drafts for r in rows], masks)
        if batch.controller is not None:
            batch.controller.observe([(a.run, a.read) for a in accepted])
        return accepted

    def _commit(self, batch: _Batch, accepted: list[Accepted], masks: int) -> None:
        """Mask KV never persists (§4.1 step 2): crop it. Rejected drafts keep their KV, but nobody may attend to it
        any more. Every row advances past its committed tokens and takes its accepted tokens as text."""
        if masks:
            batch.cache.crop(-masks)
        for b, (i, a) in enumerate(zip(batch.active, accepted)):
            r = batch.rows[i]
            rejected = len(r.pending) - a.committed
            if rejected:
                batch.attn[b, batch.attn.shape[1] - rejected :] = 0
            r.position += a.committed
            r.pending, r.drafts = a.pending, a.drafts
            self._extend(batch, r, a.tokens, masks)
        batch.step += 1

    def _extend(self, batch: _Batch, r: _Row, tokens: list[int], masks: int) -> None:
        """Append a step's tokens to a row's text: never past the budget, and up to (and including) the first stop
        token or the token completing the first stop string, either of which finishes the row."""
        tokens = tokens[: batch.max_new_tokens - len(r.generated)]
        cut = next((t + 1 for t, tok in enumerate(tokens) if tok in self.stop_token_ids), None)
        if batch.stop_strings:  # a stop string completed before any stop token ends the row there
            hit = self._stop_string_end(r.generated, tokens[:cut], batch.stop_strings)
            cut = hit if hit is not None else cut
        if cut is not None:
            tokens = tokens[:cut]
            r.finish_reason = "stop"
        elif len(r.generated) + len(tokens) >= batch.max_new_tokens:
            r.finish_reason = "length"
        r.generated += tokens
        r.tokens += tokens
        r.accepted_per_step.append(len(tokens))
        r.masks_per_step.append(masks)
        if r.finish_reason:
            r.finished_at = batch.now

    @staticmethod
    def _retire(batch: _Batch) -> None:
        """Finished rows leave the batch; cache columns nobody attends to any more are dropped (holes shared by every
        remaining row: pads of rows that left, drafts rejected by a lone row)."""
        keep = [b for b, i in enumerate(batch.active) if batch.rows[i].finish_reason is None]
        if len(keep) < len(batch.active):
            batch.active = [batch.active[b] for b in keep]
            if not batch.active:
                return
            index = torch.tensor(keep, device=batch.attn.device)
            batch.cache.batch_select_indices(index)
            batch.attn = batch.attn.index_select(0, index)
        batch.attn = _drop_unused_columns(batch.cache, batch.attn)

    # ---- forwards ----------------------------------------------------------------------------------------------------
    def _forward(self, rows: list[_Row], active: list[int], cache, attn: torch.Tensor, K: int):
        """One forward: each row's pending segment left-padded to the batch maximum L, then K masks in shared final
        columns. Returns logits at the last n_keep columns, the cache (its last K columns the masks' KV, which
        `_commit` crops) and the attention mask grown by the pending columns."""
        device = self.model.device
        L = max(len(rows[i].pending) for i in active)
        n_keep = 1 + max(rows[i].drafts for i in active) + K  # last pending token (+ drafts to verify) + masks
        ids, pos, valid = [], [], []
        for i in active:
            r = rows[i]
            pad = L - len(r.pending)
            ids.append([self.pad_token_id] * pad + r.pending + [self.mask_token_id] * K)
            pos.append([r.position] * pad + list(range(r.position, r.position + len(r.pending) + K)))
            valid.append([0] * pad + [1] * (len(r.pending) + K))
        valid_t = torch.tensor(valid, device=device)
        kwargs = {"logits_to_keep": n_keep} if self._keeps_logits else {}
        out = self.model(input_ids=torch.tensor(ids, device=device), position_ids=torch.tensor(pos, device=device),
                         attention_mask=torch.cat([attn, valid_t], dim=1), past_key_values=cache, use_cache=True,
                         **kwargs)
        return out.logits[:, -n_keep:], out.past_key_values, torch.cat([attn, valid_t[:, :L]], dim=1)

    def _prefill(self, batch: _Batch, K: int) -> torch.Tensor:
        """First forward (§4.1 step 1: prompt ⊕ K masks), in groups of similar prompt length: one long prompt must
        not make every short one pay for its left padding (prefill is most of the work on CPU). The group caches are
        then left-padded to one width (pad columns masked) and stacked into the batch cache, every group's K mask
        columns last, for `_commit` to crop; the rows' order in it becomes `batch.active`. Returns the logits read."""
        batch.active, logits, batch.cache, batch.attn = self._prefill_groups(batch.rows, K)
        return logits

    def _prefill_groups(self, rows: list[_Row], K: int):
        device = self.model.device
        order = longest_first(rows, length=lambda row: len(row.pending))
        groups = [[order[0]]]
        for i in order[1:]:
            if len(rows[i].pending) * PREFILL_GROUP_RATIO >= len(rows[groups[-1][0]].pending):
                groups[-1].append(i)
            else:
                groups.append([i])
        parts = []
        for group in groups:
            cache = DynamicCache(config=self.model.config)
            if any(cache.is_sliding) or any(cache.is_linear):
                raise UserError("MTP decoding supports full-attention models only (this one has sliding/linear layers)")
            empty = torch.zeros(len(group), 0, dtype=torch.long, device=device)
            parts.append(self._forward(rows, group, cache, empty, K))
        if len(parts) == 1:
            return order, *parts[0]
        width = max(attn.shape[1] for _, _, attn in parts)
        merged = DynamicCache(config=self.model.config)
        for layer_idx in range(len(parts[0][1].layers)):
            keys, values = [], []
            for _, cache, attn in parts:
                layer = cache.layers[layer_idx]
                pad = (0, 0, width - attn.shape[1], 0)  # left-pad the sequence dimension of [B, H, S, D]
                keys.append(torch.nn.functional.pad(layer.keys, pad))
                values.append(torch.nn.functional.pad(layer.values, pad))
            merged.update(torch.cat(keys), torch.cat(values), layer_idx)
        attn = torch.cat([torch.nn.functional.pad(attn, (width - attn.shape[1], 0)) for _, _, attn in parts])
        return order, torch.cat([logits for logits, _, _ in parts]), merged, attn

    def _trace(self, batch: _Batch, logits: torch.Tensor, K: int, columns: int) -> StepTrace:
        rows, active = batch.rows, batch.active
        n_keep = logits.shape[1]
        return StepTrace(
            step=batch.step,
            rows=list(active),
            context_ids=[rows[i].tokens[: rows[i].position] for i in active],
            query_ids=[rows[i].pending + [self.mask_token_id] * K for i in active],
            logits=[logits[b, n_keep - (1 + rows[i].drafts + K) :].clone() for b, i in enumerate(active)],
            cache_columns=columns,
        )

    def _stop_string_end(self, generated: list[int], new: list[int], stop_strings: list[str]) -> int | None:
        """How many of the `new` tokens to keep so the text ends with the token completing the first stop string;
        None if no stop string occurs. Only a tail is decoded: earlier steps already found no stop string."""
        if not new:
            return None
        lookback = max(map(len, stop_strings)) + STOP_STRING_SLACK
        head = generated[max(len(generated) - lookback, 0) :]

        def found(ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            return any(s in text for s in stop_strings)

        if not found(head + new):
            return None
        return next((n for n in range(1, len(new)) if found(head + new[:n])), len(new))

    def _result(self, r: _Row, decode_start: float, prefill_seconds: float,
                stop_strings: list[str]) -> GenerationResult:
        stops = set(self.stop_token_ids)
        stop = next((t for t, tok in enumerate(r.generated) if tok in stops), len(r.generated))
        text = self.tokenizer.decode(r.generated[:stop], skip_special_tokens=False)
        cuts = [text.find(s) for s in stop_strings if s in text]
        forward_passes = len(r.accepted_per_step)
        return GenerationResult(
            prompt=None,
            token_ids=list(r.generated),
            text=text[: min(cuts)] if cuts else text,
            accepted_per_step=list(r.accepted_per_step),
            masks_per_step=list(r.masks_per_step),
            forward_passes=forward_passes,
            tokens_per_forward=len(r.generated) / forward_passes if forward_passes else 0.0,
            prefill_seconds=prefill_seconds,
            decode_seconds=max(r.finished_at - decode_start, 0.0),
            finish_reason=r.finish_reason or "length",
        )


def _check_context(config, prompt_len: int, max_new_tokens: int, k_max: int) -> None:
    """UserError when the longest prompt, the new tokens and the k_max - 1 mask positions read after them would run
    past the model's context (`max_position_embeddings`): positions beyond it are never trained and decode silently
    into noise. Nothing is truncated behind the user's back."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    if prompt_len >= limit:
        raise UserError(f"prompt of {prompt_len} tokens does not fit the model's context of {limit} positions; "
                        "shorten it")
    need = prompt_len + max_new_tokens + k_max - 1
    if need > limit:
        raise UserError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} + {k_max - 1} mask positions "
                        f"= {need} exceeds the model's context of {limit} positions; use max_new_tokens <= "
                        f"{max(limit - prompt_len - k_max + 1, 0)} or a shorter prompt")


def _check_stop_strings(stop_strings) -> list[str]:
    """None, one string or a list of strings -> the distinct non-empty ones (lm-eval skips "" too)."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) for s in stop_strings):
        raise UserError(f"stop_strings must be a list of strings, got {stop_strings!r}")
    return [s for s in dict.fromkeys(stop_strings) if s]


def _drop_unused_columns(cache: DynamicCache, attn: torch.Tensor) -> torch.Tensor:
    """Remove cache columns that no row attends to, so dead KV does not cost attention in every later step."""
    used = attn.bool().any(dim=0)
    if bool(used.all()) or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return attn
    index = used.nonzero().squeeze(1)
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
    return attn.index_select(1, index)
