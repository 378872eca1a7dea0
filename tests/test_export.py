"""`mtp export`: the exported directory reloads with plain transformers and decodes exactly like the source model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from mtp_cli.main import main as mtp_main
from distill.errors import UserError
from distill.export import export_model
from distill.files import CREATED_MARKER
from distill.models import load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token


def _probe_ids(tokenizer, mask_id: int) -> torch.LongTensor:
    """A prompt followed by <MTP> masks: exercises the trained mask row as well as ordinary tokens."""
    ids = tokenizer("Natalia sold 48 clips in April.", add_special_tokens=False).input_ids
    return torch.tensor([ids + [mask_id] * 3])


def _greedy(model, ids: torch.LongTensor, n: int = 12) -> list[int]:
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))[0].tolist()


def _assert_same_model(reference, exported, tokenizer, mask_id: int) -> None:
    """Same logits on every vocabulary row and the same greedy continuation."""
    ids = _probe_ids(tokenizer, mask_id)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
        exp_logits = exported(input_ids=ids).logits
    torch.testing.assert_close(exp_logits, ref_logits, rtol=0, atol=1e-5)
    assert _greedy(exported, ids) == _greedy(reference, ids)


@pytest.fixture(scope="module")
def base_without_mtp(smollm2_dir, tmp_path_factory) -> str:
    """A tiny random Llama with the original SmolLM2 vocabulary (no <MTP>), like a pretrained base."""
    plain = load_tokenizer(smollm2_dir)
    assert MTP_TOKEN not in plain.get_vocab()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(plain), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      eos_token_id=plain.eos_token_id, pad_token_id=plain.pad_token_id, bos_token_id=plain.bos_token_id)
    out = tmp_path_factory.mktemp("base-no-mtp")
    LlamaForCausalLM(cfg).save_pretrained(out)
    plain.save_pretrained(out)
    return str(out)


def test_full_checkpoint_round_trip(tiny_model_dir, tmp_path):
    out = export_model(tiny_model_dir, tmp_path / "exported", k_max=8, tau=0.8, strategy="confadapt")
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")) == []
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name != "exported"]  # no tmp dir left behind
    assert out.stat().st_mode & 0o777 == 0o755  # not the 0700 of a private temporary directory

    exported = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no remote code
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = load_model(tiny_model_dir)
    mask_id = reference.config.mtp_mask_token_id
    assert tokenizer.convert_tokens_to_ids(MTP_TOKEN) == mask_id
    assert exported.config.mtp_mask_token_id == mask_id and exported.config.mtp_k_max == 8
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["mtp_strategy"] == "confadapt" and gen["mtp_k_max"] == 8 and gen["mtp_tau"] == 0.8
    assert gen["mtp_mask_token_id"] == mask_id and tokenizer.eos_token_id in gen["eos_token_id"]
    assert exported.generation_config.mtp_tau == 0.8  # custom attributes survive the reload
    _assert_same_model(reference, exported, tokenizer, mask_id)


@pytest.mark.parametrize("save_embedding_layers", [False, True])
def test_lora_adapter_round_trip(base_without_mtp, tmp_path, save_embedding_layers):
    """Emulate a LoRA run: base + <MTP> (trainable row on both matrices) + LoRA, perturbed as if trained.

    Without saved embedding layers the base must be rebuilt with the same vocabulary (add_mtp_token) and the trained
    <MTP> rows come from the trainable-token values; with them, the full matrices come from the adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    tokenizer = load_tokenizer(base_without_mtp)
    base = load_model(base_without_mtp)
    mask_id = add_mtp_token(base, tokenizer)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     trainable_token_indices={"embed_tokens": [mask_id], "lm_head": [mask_id]})
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=save_embedding_layers)
    tokenizer.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == base_without_mtp

    out = export_model(adapter_dir, tmp_path / "merged", dtype="float32")
    assert not (out / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(out)
    exp_tok = AutoTokenizer.from_pretrained(out)
    assert exported.config.mtp_mask_token_id == mask_id and exp_tok.convert_tokens_to_ids(MTP_TOKEN) == mask_id
    assert not any("lora" in k for k in exported.state_dict())
    peft_model.eval()
    # Every row matches, the padding rows of the resized matrix included: add_mtp_token seeds them, so the base
    # rebuilt at export time equals the one the adapter was trained on.
    _assert_same_model(peft_model, exported, exp_tok, mask_id)
    # The trained mask row really came from the adapter (not the base's freshly initialised one).
    fresh = load_model(base_without_mtp)
    add_mtp_token(fresh, load_tokenizer(base_without_mtp))
    assert not torch.equal(exported.get_input_embeddings().weight[mask_id], fresh.get_input_embeddings().weight[mask_id])
    assert isinstance(peft_model, PeftModel)

    # The decoding commands load the adapter directory itself the same way (merged onto the rebuilt base).
    from adaptive.loading import load_mtp_model

    direct, direct_tok = load_mtp_model(str(adapter_dir))
    assert direct.config.mtp_mask_token_id == mask_id
    _assert_same_model(peft_model, direct, direct_tok, mask_id)


def test_untrained_base_gets_mtp_token(base_without_mtp, tmp_path, capsys):
    out = export_model(base_without_mtp, tmp_path / "converted", dtype="bfloat16", strategy="selfspec")
    assert "untrained conversion" in capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert exported.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    assert exported.config.mtp_mask_token_id == tok.convert_tokens_to_ids(MTP_TOKEN)
    assert exported.generation_config.mtp_strategy == "selfspec"


def test_export_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not created by `mtp export`"):
        export_model(tiny_model_dir, out)
    for flags in ([], ["--overwrite"]):  # a directory the export did not create is never replaced
        rc = mtp_main(["export", "--model", tiny_model_dir, "--output", str(out), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1 and "not created by" in err
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    earlier = tmp_path / "earlier"
    assert mtp_main(["export", "--model", tiny_model_dir, "--output", str(earlier)]) == 0
    assert (earlier / CREATED_MARKER).is_file()
    rc = mtp_main(["export", "--model", tiny_model_dir, "--output", str(earlier)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    (earlier / "stale.txt").write_text("from the earlier export")
    assert mtp_main(["export", "--model", tiny_model_dir, "--output", str(earlier), "--overwrite"]) == 0
    assert not (earlier / "stale.txt").exists() and (earlier / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out"]  # the old copy was cleaned up


@pytest.mark.parametrize("argv, message", [
    (["--tau", "1.5"], "--tau"),
    (["--k-max", "0"], "--k-max"),
    (["--strategy", "beam"], "strategy"),
])
def test_export_bad_options(tiny_model_dir, tmp_path, capsys, argv, message):
    rc = mtp_main(["export", "--model", tiny_model_dir, "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# vLLM (main at commit 00c4f22d, vllm/v1/spec_decode/llm_base_proposer.py `_init_parallel_drafting_params`): the id a
# parallel-drafting draft model puts in its extra query slots, read from the draft's config as transformers loaded it
# (vLLM's ModelConfig holds the draft's config.json as a transformers PretrainedConfig, `hf_config`). vLLM itself needs
# CUDA and is not a dependency, so this is the lookup re-implemented, in vLLM's order.
def _vllm_parallel_drafting_token_id(hf_config) -> int:
    dflash_config = getattr(hf_config, "dflash_config", None)
    if dflash_config and "mask_token_id" in dflash_config:
        return dflash_config["mask_token_id"]
    if getattr(hf_config, "mask_token_id", None) is not None:
        return hf_config.mask_token_id
    for name in ("dspark_noise_token_id", "pard_token", "ptd_token_id"):
        if hasattr(hf_config, name):
            return getattr(hf_config, name)
    raise ValueError("For parallel drafting, the draft model config must have `dflash_config.mask_token_id`, "
                     "`mask_token_id`, `dspark_noise_token_id`, `pard_token`, or `ptd_token_id`")


# vllm/config/speculative.py (commit 002e77c1): the SpeculativeConfig fields launch/vllm_serve.sh sets, and the
# values of `method` (the SpeculativeMethod literal) that run a separate draft checkpoint.
VLLM_SPECULATIVE_FIELDS = {"method", "model", "parallel_drafting", "num_speculative_tokens"}


def test_export_serves_custom_generate_and_vllm(tiny_model_dir, base_without_mtp, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoConfig

    out = export_model(tiny_model_dir, tmp_path / "exported", k_max=4)
    source = (out / "custom_generate" / "generate.py").read_text()
    assert "from adaptive.hf_generate import generate" in source
    assert (out / "custom_generate" / "requirements.txt").read_text().startswith("mtp-selfdistill")
    config = json.loads((out / "config.json").read_text())
    assert config["pard_token"] == config["mtp_mask_token_id"]
    assert "n_predict" not in config and "mask_token_id" not in config  # nothing vLLM would read before pard_token

    # plain transformers, remote code off: the custom generate is not picked up, greedy decoding works
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert getattr(model.generate, "__func__", None) is type(model).generate
    ids = torch.tensor([[5, 6, 7, 8]])
    assert _greedy(model, ids, 4)[:4] == [5, 6, 7, 8]

    assert _vllm_parallel_drafting_token_id(AutoConfig.from_pretrained(out)) == config["mtp_mask_token_id"]
    plain = AutoConfig.from_pretrained(base_without_mtp)  # a checkpoint that was never exported has no such key
    with pytest.raises(ValueError, match="parallel drafting"):
        _vllm_parallel_drafting_token_id(plain)

    script = Path(__file__).resolve().parents[1] / "launch" / "vllm_serve.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(script), "--print-config", str(out), "3"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    spec = json.loads(run.stdout)
    assert set(spec) == VLLM_SPECULATIVE_FIELDS
    assert spec == {"method": "draft_model", "model": str(out), "parallel_drafting": True,
                    "num_speculative_tokens": 3}
    bad = subprocess.run(["bash", str(script), "--print-config", base_without_mtp], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "pard_token" in bad.stderr
