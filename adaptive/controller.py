"""How many masks to append: the cost-aware span controller behind `--k-max auto` (paper §4.2, §5.7).

ConfAdapt and self-speculative decoding read one position per appended `<MTP>` mask. A mask costs query tokens
whether or not its position is kept, and what a query token costs depends on the machine: on a GPU at batch 1 a
forward of 16 query tokens costs about as much as one of 1; on two CPU cores a 5-token forward costs about twice a
1-token forward (paper §5.7: tokens per forward alone hides the longer query). With a fixed k_max every step pays for
k_max − 1 masks whatever their chance of being kept, which on a CPU makes an MTP model slower than plain decoding.

The rule. Before each forward the controller chooses the number of masks n ∈ {0 … n_max} that maximises the expected
net gain per row, in tokens,

        take · Σ_{j≤n} P(run ≥ j)  −  (c(L + n, b) − c(L, b) + v(n)) / c(1, b)

the tokens the masks are expected to add, minus the tokens plain decoding would commit in the extra time they cost.
L is the longest pending segment of the batch (the tokens whose KV this forward commits anyway), b the number of rows,
c(q, b) the measured seconds of one forward with q query tokens per row (`ForwardCost`), c(1, b) a plain step, and
v(n) what verifying n drafts adds to the next forward (self-speculative only). n = 0 (net 0) is plain next-token
decoding; more masks must beat fewer by MIN_NET tokens (cost-table noise). Masks pay exactly when their tokens come
cheaper than plain decoding's, whatever forward they ride on: the prefill's long query does not make the next step's
verification any cheaper, nor the masks themselves (their extra is at least c(1 + n, b) − c(1, b)).
One n serves every row of the batch (the masks share the batch's final columns).

The expectation. With n masks a row commits 1 + E[extra] tokens, E[extra] = Σ_{j≤n} P(run ≥ j), where the run is
the number of mask positions kept after the next-token position (ConfAdapt: the longest prefix of positions with
confidence ≥ tau, the next-token position included, minus one; self-speculative: the number of the drafts those masks
propose that the next forward verifies). P(run ≥ j) = Π_{i≤j} q_i is estimated online from the decoder's own steps
as a chain of conditional rates q_i = P(run ≥ i | run ≥ i − 1), counted over every row that had position i and
reached i − 1, with exponentially decaying counts (recent text predicts the next step better than old text) and a
weak optimistic prior (q_i = 1/2 with weight 1), so an untrained `<MTP>` is dropped after a few steps and a trained
one is kept. The prior alone buys no masks at the prefill: a prefill is longer than the cost table's queries, and
on a CPU its masks cost more than the table says (at batch 16 and ~150-token prompts, 0.1–0.15 s, and 0.3–0.6 s the
first time a shape is seen, against a ~0.1 s plain step), so the first observation comes from the first decoding
step, whose cost the table does measure. When n = 0 has been chosen for a
while nothing is observed, so the controller probes with the cheapest query that reads at least one mask (the link
every longer span needs), at intervals that double while probes find nothing (16, 32, … 128 steps) and reset once
they do. A probe's outcome is the next observation (the same step for
ConfAdapt, the verifying step for self-speculative drafts). Where even masks that are always right could not pay
(net gain below PROBE_WORTH with every P = 1: steep costs, e.g. self-speculative at a large batch on a CPU), it does
not probe at all. The counts are carried from one `generate` call of a decoder to the next (per strategy), so only
the first batch starts from the prior.

Self-speculative decoding pays for a draft twice: as a mask now and as a query token when the next forward verifies
it (v(n) = c(1 + n, b) − c(1, b)), and a row uses new drafts only if all of its current drafts are verified: `take`
is the share of rows expected to take them.

The cost table c(q, b) is measured once per machine (a second or two: a few forwards per query length at a fixed
context, the minimum of repeats) and cached in `$MTP_SELFDISTILL_CACHE/forward_costs.json` (or `$MTP_FORWARD_COST_CACHE`) under a key naming what
it depends on — architecture and size, dtype, device, torch threads, torch version — so a distilled checkpoint reuses
the table of its base model and a table from another machine is never used.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from distill.adapters import mask_gate_of

from distill.files import write_text_atomically

# Query lengths the cost table measures; between them c(q) is interpolated linearly, beyond the last extrapolated.
COST_QUERY_LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64)  # every short query: kernels differ by length
COST_CONTEXT = 128  # cached tokens during the measurement: a typical prompt
COST_REPEATS = 2  # the minimum of repeats is the least disturbed figure on a shared machine
COST_FILE = "forward_costs.json"
PROBE_MASKS = 1  # at least the first mask position, the link every longer span needs (more when that is cheaper)
PROBE_INTERVALS = (16, 32, 64, 128)
PRIOR_RATE, PRIOR_WEIGHT = 0.5, 1.0
DECAY = 0.9  # per observed step; about ten recent steps dominate
MIN_NET = 0.01  # tokens per row per step: a longer query must beat a shorter one by this (cost-table noise)
PROBE_WORTH = 0.5  # probe only where masks that are always right would add this many tokens per row per step, net


def net_gains(p_reach: Sequence[float], cost: Callable[[int], float], pending: int, *, take: float = 1.0,
              verify_cost: Callable[[int], float] | None = None) -> list[float]:
    """[net gain of n masks for n = 0 .. len(p_reach)], in tokens per row (the rule of the module docstring):
    take · Σ_{j≤n} p_reach[j−1] − (cost(pending + n) − cost(pending) + verify_cost(n)) / cost(1)."""
    plain, base = cost(1), cost(pending)
    gains, gain = [0.0], 0.0
    for n in range(1, len(p_reach) + 1):
        gain += take * p_reach[n - 1]
        # n masks cost at least what they add to a plain step (a long query does not make their products cheaper)
        extra = max(cost(pending + n) - base, cost(1 + n) - plain) + (verify_cost(n) if verify_cost else 0.0)
        gains.append(gain - extra / plain)
    return gains


def best_mask_count(p_reach: Sequence[float], cost: Callable[[int], float], pending: int, *,
                    take: float = 1.0, verify_cost: Callable[[int], float] | None = None) -> int:
    """argmax_n of `net_gains` (p_reach[j−1] = P(run ≥ j); `take`: the share of rows that will use the masks'
    positions, 1 for ConfAdapt; `verify_cost(n)`: what n drafts add to the next forward, self-speculative). More
    masks win only by more than MIN_NET, so measurement noise does not buy masks."""
    best_n, best = 0, 0.0
    for n, net in enumerate(net_gains(p_reach, cost, pending, take=take, verify_cost=verify_cost)):
        if n and net > best + MIN_NET:
            best_n, best = n, net
    return best_n


class SpanController:
    """Chooses the masks of every forward of one `MTPDecoder.generate` call (the rule in the module docstring)."""

    def __init__(self, n_max: int, cost: Callable[[int, int], float], *, speculative: bool = False):
        self.n_max = n_max
        self.cost = cost  # (query tokens per row, rows) -> seconds
        self.speculative = speculative
        self.hits = [0.0] * n_max  # decayed counts per chain link i: rows that reached run >= i + 1 ...
        self.trials = [0.0] * n_max  # ... among rows that had position i + 1 and reached run >= i
        self.idle = 0  # consecutive steps without masks
        self.probe = 0  # index into PROBE_INTERVALS
        self.probing = False
        self.prefill = True  # the next forward is the call's first

    def state(self) -> dict:
        """What was learned (decayed counts, probe interval), for the decoder's next generate call."""
        return {"hits": list(self.hits), "trials": list(self.trials), "probe": self.probe}

    def restore(self, state: dict | None) -> None:
        """Start from an earlier call's `state()` instead of the prior (the links both know)."""
        if not state:
            return
        n = min(self.n_max, len(state["hits"]))
        self.hits[:n], self.trials[:n] = state["hits"][:n], state["trials"][:n]
        self.probe = state["probe"]

    def reach(self) -> list[float]:
        """P(run >= j) for j = 1..n_max from the decayed counts and the prior."""
        out, p = [], 1.0
        for h, t in zip(self.hits, self.trials):
            p *= (h + PRIOR_RATE * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT)
            out.append(p)
        return out

    def choose(self, pending: int, rows: int, drafts: Sequence[int] = ()) -> int:
        """Masks to append this forward (the first call of a controller is the prefill). `pending`: the batch's longest
        pending segment; `drafts`: self-speculative rows' current draft counts (their chance to take new drafts is
        that of verifying all current ones)."""
        prefill, self.prefill = self.prefill, False
        if self.n_max == 0 or (prefill and not any(self.trials)):  # no masks at the prefill on the prior alone
            return 0
        reach = self.reach()
        cost = lambda q: self.cost(q, rows)  # noqa: E731
        take, verify = 1.0, None
        if self.speculative:
            take = sum(1.0 if d == 0 else reach[min(d, self.n_max) - 1] for d in drafts) / max(len(drafts), 1)
            verify = lambda n: self.cost(1 + n, rows) - self.cost(1, rows)  # noqa: E731
        n = best_mask_count(reach, cost, pending, take=take, verify_cost=verify)
        if n == 0:
            self.idle += 1
            if self.idle >= PROBE_INTERVALS[self.probe] and not self.probing and self._worth_probing(cost, verify):
                # The cheapest query that reads at least PROBE_MASKS masks (with a matrix kernel that favours a
                # longer query, a longer probe costs less and tells more).
                n = min(range(min(PROBE_MASKS, self.n_max), self.n_max + 1), key=lambda m: (cost(pending + m), m))
                self.probing, self.idle = True, 0
        else:
            self.idle = 0
        return n

    def _worth_probing(self, cost, verify) -> bool:
        """Could masks pay here at all: would masks that are always right gain PROBE_WORTH tokens per row?"""
        return max(net_gains([1.0] * self.n_max, cost, 1, verify_cost=verify)) >= PROBE_WORTH

    def observe(self, observations: Sequence[tuple[int, int]]) -> None:
        """(run, n) per row that read n mask positions this step (run = how many of them it kept, 0..n); updates
        the chain rates, counts decayed once per step."""
        observations = [(run, n) for run, n in observations if n > 0]
        if not observations:
            return
        for i in range(max(n for _, n in observations)):
            self.hits[i] *= DECAY
            self.trials[i] *= DECAY
            for run, n in observations:
                if i < n and run >= i:
                    self.trials[i] += 1
                    self.hits[i] += run >= i + 1
        if self.probing:  # a probe that found nothing backs off; one that found something resets the interval
            found = any(run > 0 for run, _ in observations)
            self.probe = 0 if found else min(self.probe + 1, len(PROBE_INTERVALS) - 1)
            self.probing = False


# -------------------------------------------------------------------------------------------------- forward costs


class ForwardCost:
    """c(q, b): seconds of one forward with q query tokens per row and b rows over a cached context, measured on this
    machine at b = 1, 2, 4, 8, ... (each table once, when first needed; `prepare` measures them up front); linear in q
    between measured lengths and in b between the powers of two around it."""

    def __init__(self, model, mask_token_id: int, *, cache_file: Path | None = None, log=None):
        self.model = model
        self.mask_token_id = mask_token_id
        self.cache_file = cache_file if cache_file is not None else default_cache_file()
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr))
        self.key = cost_key(model)
        self.tables: dict[int, list[float]] = {}  # rows -> seconds per COST_QUERY_LENGTHS entry
        self._warned = False

    def __call__(self, q: int, b: int) -> float:
        low = 1 << (max(int(b), 1).bit_length() - 1)  # the power of two at or below b
        c_low = self._at_batch(self._table(low), q)
        if b == low:
            return c_low
        c_high = self._at_batch(self._table(2 * low), q)
        return c_low + (c_high - c_low) * (b - low) / low

    def prepare(self, rows: int) -> None:
        """Load or measure every table a batch of `rows` rows can need (rows leave the batch as they finish), so no
        measurement happens in the middle of a timed decode."""
        b = 1
        while True:
            self._table(b)
            if b >= rows:
                return
            b *= 2

    def _table(self, b: int) -> list[float]:
        if b not in self.tables:
            self.tables[b] = self._load(b) or self._measure(b)
        return self.tables[b]

    @staticmethod
    def _at_batch(table: list[float], q: int) -> float:
        qs = COST_QUERY_LENGTHS
        if q <= qs[0]:
            return table[0]
        for (q0, c0), (q1, c1) in zip(zip(qs, table), zip(qs[1:], table[1:])):
            if q <= q1:
                return c0 + (c1 - c0) * (q - q0) / (q1 - q0)
        slope = max((table[-1] - table[-2]) / (qs[-1] - qs[-2]), 0.0)
        return table[-1] + slope * (q - qs[-1])

    # ---- cache
    def _load(self, b: int) -> list[float] | None:
        entries = _read_cache(self.cache_file)
        table = entries.get(self.key, {}).get(str(b))
        if isinstance(table, list) and len(table) == len(COST_QUERY_LENGTHS) and all(
                isinstance(c, (int, float)) and c > 0 for c in table):
            return [float(c) for c in table]
        if entries and self.key not in entries and not self._warned:
            self._warned = True
            self.log(f"forward-cost cache {self.cache_file} has no table for this model and machine ({self.key}); "
                     "measuring one")
        return None

    def _measure(self, b: int) -> list[float]:
        table = measure_forward_costs(self.model, self.mask_token_id, b)
        entries = _read_cache(self.cache_file)
        entries.setdefault(self.key, {})[str(b)] = table
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.cache_file, json.dumps(entries, indent=1, sort_keys=True) + "\n")
        except OSError as exc:  # a read-only cache costs a re-measurement next time, nothing else
            self.log(f"warning: cannot write the forward-cost cache {self.cache_file}: {exc.strerror or exc}")
        return table


def default_cache_file() -> Path:
    """$MTP_FORWARD_COST_CACHE, else forward_costs.json in the model cache ($MTP_SELFDISTILL_CACHE)."""
    from distill.models import cache_root

    env = os.environ.get("MTP_FORWARD_COST_CACHE")
    return Path(env).expanduser() if env else cache_root() / COST_FILE


def cost_key(model) -> str:
    """What the forward cost depends on: architecture and size, dtype, device, threads, torch version."""
    cfg = model.config
    shape = "-".join(str(getattr(cfg, name, "")) for name in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size"))
    device = model.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    attn = getattr(cfg, "_attn_implementation", None) or "default"
    key = f"{shape}|{model.dtype}|{attn}|{where}|torch{torch.__version__}"
    gate = mask_gate_of(model)
    if gate is not None:  # a mask-only adapter's LoRA layers run whenever masks are in the query
        key += f"|mask-lora{len(gate.layers)}r{gate.rank}"
    return key


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@torch.inference_mode()
def measure_forward_costs(model, mask_token_id: int, rows: int) -> list[float]:
    """Seconds of one cached forward per COST_QUERY_LENGTHS entry at `rows` rows: the minimum of COST_REPEATS."""
    from transformers import DynamicCache

    device = model.device
    was_training = model.training
    model.eval()
    # Real tokens, and a mask in every query of two or more: a decoding step is [pending tokens, masks], and a model
    # with a mask-only adapter (distill/adapters.py) runs its adapter exactly when a mask is present.
    real = 0 if mask_token_id != 0 else 1
    context = torch.full((rows, COST_CONTEXT), real, dtype=torch.long, device=device)
    base = DynamicCache(config=model.config)
    model(input_ids=context, past_key_values=base, use_cache=True)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def once(q: int) -> float:
        ids = torch.full((rows, q), real, dtype=torch.long, device=device)
        ids[:, 1:] = mask_token_id
        pos = torch.arange(COST_CONTEXT, COST_CONTEXT + q, device=device).expand(rows, q)
        attn = torch.ones(rows, COST_CONTEXT + q, dtype=torch.long, device=device)
        _sync(device)
        start = time.perf_counter()
        kwargs = {"logits_to_keep": q} if keeps_logits else {}
        model(input_ids=ids, position_ids=pos, attention_mask=attn, past_key_values=base, use_cache=True, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
        base.crop(-q)
        return seconds

    once(1)  # warm-up
    table = [min(once(q) for _ in range(COST_REPEATS)) for q in COST_QUERY_LENGTHS]
    model.train(was_training)
    # No monotone clean-up: a longer query can really cost less. The BLAS picks its matrix kernel by the number of
    # rows, and on 2 CPU cores at batch 1 a 5-token forward of SmolLM2-135M measured 74 ms against 96 ms for 2 tokens
    # (a 1-token forward, a matrix-vector product, 56 ms); the controller then appends masks up to the cheap length.
    return table


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_ratio_summary(cost: Callable[[int, int], float], rows: int, qs: Sequence[int] = (2, 4, 8, 16)) -> str:
    """'c(2)/c(1)=1.08 c(4)/c(1)=1.31 ...' for logs and reports."""
    base = cost(1, rows)
    return " ".join(f"c({q})/c(1)={cost(q, rows) / base:.2f}" for q in qs if not math.isnan(base))
