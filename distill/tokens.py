"""Add the single `<MTP>` mask token (paper §1.1).

No new heads: multi-token prediction comes from the input format alone, so the only change to the model is one new
vocabulary entry. Its input embedding (and the output row, if the LM head is untied) is initialised from the mean and
covariance of the existing rows, as the paper states ("according to the mean and variance of the existing pretrained
embeddings"). If the embedding matrix already has a free padded row beyond the tokenizer (Qwen pads to a multiple of
128), that row is reused, but it is still initialised explicitly: a padded row holds arbitrary values (§6.3 item 5).

The id is recorded as `config.mtp_mask_token_id` so decoders and exported checkpoints find it without this package.
Calling `add_mtp_token` twice is a no-op the second time.
"""

from __future__ import annotations

import torch

from distill.errors import UserError

MTP_TOKEN = "<MTP>"
# Resized matrices are padded to a multiple of this (tensor-core friendly); 64 keeps small models small.
PAD_TO_MULTIPLE_OF = 64


def get_mtp_token_id(model_or_config) -> int:
    """The `<MTP>` id recorded in a model's config; a clear error if the model was never converted."""
    config = getattr(model_or_config, "config", model_or_config)
    token_id = getattr(config, "mtp_mask_token_id", None)
    if token_id is None:
        raise UserError("model has no <MTP> token (config.mtp_mask_token_id is unset); convert it with `mtp train` first")
    return int(token_id)


@torch.no_grad()
def _init_rows_from_stats(weight: torch.Tensor, old_rows: int, rows: list[int], generator: torch.Generator) -> None:
    """Fill `rows` with samples of N(mean, 1e-5 * cov) of the first `old_rows` rows (HF's mean_resizing scales cov
    down too: the new token must look like an average token, not like a random direction)."""
    existing = weight[:old_rows].float()
    mean = existing.mean(0)
    centered = existing - mean
    cov = centered.T @ centered / max(old_rows - 1, 1)
    # Cholesky of a scaled covariance with jitter; fall back to a diagonal if it is not positive definite.
    scaled = 1e-5 * cov + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype)
    try:
        chol = torch.linalg.cholesky(scaled)
    except RuntimeError:
        chol = torch.diag(scaled.diagonal().clamp_min(0).sqrt())
    for row in rows:
        noise = torch.randn(mean.shape[0], generator=generator, dtype=mean.dtype)
        weight[row] = (mean + chol @ noise).to(weight.dtype)


def add_mtp_token(model, tokenizer, seed: int = 0) -> int:
    """Add `<MTP>` to `tokenizer` and `model`; return its id. Idempotent."""
    config = model.config
    existing = tokenizer.convert_tokens_to_ids(MTP_TOKEN) if MTP_TOKEN in tokenizer.get_vocab() else None
    if existing is not None and getattr(config, "mtp_mask_token_id", None) == existing:
        if model.get_input_embeddings().weight.shape[0] <= existing:
            raise UserError(f"<MTP> id {existing} is outside the model's embedding matrix; vocab mismatch")
        return existing

    if existing is None:
        tokenizer.add_special_tokens({"additional_special_tokens": [MTP_TOKEN]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(MTP_TOKEN)
    embed = model.get_input_embeddings()
    old_rows = embed.weight.shape[0]
    # Statistics come from the real tokens only: rows past len(tokenizer) - 1 are padding with arbitrary values.
    real_rows = min(old_rows, token_id)
    if token_id >= old_rows:  # no free padded row: grow the matrix (mean_resizing off, we initialise ourselves)
        model.resize_token_embeddings(token_id + 1, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=False)
        embed = model.get_input_embeddings()
    # The padding rows a resize adds are never inputs, but with a tied head they are output logits: give them the
    # same seeded initialisation so every load of the same checkpoint produces the same model.
    new_rows = [token_id] + [r for r in range(old_rows, embed.weight.shape[0]) if r != token_id]
    generator = torch.Generator().manual_seed(seed)
    _init_rows_from_stats(embed.weight.data, real_rows, new_rows, generator)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embed.weight.data_ptr():
        _init_rows_from_stats(head.weight.data, real_rows, new_rows, generator)

    config.mtp_mask_token_id = token_id
    return token_id
