"""lm-evaluation-harness adapter: `--model mtp` decodes with an MTP strategy (the paper's numbers come from lm-eval,
§3.3; its fork adds MTP generation arguments to the HF backend, this is a model class instead).

    python -m mtp_cli.lmeval --model mtp \
        --model_args pretrained=DIR,strategy=confadapt,tau=0.9,k_max=16,max_gen_toks=256,batch_size=16 \
        --tasks path/to/task.yaml [--limit 100] [--output_path results/]

`python -m mtp_cli.lmeval` (mtp_cli/lmeval.py) is lm-eval's own command line with "mtp" registered, which importing
this module does; `--tasks` takes built-in task names, a task YAML or a directory of them (offline: point the YAML's
dataset at local files, e.g. `dataset_path: json`).

* `generate_until`: requests are grouped by their generation arguments and decoded in batches by `MTPDecoder`; the
  task's `until` strings are stop strings (plus the EOS text, as lm-eval's HF backend does) and `max_gen_toks` the
  budget. Decoding is greedy, so a task that asks for sampling is refused.
* `loglikelihood` / `loglikelihood_rolling`: plain next-token scoring, one forward per request, so multiple-choice and
  perplexity tasks run unchanged (the masks play no part in them).
* Speed: every decoding step's accepted span is kept (`accepted_per_step`); `tokens_per_forward` is their mean, the
  paper's "Eff. k". They are printed after each `generate_until` call and land in the results' "config" section,
  with vLLM's acceptance metrics under vLLM's names (adaptive/metrics.py).

Model arguments: pretrained (directory or alias), strategy (static | confadapt | selfspec; default: the model's
generation config, else confadapt), tau, k_max, k (static), batch_size (16), max_gen_toks (256), dtype (float32),
calibration (tau's scale, as `mtp generate --calibrated / --no-calibration`: a typed tau is the raw top-1 probability
unless calibration=true, the model's recorded tau keeps its recorded scale, false is always raw), device, max_length.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from adaptive.loading import confidence_scorer, load_mtp_model, mtp_defaults
from distill.models import DTYPES
from distill.decoding_defaults import stop_token_ids
from adaptive.strategies import build_strategy
from adaptive.decoder import MTPDecoder
from adaptive.metrics import acceptance_metrics
from adaptive.prompts import length_sorted_batches
from adaptive.strategies import ConfAdapt
from distill.errors import UserError

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _positive_int(value, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"mtp: {what} must be a positive integer, got {value!r}") from None
    if number < 1 or number != float(value):
        raise UserError(f"mtp: {what} must be a positive integer, got {value!r}")
    return number


def _pick_device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"mtp: device {device} is not available; using the CPU", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(device)


@register_model("mtp")
class MTPLM(TemplateLM):
    def __init__(self, pretrained: str, strategy: str | None = None, tau: float | None = None,
                 k_max: int | None = None, k: int | None = None, batch_size=DEFAULT_BATCH_SIZE,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, dtype: str = "float32", calibration: bool | None = None,
                 device: str | None = None, max_length: int | None = None, max_batch_size=None):
        super().__init__()
        if dtype not in DTYPES:
            raise UserError(f"mtp: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.pretrained = str(pretrained)
        # strategy values are checked before the weights load
        defaults = mtp_defaults(self.pretrained)
        strategy = build_strategy(defaults, strategy, k=k, tau=tau, k_max=k_max)
        # tau's scale: typed (tau=...) raw unless calibration=True; the model's recorded tau its recorded scale
        calibrator = confidence_scorer(self.pretrained, defaults, tau_given=tau is not None,
                                       calibrated=calibration) if isinstance(strategy, ConfAdapt) else None
        if str(batch_size).startswith("auto"):  # lm-eval's automatic batch size: memory is not the limit here
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        model, tokenizer = load_mtp_model(self.pretrained, dtype)
        self._device = _pick_device(device)
        self.model = model.to(self._device)
        self.tokenizer = tokenizer
        self.decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
        if calibrator is not None:
            strategy = ConfAdapt(strategy.tau, strategy.k_max, scorer=calibrator)
        self.strategy = strategy
        self.calibrated = calibrator is not None
        self.max_length = _positive_int(max_length or getattr(model.config, "max_position_embeddings", None) or 2048,
                                        "max_length")
        # speed across all generate_until requests (paper §3.3: over all decoding steps of all generations)
        self.accepted_per_step: list[int] = []
        self.generations: list = []  # every GenerationResult, for the acceptance metrics (adaptive/metrics.py)
        self.decode_seconds = 0.0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MTPLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "MTPLM":
        # lm-eval always passes its own batch_size (default 1) and device: a value in --model_args wins over them
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- what lm-eval asks of a model ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # conditions the first token of a loglikelihood request with an empty context
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's own special tokens unless told otherwise, but no second BOS (as lm-eval's HF backend)."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False
        return list(self.tokenizer(string, **options)["input_ids"])

    def get_model_info(self) -> dict:
        """Merged into the results' "config" by lm-eval after the run: the MTP decoding setting and its speed."""
        return {"mtp_strategy": self.strategy.label, "mtp_calibrated": self.calibrated, **self.speed()}

    # ---- generation ------------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=f"mtp generate_until {self.strategy.label}", disable=disable_tqdm) as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise UserError("mtp decodes greedily; this task asks for sampling (do_sample / temperature > 0)")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                budget = kwargs.pop("max_gen_toks")
                room = self.max_length - budget - (self.strategy.k_max - 1)  # the decoder reads k_max - 1 masks ahead
                if room < 1:
                    raise UserError(f"mtp: max_gen_toks {budget} leaves no room for the prompt in {self.max_length}")
                contexts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in indices]
                for chunk in length_sorted_batches(contexts, self.batch_size):  # similar lengths share a batch
                    began = time.perf_counter()
                    results = self.decoder.generate([contexts[j] for j in chunk], self.strategy, budget,
                                                    stop_strings=until)
                    self.decode_seconds += time.perf_counter() - began
                    for j, result in zip(chunk, results):
                        i = indices[j]
                        self.accepted_per_step += result.accepted_per_step
                        self.generations.append(result)
                        out[i] = result.text  # cut just before the first stop string
                        self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
                    bar.update(len(chunk))
        speed = self.speed()
        print(f"mtp: {self.strategy.label}: {speed['mtp_generated_tokens']} tokens in {speed['mtp_forward_passes']} "
              f"forwards, {speed['mtp_tokens_per_forward_mean']:.2f} ± {speed['mtp_tokens_per_forward_std']:.2f} "
              f"tokens/forward, {speed['mtp_tokens_per_second']:.1f} tok/s", file=sys.stderr)
        return out

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens committed per forward pass over every decoding step so far (the paper's Eff. k)."""
        return statistics.fmean(self.accepted_per_step) if self.accepted_per_step else 0.0

    def speed(self) -> dict:
        steps, tokens = self.accepted_per_step, sum(self.accepted_per_step)
        return {
            "mtp_generated_tokens": tokens,
            "mtp_forward_passes": len(steps),
            "mtp_tokens_per_forward_mean": self.tokens_per_forward,
            "mtp_tokens_per_forward_std": statistics.pstdev(steps) if steps else 0.0,
            "mtp_decode_seconds": self.decode_seconds,
            "mtp_tokens_per_second": tokens / self.decode_seconds if self.decode_seconds else 0.0,
            # vLLM's names (mean_acceptance_length, acceptance_histogram, per-position acceptance rate, ...)
            **acceptance_metrics(self.generations, speculative=self.strategy.speculative,
                                 seconds=self.decode_seconds or None),
        }

    # ---- scoring: ordinary next-token log-probabilities ------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (sum log p, is greedy)."""
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for key, context_enc, continuation_enc in tqdm(requests, desc="mtp loglikelihood",
                                                                disable=disable_tqdm):
                    if continuation_enc:
                        # the last max_length tokens predict the continuation (left-truncated context)
                        tokens = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
                        ids = torch.tensor([tokens[:-1]], device=self._device)
                        logits = self.model(input_ids=ids).logits[0, -len(continuation_enc) :].float()
                        logprobs = F.log_softmax(logits, dim=-1)
                        target = torch.tensor(continuation_enc, device=self._device)
                        answer = (float(logprobs.gather(-1, target[:, None]).sum()),
                                  bool((logprobs.argmax(dim=-1) == target).all()))
                    else:
                        answer = (0.0, True)
                    out.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
        finally:
            self.model.train(was_training)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length tokens (lm-eval's rolling windows)."""
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="mtp loglikelihood_rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                                   disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out
