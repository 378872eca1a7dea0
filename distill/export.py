"""`mtp export`: turn a training output into a plain Hugging Face directory that any transformers user can load.

    mtp export --model outputs/smollm2-cpu --output exported/ [--dtype bfloat16] [--k-max 16] [--tau 0.9]

The input is either
  * a full checkpoint (config.json + safetensors + tokenizer), e.g. a full fine-tune written by `mtp train`, or
  * a LoRA adapter directory (adapter_config.json + adapter weights + tokenizer). Its `base_model_name_or_path` may
    be the alias `smollm2-135m`, a local directory or a hub id. The base is loaded, given the same `<MTP>` row the
    trainer gave it (`add_mtp_token` is deterministic, and a trained row saved with the adapter replaces it), the
    adapter is loaded with peft and merged (`merge_and_unload`). A *mask-only* adapter (`lora_mask_only`,
    distill/adapters.py) is not merged: it is saved unmerged in `<output>/mtp_adapter/` beside the base weights, so
    plain transformers loads the base model itself and this package's loaders re-attach the adapter gated to `<MTP>`
    positions (`--merge-adapter` merges it anyway).

The output is what paper §7.5 asks of a released MTP checkpoint, minus remote code: safetensors weights, the tokenizer
with `<MTP>`, `config.mtp_mask_token_id` / `config.mtp_k_max`, and a generation config that carries the decoding
defaults as extra attributes (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, `mtp_mask_token_id`) next to the EOS ids, so
`mtp generate` needs no flags and `AutoModelForCausalLM.from_pretrained(out)` loads it like any other Llama/Qwen.

An input without `<MTP>` (an untrained base) is exported too, after adding the token: that is an *untrained
conversion* — the mask row is initialised but never trained, so multi-token spans from it are not meaningful.

Serving. The export also carries what the serving stacks read (nothing of it is needed by plain transformers,
which loads the directory with `trust_remote_code` off):
  * `custom_generate/generate.py` (+ `requirements.txt` naming this package): the directory is a
    `model.generate(custom_generate=DIR, trust_remote_code=True, mtp_strategy=..., ...)` argument
    (adaptive/hf_generate.py);
  * `config.pard_token` = the `<MTP>` id: vLLM's parallel drafting (`speculative_config = {"method": "draft_model",
    "model": DIR, "parallel_drafting": true, "num_speculative_tokens": K}`) fills the draft's K − 1 extra query slots
    with the id it reads from the draft's config.json: `dflash_config.mask_token_id`, `mask_token_id`,
    `dspark_noise_token_id`, `pard_token` or `ptd_token_id`, the first one present
    (vllm/v1/spec_decode/llm_base_proposer.py `_init_parallel_drafting_params`, vLLM main at commit 00c4f22d;
    `pard_token` is the key every vLLM release with parallel drafting reads). Serving the checkpoint as its own
    draft model is the lossless self-speculative mode (launch/vllm_serve.sh).

The directory is written to a temporary sibling and renamed into place (os.replace), with the marker file of
distill/files.py and the user's umask on every file. An existing non-empty output is only replaced with --overwrite,
and only when `mtp export` created it (the marker); an output that is, contains or lies inside the source model (or
an adapter's local base) is always refused. --k-max and --tau must pass the rule `mtp generate` applies to them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from distill.adapters import (
    EXPORT_SUBDIR,
    attach_mask_adapter,
    exported_adapter,
    is_mask_only,
    read_marker,
    write_marker,
)
from distill.decoding_defaults import (DEFAULT_K_MAX, DEFAULT_TAU, STRATEGIES, check_tau, record_decoding_defaults,
                                      stop_token_ids)
from distill.errors import UserError
from distill.files import check_replaceable_dir, mark_created, share_files
from distill.models import DEFAULT_MODEL, DTYPES, load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token



def _has_mtp(model, tokenizer) -> bool:
    return MTP_TOKEN in tokenizer.get_vocab() and getattr(model.config, "mtp_mask_token_id", None) is not None


def _warn_untrained(source: str) -> None:
    print(f"warning: {source} has no {MTP_TOKEN} token; adding an untrained one (untrained conversion: multi-token "
          "spans are not meaningful until the model is distilled with `mtp train`)", file=sys.stderr)


def _load_full(model_dir: str):
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    if not _has_mtp(model, tokenizer):
        _warn_untrained(model_dir)
        add_mtp_token(model, tokenizer)
    return model, tokenizer


def _adapter_tokenizer(adapter_dir: Path):
    """An adapter dir has no config.json, so `load_tokenizer` (which resolves model dirs) does not apply."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer in {adapter_dir}: {str(exc).strip().splitlines()[0]}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_adapter_base(adapter_dir: Path):
    """(base model, tokenizer, whether the tokenizer has <MTP>) for an adapter directory: the base gets exactly the
    vocabulary the adapter was trained with."""
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_name = adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{adapter_dir / 'adapter_config.json'} has no base_model_name_or_path")
    if not any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{adapter_dir} has no tokenizer files; save the tokenizer (with {MTP_TOKEN}) next to the adapter")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pickled = sorted(p.name for p in adapter_dir.glob("adapter_model*.bin"))
        if pickled:
            raise UserError(f"{adapter_dir / pickled[0]} is a pickle, which is never loaded (safetensors only); save "
                            "the adapter with safe_serialization=True (peft's default) as adapter_model.safetensors")
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    if is_mask_only(adapter_dir):
        read_marker(adapter_dir)  # a malformed record is one error line, before the weights load
    tokenizer = _adapter_tokenizer(adapter_dir)
    base = load_model(base_name, dtype=torch.float32)
    trained_with_mtp = MTP_TOKEN in tokenizer.get_vocab()
    if trained_with_mtp:
        # Same call as the trainer made on the base: same id, same (seeded) initial row, same padded matrix size.
        add_mtp_token(base, tokenizer)
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise UserError(f"vocab mismatch: tokenizer in {adapter_dir} has {len(tokenizer)} tokens but the base "
                        f"{base_name} has {base.get_input_embeddings().weight.shape[0]} embedding rows")
    return base, tokenizer, trained_with_mtp


def _peft_onto(base, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"cannot load adapter {adapter_dir}: {str(exc).strip().splitlines()[0]}") from exc


def _without_lora(peft_model):
    """The base with only the adapter's trained token rows (<MTP>) merged: every LoRA B zeroed, then merged."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for lora_b in module.lora_B.values():
                    lora_b.weight.zero_()
    return peft_model.merge_and_unload()


def load_for_export(model_dir: str, *, mask_adapter: str = "merge"):
    """(float32 model, tokenizer with <MTP>) for a full checkpoint, an alias, or a LoRA adapter directory.

    A plain LoRA adapter is merged. A mask-only adapter (distill/adapters.py), saved by training or kept by an export:
      mask_adapter="gate"   attached and gated, for decoding (k=1 is the base model's);
      mask_adapter="split"  the PeftModel itself, for `export_model` to save the adapter and the base separately;
      mask_adapter="merge"  merged into the weights like any LoRA (every position then runs the adapted weights).
    """
    path = Path(model_dir).expanduser()
    if (path / "adapter_config.json").is_file():
        base, tokenizer, trained_with_mtp = _load_adapter_base(path)
        mask_only = is_mask_only(path)
        if mask_only and mask_adapter == "gate":
            return attach_mask_adapter(base, path), tokenizer
        peft_model = _peft_onto(base, path)
        if mask_only and mask_adapter == "split":
            return peft_model, tokenizer
        model = peft_model.merge_and_unload()
        if not trained_with_mtp:
            _warn_untrained(str(path))
            add_mtp_token(model, tokenizer)
        return model, tokenizer
    model, tokenizer = _load_full(model_dir)
    kept = exported_adapter(path) if path.is_dir() else None
    if kept is not None:
        if mask_adapter == "gate":
            return attach_mask_adapter(model, kept), tokenizer
        peft_model = _peft_onto(model, kept)
        if mask_adapter == "split":
            return peft_model, tokenizer
        return peft_model.merge_and_unload(), tokenizer
    return model, tokenizer


def mtp_generation_config(model, tokenizer, *, strategy: str, k_max: int, tau: float):
    """The model's generation config plus the MTP decoding defaults as extra attributes (saved to JSON as-is)."""
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id = stop_token_ids(model, tokenizer)
    gen.pad_token_id = tokenizer.pad_token_id
    record_decoding_defaults(gen, strategy=strategy, k_max=k_max, tau=tau)  # a tau typed for export is raw
    gen.mtp_mask_token_id = int(model.config.mtp_mask_token_id)
    return gen


def _check_options(strategy: str, k_max: int | None, tau: float, dtype: str) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if k_max is not None and k_max < 1:
        raise UserError(f"--k-max must be >= 1, got {k_max}")
    check_tau(tau, "--tau")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if k_max is not None:
        _check_decodable(strategy, k_max, tau)


def _check_decodable(strategy: str, k_max: int, tau: float) -> None:
    """The stored defaults must pass the rule `mtp generate` applies to them (adaptive.strategies.make_strategy), or
    every later flag-less `mtp generate` would fail about a flag the user never gave."""
    from adaptive.strategies import make_strategy

    try:
        make_strategy(strategy, k_max=int(k_max), tau=tau)
    except UserError as exc:
        raise UserError(f"--k-max {k_max} cannot be stored as a decoding default: {exc}") from None


CUSTOM_GENERATE_PY = '''"""MTP decoding for transformers' `generate(custom_generate=<this checkpoint>, trust_remote_code=True)`.

Written by `mtp export`. The decoder itself is `adaptive.hf_generate` of the mtp-selfdistill package
(requirements.txt): strategy kwargs mtp_strategy ("confadapt" | "static" | "selfspec"), mtp_tau, mtp_k_max, mtp_k.
"""

from adaptive.hf_generate import generate  # noqa: F401
'''


def _package_requirement() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mtp-selfdistill>={version('mtp-selfdistill')}\n"
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "mtp-selfdistill\n"


def write_custom_generate(directory) -> Path:
    """`custom_generate/generate.py` + `custom_generate/requirements.txt` in an exported checkpoint: the directory is
    then a `custom_generate` argument of `model.generate` (transformers runs it only with trust_remote_code=True)."""
    folder = Path(directory) / "custom_generate"
    folder.mkdir(exist_ok=True)
    (folder / "generate.py").write_text(CUSTOM_GENERATE_PY, encoding="utf-8")
    (folder / "requirements.txt").write_text(_package_requirement(), encoding="utf-8")
    return folder


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished tmp dir to `output`; an old output is moved aside first and removed only afterwards."""
    old = None
    if output.exists() and any(output.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=output.name + ".old-", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(tmp, output)  # an empty existing directory is replaced atomically
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sources(model_dir) -> list:
    """The directories an export reads: the model (or adapter) directory and an adapter's local base model."""
    path = Path(model_dir).expanduser()
    sources = [path]
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            base = None  # reported when the adapter is loaded
        if isinstance(base, str) and Path(base).expanduser().exists():
            sources.append(Path(base).expanduser())
    if str(model_dir) == DEFAULT_MODEL:
        from distill.models import cache_root

        sources.append(cache_root() / "models" / DEFAULT_MODEL)
    return sources


def export_model(model_dir: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: str = "float32",
                 k_max: int | None = None, tau: float = DEFAULT_TAU, strategy: str = "confadapt",
                 overwrite: bool = False, merge_adapter: bool = False) -> Path:
    """Export `model_dir` (checkpoint, alias or LoRA adapter dir) to a plain safetensors HF directory; return it.

    A mask-only adapter (distill/adapters.py) is kept unmerged in `<output>/mtp_adapter/`, beside the base weights with
    the trained <MTP> row: plain transformers then loads the base model itself, and this package's loaders attach
    the adapter. `merge_adapter` merges it into the weights instead (one set of weights for tools that cannot gate by
    token, e.g. a vLLM draft model; k=1 decoding of the merged weights is no longer the base model's)."""
    from peft import PeftModel

    _check_options(strategy, k_max, tau, dtype)
    output = check_replaceable_dir(output_dir, command="mtp export", flag="--output", overwrite=overwrite,
                                   sources=_sources(model_dir))

    model, tokenizer = load_for_export(str(model_dir), mask_adapter="merge" if merge_adapter else "split")
    adapter = model if isinstance(model, PeftModel) else None
    config = model.config
    if k_max is None:
        k_max = int(getattr(config, "mtp_k_max", None) or DEFAULT_K_MAX)
    _check_decodable(strategy, k_max, tau)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        if adapter is not None:  # the adapter first, then the base with the trained <MTP> row only
            adapter.save_pretrained(tmp / EXPORT_SUBDIR)
            write_marker(tmp / EXPORT_SUBDIR, int(config.mtp_mask_token_id))
            model = _without_lora(adapter)
        model.config.mtp_k_max = int(k_max)
        model.generation_config = mtp_generation_config(model, tokenizer, strategy=strategy, k_max=k_max, tau=tau)
        model.to(DTYPES[dtype])
        model.config.dtype = DTYPES[dtype]
        # vLLM's parallel drafting reads the mask id of the draft model's config.json (see the module docstring)
        model.config.pard_token = int(model.config.mtp_mask_token_id)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_custom_generate(tmp)
        mark_created(tmp, "mtp export")
        share_files(tmp)  # the export is meant to be shared: the user's umask, not the savers' 0600
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
