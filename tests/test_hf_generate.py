"""`model.generate(custom_generate=...)`: the exported directory (and the callable) decode exactly like `mtp generate`,
static k=1 and the self-speculative mode exactly like plain greedy `generate`, and bad input is one ValueError."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adaptive import hf_generate
from mtp_cli.main import main as mtp_main
from distill.export import export_model
from tests.conftest import BOOST, rigged_tiny_model

PROMPTS = ["Natalia sold 48 clips in April and half as many in May.", "Hi"]
NEW = 10
RIG_TAU = 4e-5  # about the median top-1 probability of the rigged model (tests/test_decoder.py): spans vary
STRATEGIES = [
    ("static", {"mtp_strategy": "static", "mtp_k": 3}, ["--strategy", "static", "--k", "3"]),
    ("confadapt", {"mtp_strategy": "confadapt", "mtp_tau": RIG_TAU, "mtp_k_max": 4},
     ["--strategy", "confadapt", "--tau", str(RIG_TAU), "--k-max", "4"]),
    ("selfspec", {"mtp_strategy": "selfspec", "mtp_k_max": 4}, ["--strategy", "selfspec", "--k-max", "4"]),
]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> str:
    """The rigged tiny model (drafts often right), exported: custom_generate/ and the MTP generation config."""
    model, tokenizer = rigged_tiny_model(tiny_model_dir)
    source = tmp_path_factory.mktemp("rigged")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    return str(export_model(source, tmp_path_factory.mktemp("export") / "out", k_max=4, tau=0.5))


@pytest.fixture(scope="module")
def loaded(exported):
    model = AutoModelForCausalLM.from_pretrained(exported).eval()  # plain transformers, no remote code
    tokenizer = AutoTokenizer.from_pretrained(exported, padding_side="left")
    return model, tokenizer


def _batch(tokenizer, prompts):
    return tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                         add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


def _generated(sequences: torch.Tensor, width: int, pad: int, lengths=None) -> list[list[int]]:
    """Each row's generated ids: after the input width, up to its own length (the rest must be padding)."""
    rows = []
    for b, row in enumerate(sequences[:, width:].tolist()):
        n = lengths[b] if lengths is not None else len(row)
        assert all(t == pad for t in row[n:])
        rows.append(row[:n])
    return rows


def _mtp_generate_ids(exported, prompts, flags, capsys) -> list[list[int]]:
    argv = ["generate", "--model", exported, "--max-new-tokens", str(NEW), "--json", *flags]
    for p in prompts:
        argv += ["--prompt", p]
    assert mtp_main(argv) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("name, kwargs, flags", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_equals_mtp_generate_batched_and_alone(loaded, exported, capsys, name, kwargs, flags):
    model, tokenizer = loaded
    expected = _mtp_generate_ids(exported, PROMPTS, flags, capsys)
    assert any(len(ids) == NEW for ids in expected)
    batch = _batch(tokenizer, PROMPTS)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt really is left-padded
    out = model.generate(**batch, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW,
                         return_dict_in_generate=True, **kwargs)
    assert isinstance(out, hf_generate.MTPGenerateOutput)
    lengths = [sum(steps) for steps in out.accepted_per_step]
    width = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :width], batch["input_ids"])
    assert _generated(out.sequences, width, model.generation_config.pad_token_id, lengths) == expected
    assert out.metrics["tokens"] == sum(lengths) and out.metrics["mean_acceptance_length"] >= 1.0
    if name == "confadapt":  # spans really vary (the self-speculative oracle lives in tests/test_decoder.py)
        assert out.metrics["mean_acceptance_length"] > 1.0
        assert len({n for steps in out.accepted_per_step for n in steps}) > 1
    for prompt, ids in zip(PROMPTS, expected):  # alone, through the callable (the module itself)
        alone = _batch(tokenizer, [prompt])
        one = model.generate(**alone, custom_generate=hf_generate, max_new_tokens=NEW,
                             return_dict_in_generate=True, **kwargs)
        assert one.sequences[0, alone["input_ids"].shape[1]:].tolist() == ids


@pytest.mark.parametrize("kwargs", [{"mtp_strategy": "static", "mtp_k": 1},
                                    {"mtp_strategy": "selfspec", "mtp_k_max": 4},
                                    {"mtp_strategy": "selfspec", "mtp_k_max": "auto:4"}])  # lossless whatever K
def test_k1_and_selfspec_equal_plain_greedy(loaded, exported, kwargs):
    model, tokenizer = loaded
    batch = _batch(tokenizer, PROMPTS)
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=NEW)
    ours = model.generate(**batch, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW, **kwargs)
    assert torch.equal(ours, greedy)
    assert (greedy[:, batch["input_ids"].shape[1]:] == BOOST).any()  # the rigged token shows up: drafts can hit


def test_stop_strings_and_eos(loaded, exported):
    """A stop string ends a row where plain greedy `generate` ends it; an EOS id given in the call too."""
    model, tokenizer = loaded
    batch = _batch(tokenizer, PROMPTS[:1])
    width = batch["input_ids"].shape[1]
    plain = model.generate(**batch, do_sample=False, max_new_tokens=NEW)[0, width:].tolist()
    stop = tokenizer.decode(plain[3:5])  # spans tokens in the middle of the greedy continuation
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tokenizer)
    ours = model.generate(**batch, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW,
                          stop_strings=[stop], tokenizer=tokenizer, mtp_strategy="selfspec", mtp_k_max=4)
    assert torch.equal(ours, greedy) and ours.shape[1] < width + NEW
    eos = plain[2]
    ours = model.generate(**batch, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW,
                          eos_token_id=eos, mtp_strategy="selfspec", mtp_k_max=4)
    assert ours[0, width:].tolist() == plain[: plain.index(eos) + 1]


def test_defaults_come_from_the_generation_config(loaded, exported, capsys):
    model, tokenizer = loaded
    assert model.generation_config.mtp_strategy == "confadapt" and model.generation_config.mtp_tau == 0.5
    expected = _mtp_generate_ids(exported, PROMPTS[:1], [], capsys)
    batch = _batch(tokenizer, PROMPTS[:1])
    seq = model.generate(**batch, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW)
    assert seq[0, batch["input_ids"].shape[1]:].tolist()[: len(expected[0])] == expected[0]


@pytest.fixture(scope="module")
def no_mtp_model(smollm2_dir):
    from distill.models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("kwargs, message", [
    ({"mtp_strategy": "beam"}, "unknown strategy"),
    ({"mtp_strategy": "confadapt", "mtp_tau": 1.5}, "tau"),
    ({"mtp_strategy": "confadapt", "mtp_tau": 0.0}, "tau"),
    ({"mtp_strategy": "selfspec", "mtp_k_max": 64, "max_new_tokens": 2000}, "context"),
    ({"mtp_strategy": "static"}, "mtp_k"),
    ({"do_sample": True}, "greedy"),
    ({"num_beams": 2}, "num_beams"),
    ({"repetition_penalty": 1.3}, "RepetitionPenalty"),
    ({"mtp_strategy": "confadapt", "mtp_tau": 0.9, "no_such_argument": 3}, "no_such_argument"),
])
def test_bad_input_is_one_value_error(loaded, exported, kwargs, message):
    model, tokenizer = loaded
    batch = _batch(tokenizer, PROMPTS)
    call = {"max_new_tokens": NEW, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        model.generate(**batch, custom_generate=exported, trust_remote_code=True, **call)
    assert "\n" not in str(info.value)
    if "no_such_argument" not in kwargs:  # the callable route checks the same values
        with pytest.raises(ValueError, match=message):
            model.generate(**batch, custom_generate=hf_generate.generate, **call)


def test_right_padding_and_models_without_mtp_are_refused(loaded, exported, no_mtp_model):
    model, tokenizer = loaded
    batch = _batch(tokenizer, PROMPTS)
    flipped = {k: v.flip(1) for k, v in batch.items()}  # pads on the right
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(**flipped, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW)
    plain, tok = no_mtp_model
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    with pytest.raises(ValueError, match="<MTP>"):
        plain.generate(ids, custom_generate=exported, trust_remote_code=True, max_new_tokens=NEW,
                       mtp_strategy="selfspec", mtp_k_max=4)
    with pytest.raises(ValueError, match="<MTP>"):  # the callable route too, whatever else is asked
        plain.generate(ids, custom_generate=hf_generate, max_new_tokens=NEW, mtp_strategy="confadapt", mtp_tau=0.9)


def test_directory_needs_trust_remote_code(loaded, exported):
    """transformers runs custom_generate/generate.py only when asked to: plain generate stays plain."""
    model, tokenizer = loaded
    batch = _batch(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(**batch, custom_generate=exported, max_new_tokens=NEW)


def test_loading_with_trust_remote_code_makes_mtp_the_generate(loaded, exported):
    """transformers' rule for a checkpoint holding custom_generate/: from_pretrained(..., trust_remote_code=True)
    replaces `generate` with it, so the strategy kwargs work without naming custom_generate."""
    model, tokenizer = loaded
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    batch = _batch(tokenizer, PROMPTS)
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=NEW)
    assert torch.equal(remote.generate(**batch, max_new_tokens=NEW, mtp_strategy="selfspec", mtp_k_max=4), greedy)
    with pytest.raises(ValueError, match="greedy"):
        remote.generate(**batch, max_new_tokens=NEW, do_sample=True)


@pytest.mark.slow
def test_default_model_equals_mtp_generate_and_greedy(smollm2_dir, tmp_path, capsys):
    """The default model (SmolLM2-135M-Instruct, an untrained <MTP> added at export): every strategy through the
    exported directory equals `mtp generate`; static k=1 and self-speculative equal plain greedy `generate`."""
    out = str(export_model(smollm2_dir, tmp_path / "smollm2", k_max=4, tau=0.5))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, padding_side="left")
    batch = _batch(tokenizer, PROMPTS)
    width = batch["input_ids"].shape[1]
    pad = model.generation_config.pad_token_id
    for name, kwargs, flags in STRATEGIES:
        expected = _mtp_generate_ids(out, PROMPTS, flags, capsys)
        got = model.generate(**batch, custom_generate=out, trust_remote_code=True, max_new_tokens=NEW,
                             return_dict_in_generate=True, **kwargs)
        lengths = [sum(steps) for steps in got.accepted_per_step]
        assert _generated(got.sequences, width, pad, lengths) == expected, name
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=NEW)
    for kwargs in ({"mtp_strategy": "static", "mtp_k": 1}, {"mtp_strategy": "selfspec", "mtp_k_max": 4}):
        assert torch.equal(model.generate(**batch, custom_generate=out, trust_remote_code=True, max_new_tokens=NEW,
                                          **kwargs), greedy)
