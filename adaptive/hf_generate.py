"""MTP decoding behind transformers' `generate(custom_generate=...)` (transformers 5.23, generation/utils.py).

    model = AutoModelForCausalLM.from_pretrained(d)
    out = model.generate(**batch, custom_generate=d, trust_remote_code=True, tokenizer=tok,
                         mtp_strategy="confadapt", mtp_tau=0.9, mtp_k_max=16, max_new_tokens=256)
    out = model.generate(**batch, custom_generate=adaptive.hf_generate, mtp_strategy="static", mtp_k=3)

`mtp export` writes `custom_generate/generate.py` (a thin file importing this module) and a requirements.txt naming
this package into every exported checkpoint, so the directory itself is the `custom_generate` argument. transformers
calls the function in one of two ways, and both end here:

* a directory (`custom_generate=d`, needs `trust_remote_code=True`): `generate` hands over its own arguments
  unprocessed (`inputs` or `input_ids`, `attention_mask`, `generation_config`, the generation kwargs);
* a callable (`custom_generate=adaptive.hf_generate`, the module itself, or its `generate`): `generate` first prepares a full generation config (max_length = prompt
  width + max_new_tokens, EOS and pad ids) and the stopping criteria, then calls it in place of its greedy loop. In
  transformers 5.23 a callable never receives the `tokenizer` argument (it is dropped before the call), so
  `stop_strings` work only through the directory form.

The rule: the rows of a left-padded batch (`attention_mask`, as `generate` users pass it) are decoded by
`adaptive.decoder.MTPDecoder` from their real tokens, with the strategy `mtp_strategy` ("confadapt" | "static" |
"selfspec"), `mtp_tau`, `mtp_k_max` (an integer, "auto" or "auto:N") and `mtp_k` (static), each defaulting to the
model's generation config (`mtp_*`, written by `mtp export` and `mtp tune`) as `mtp generate` does. tau's scale follows
`mtp generate`'s rule: an `mtp_tau` passed to the call thresholds the raw top-1 probability unless
`mtp_calibration=True` (then the calibrator `mtp calibrate` saved beside the model); a tau taken from the generation
config is on the scale recorded with it (`mtp_tau_scale`); `mtp_calibration=False` is always raw. `max_new_tokens` (or
`max_length`), `eos_token_id` and `stop_strings` are honoured; the output is what `generate` returns: the input rows as
given followed by the generated tokens, right-padded with the pad id after a row ends, or with
`return_dict_in_generate=True` an `MTPGenerateOutput` (a `GenerateDecoderOnlyOutput`) that also carries each row's
accepted tokens per forward pass and the acceptance metrics of adaptive/metrics.py.

Everything MTP decoding cannot honour is refused with one ValueError, never decoded some other way: sampling, beams,
several sequences per prompt, logits processors (repetition penalty, bad words, ...), stopping criteria other than
length / EOS / stop strings, streamers, scores or hidden states in the output, a started cache, right padding, and
every bad value (unknown strategy, tau outside (0, 1], a k_max that does not fit the context, a model without
`<MTP>`).

A checkpoint exported with a mask-only adapter (`mtp_adapter/`, distill/adapters.py) is loaded by transformers as the
base model; the first MTP `generate` call attaches the adapter to the model in place, gated to `<MTP>` positions, so
the model's own forward and plain `generate` still compute the base model's outputs.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from distill.errors import UserError
from distill.tokens import get_mtp_token_id

# Arguments `generate` passes to a custom function that are fine when unset, and the model kwargs its own preparation
# adds before calling a callable (position ids, the empty cache, ...): recomputed by the decoder.
_UNSUPPORTED_WHEN_SET = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                         "negative_prompt_attention_mask", "assistant_tokenizer", "inputs_embeds")
_PREPARED_BY_GENERATE = ("position_ids", "logits_to_keep", "use_cache", "cache_position")
_HONOURED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with `return_dict_in_generate=True`, plus, per row, what each forward pass committed."""

    accepted_per_step: list[list[int]] | None = None  # tokens committed by each forward pass, per row
    masks_per_step: list[list[int]] | None = None  # <MTP> masks appended in each forward pass, per row
    finish_reasons: list[str] | None = None  # "stop" (EOS id or stop string) | "length", per row
    metrics: dict | None = None  # adaptive.metrics.acceptance_metrics over the batch (vLLM's names)


def generate(model, input_ids=None, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, streamer=None, mtp_strategy=None, mtp_tau=None, mtp_k_max=None, mtp_k=None,
             mtp_calibration=None, tokenizer=None, **model_kwargs):
    """transformers' custom_generate entry point (see the module docstring). Bad input: one ValueError."""
    try:
        return _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                         streamer, dict(strategy=mtp_strategy, tau=mtp_tau, k_max=mtp_k_max, k=mtp_k),
                         mtp_calibration, tokenizer, model_kwargs)
    except UserError as exc:
        raise ValueError(f"MTP generate: {exc}") from None


def _refuse(message: str):
    raise UserError(message)


def _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
              mtp: dict, calibration: bool | None, tokenizer, model_kwargs: dict):
    from transformers.generation.logits_process import LogitsProcessorList

    from adaptive.decoder import MTPDecoder
    from adaptive.metrics import acceptance_metrics

    inputs = model_kwargs.pop("inputs", None)
    if input_ids is None:
        input_ids = inputs
    elif inputs is not None:
        _refuse("pass the prompt once, as inputs or as input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                   torch.int):
        _refuse("input_ids must be a 2-D tensor of token ids [batch, length] (left-padded, with attention_mask)")
    get_mtp_token_id(model)  # a model without <MTP> is refused before anything else, never decoded plainly
    _attach_exported_adapter(model)
    for key in _UNSUPPORTED_WHEN_SET:
        if model_kwargs.pop(key, None) is not None:
            _refuse(f"{key} is not supported by MTP decoding")
    if streamer is not None:
        _refuse("streamer is not supported by MTP decoding (rows are returned when they finish)")
    if synced_gpus:
        _refuse("synced_gpus is not supported by MTP decoding")
    for key in _PREPARED_BY_GENERATE:
        model_kwargs.pop(key, None)
    cache = model_kwargs.pop("past_key_values", None)
    if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
        _refuse("past_key_values: MTP decoding starts from the prompt and keeps its own cache")
    attention_mask = model_kwargs.pop("attention_mask", None)

    # One generation config, as `generate` builds it: the call's kwargs > generation_config > the model's.
    gen, unused = model._prepare_generation_config(generation_config, **model_kwargs)
    unused = sorted(k for k, v in unused.items() if v is not None)
    if unused:
        _refuse(f"unknown argument(s) {unused} (MTP decoding takes the generation config's fields and mtp_strategy, "
                "mtp_tau, mtp_k_max, mtp_k, mtp_calibration, tokenizer)")
    if gen.do_sample:
        _refuse("do_sample=True: MTP decoding is greedy (pass do_sample=False)")
    if (gen.num_beams or 1) > 1 or (gen.num_return_sequences or 1) > 1:
        _refuse("num_beams and num_return_sequences must be 1: MTP decoding returns one greedy sequence per prompt")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(gen, flag, False):
            _refuse(f"{flag}=True is not supported by MTP decoding")
    if (gen.min_new_tokens or 0) > 0 or (gen.min_length or 0) > 0:
        _refuse("min_new_tokens / min_length are not supported by MTP decoding")
    width = input_ids.shape[1]
    processors = model._get_logits_processor(
        generation_config=gen, input_ids_seq_length=width, encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None, logits_processor=logits_processor or LogitsProcessorList(),
        device=input_ids.device, model_kwargs={})
    if len(processors):
        _refuse("logits processors are not supported by MTP decoding: "
                + ", ".join(sorted({type(p).__name__ for p in processors})))
    other = [type(c).__name__ for c in (stopping_criteria or []) if not isinstance(c, _HONOURED_CRITERIA)]
    if other:
        _refuse(f"stopping criteria other than length, EOS and stop strings are not supported: {', '.join(other)}")

    max_new_tokens = gen.max_new_tokens if gen.max_new_tokens is not None else (gen.max_length or 0) - width
    if max_new_tokens < 1:
        _refuse(f"nothing to generate: max_length {gen.max_length} <= the input width {width}; set max_new_tokens")
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if isinstance(eos, torch.Tensor):
        eos_ids = [int(e) for e in eos.reshape(-1).tolist()]
    pad = gen.pad_token_id
    pad = int(pad.reshape(-1)[0]) if isinstance(pad, torch.Tensor) else pad
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0  # as `generate` does, which warns about it
    stop_strings = gen.stop_strings
    if stop_strings and tokenizer is None:
        _refuse("stop_strings need the tokenizer: pass tokenizer=... to generate (with a directory custom_generate; "
                "transformers 5.23 does not hand it to a callable)")

    rows = _rows(input_ids, attention_mask)
    strategy = _strategy(model, mtp, calibration)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(_model_path(model))
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=eos_ids)
    start = time.perf_counter()
    results = decoder.generate(rows, strategy, max_new_tokens=int(max_new_tokens), stop_strings=stop_strings)
    seconds = time.perf_counter() - start

    longest = max(len(r.token_ids) for r in results)
    new = torch.full((len(results), longest), int(pad), dtype=input_ids.dtype)
    for b, r in enumerate(results):
        new[b, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if not gen.return_dict_in_generate:
        return sequences
    return MTPGenerateOutput(
        sequences=sequences,
        accepted_per_step=[list(r.accepted_per_step) for r in results],
        masks_per_step=[list(r.masks_per_step) for r in results],
        finish_reasons=[r.finish_reason for r in results],
        metrics={"strategy": strategy.label,
                 **acceptance_metrics(results, speculative=strategy.speculative, seconds=seconds)},
    )


def _rows(input_ids: torch.Tensor, attention_mask) -> list[list[int]]:
    """Each row's real tokens: the positions the attention mask keeps, which must be a suffix (left padding)."""
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        _refuse(f"attention_mask must be a tensor of the input's shape {tuple(input_ids.shape)}")
    rows = []
    for b, mask in enumerate(attention_mask.tolist()):
        real = sum(1 for m in mask if m)
        if real == 0:
            _refuse(f"row {b} of the batch is empty (its attention mask is all zeros)")
        if any(not m for m in mask[len(mask) - real :]) or any(mask[: len(mask) - real]):
            _refuse(f"row {b} is not left-padded: its attention mask must be zeros, then ones (tokenize with "
                    "padding_side='left')")
        rows.append(ids[b][len(mask) - real :])
    return rows


def _model_path(model) -> str | None:
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(path) if path else None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str | None):
    """The tokenizer saved with the model (the decoder decodes text for stop strings and reports)."""
    from transformers import AutoTokenizer

    try:
        if not path:
            raise OSError("the model has no name_or_path")
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model's tokenizer ({str(exc).splitlines()[0] if str(exc) else exc}); "
                        "pass tokenizer=...") from None


def _attach_exported_adapter(model) -> None:
    """An export that keeps a mask-only adapter beside the base weights (distill/adapters.py): plain transformers
    loaded the base; the adapter is attached in place, once, and gated to <MTP> positions. `model(...)` and plain
    `generate` stay the base model's (no mask, no adapter)."""
    from distill.adapters import attach_mask_adapter, exported_adapter, mask_gate_of

    path = _model_path(model)
    if mask_gate_of(model) is None and path and Path(path).is_dir():
        kept = exported_adapter(path)
        if kept is not None:
            attach_mask_adapter(model, kept)


def _strategy(model, mtp: dict, calibration: bool | None):
    """The strategy from the mtp_* kwargs, defaults from the model's generation config (`mtp generate`'s rule)."""
    from adaptive.strategies import make_strategy
    from distill.decoding_defaults import read_decoding_defaults, wants_calibrated

    defaults = read_decoding_defaults(getattr(model, "generation_config", None),
                                      getattr(model.config, "mtp_k_max", None))
    name = mtp["strategy"] if mtp["strategy"] is not None else defaults["strategy"]
    k, k_max = mtp["k"], mtp["k_max"]
    if not isinstance(name, str):
        _refuse(f"mtp_strategy must be a string, got {name!r}")
    if name.strip().lower() == "static":
        if k is None and k_max is None:
            if defaults["strategy"] != "static":
                _refuse("mtp_strategy='static' needs mtp_k (tokens per forward pass)")
            k = defaults["k_max"]
        return make_strategy(name, k=k, k_max=k_max)
    if k is None and k_max is None:
        k_max = defaults["k_max"]
    tau = defaults["tau"] if mtp["tau"] is None else mtp["tau"]
    scorer = None
    if wants_calibrated(defaults, tau_given=mtp["tau"] is not None, calibrated=calibration) and \
            name.strip().lower() == "confadapt":
        from adaptive.calibration import load_calibrator

        path = _model_path(model)
        scorer = load_calibrator(path) if path and Path(path).is_dir() else None
        if scorer is None:
            _refuse("tau on the calibrated scale, but no calibrator was saved beside the model (`mtp calibrate`); "
                    "pass mtp_tau (the raw top-1 probability) or mtp_calibration=False")
    return make_strategy(name, k=k, k_max=k_max, tau=tau, scorer=scorer)


class _CallableModule(types.ModuleType):
    """This module is itself a valid `custom_generate` callable: `generate(custom_generate=adaptive.hf_generate)`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


# transformers reads the callable's signature to pick out its own kwargs (mtp_*): the module shows generate's.
__signature__ = inspect.signature(generate)
sys.modules[__name__].__class__ = _CallableModule
