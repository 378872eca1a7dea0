import copy

import torch

from distill.models import load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token, get_mtp_token_id


def test_add_mtp_token_resizes_and_initialises_from_stats(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir)
    n_before = model.get_input_embeddings().weight.shape[0]
    token_id = add_mtp_token(model, tok)
    assert token_id == len(tok) - 1 == n_before  # SmolLM2 has no free padded row: one new id, matrix grown
    assert tok.convert_tokens_to_ids(MTP_TOKEN) == token_id
    assert get_mtp_token_id(model) == token_id
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] % 64 == 0 and weight.shape[0] > token_id
    mean = weight[:token_id].mean(0)
    spread = weight[:token_id].std(0).mean()
    row = weight[token_id]
    assert torch.isfinite(row).all()
    assert (row - mean).norm() < 0.1 * spread * weight.shape[1] ** 0.5  # close to the mean of real rows
    # Tied model: the head is the embedding, so it got the same row.
    assert torch.equal(model.get_output_embeddings().weight[token_id], row)
    # Tokenizer keeps the mask token whole.
    assert tok(f"a{MTP_TOKEN}{MTP_TOKEN}b", add_special_tokens=False).input_ids.count(token_id) == 2


def test_add_mtp_token_idempotent_and_reuses_padded_rows(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    token_id = get_mtp_token_id(model)
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_mtp_token(model, tok) == token_id  # second call: nothing changes
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert len(tok) == token_id + 1


def test_untied_head_row_initialised(tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tiny_model_dir)
    # A fresh untied model whose matrix already has free padded rows (vocab rounded up), like Qwen.
    cfg = LlamaConfig(vocab_size=len(tok) + 63, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tok) - 1 :] = 1e3  # garbage in the padded rows
        model.get_output_embeddings().weight[len(tok) - 1 :] = 1e3
    tok.add_special_tokens({"additional_special_tokens": []})
    rows_before = model.get_input_embeddings().weight.shape[0]
    token_id = add_mtp_token(model, tok)  # tokenizer already has <MTP>, config does not: re-initialise the row
    assert model.get_input_embeddings().weight.shape[0] == rows_before  # free row reused, no resize
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert w[token_id].abs().max() < 10


def test_add_mtp_token_is_deterministic_including_padding_rows(tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg)
    weights = []
    for _ in range(2):
        model = copy.deepcopy(base)
        torch.manual_seed(1234 + len(weights))  # resize must not depend on the global RNG
        add_mtp_token(model, tok)
        weights.append(model.get_input_embeddings().weight.detach().clone())
    assert weights[0].shape[0] > len(tok)  # padded to a multiple of 64: there are padding rows
    assert torch.equal(weights[0], weights[1])
