"""`mtp generate` end to end on the tiny model, and the chunk view it prints / writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from adaptive.chunkview import ANSI_BACKGROUNDS, chunk_pieces, render_terminal
from mtp_cli.main import main as mtp_main
from distill.export import export_model
from distill.models import load_model, load_tokenizer

RESULT_FIELDS = {"prompt", "text", "token_ids", "forward_passes", "accepted_per_step", "tokens_per_forward",
                 "prefill_seconds", "decode_seconds", "finish_reason"}


def _run(capsys, *argv):
    rc = mtp_main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _hf_greedy(model_dir: str, prompt: str, n: int, chat: bool = True) -> list[int]:
    """Independent reference: plain HF greedy decoding, cut after the first EOS."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    x = torch.tensor([list(ids)])
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=[tok.eos_token_id],
                           pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)[0, x.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def test_json_fields_and_static1_equals_hf_greedy(tiny_model_dir, capsys):
    rc, out, err = _run(capsys, "--model", tiny_model_dir, "--prompt", "What is 2+2?", "--prompt", "Say hi.",
                        "--strategy", "static", "--k", "1", "--max-new-tokens", "10", "--json")
    assert rc == 0, err
    rows = _json_lines(out)
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Say hi."]
    for r in rows:
        assert RESULT_FIELDS <= set(r)
        assert r["forward_passes"] == len(r["accepted_per_step"]) and r["accepted_per_step"] == [1] * len(r["token_ids"])
        assert r["tokens_per_forward"] == pytest.approx(len(r["token_ids"]) / r["forward_passes"])
        assert r["finish_reason"] in ("stop", "length") and r["strategy"] == "static(k=1)"
        # Static(1) reads only the next-token logit: exactly greedy decoding of the chat-templated prompt.
        assert r["token_ids"] == _hf_greedy(tiny_model_dir, r["prompt"], 10)


def test_no_chat_template_and_confadapt(tiny_model_dir, capsys):
    rc, out, _ = _run(capsys, "--model", tiny_model_dir, "--prompt", "Once upon a time", "--no-chat-template",
                      "--strategy", "static", "--k", "1", "--max-new-tokens", "6", "--json")
    assert rc == 0 and _json_lines(out)[0]["token_ids"] == _hf_greedy(tiny_model_dir, "Once upon a time", 6, chat=False)
    # tau = 1e-9 accepts every position: ConfAdapt degenerates to Static(k_max).
    rc, out, _ = _run(capsys, "--model", tiny_model_dir, "--prompt", "Once upon a time", "--strategy", "confadapt",
                      "--tau", "1e-9", "--k-max", "4", "--max-new-tokens", "10", "--json")
    r = _json_lines(out)[0]
    assert rc == 0 and r["accepted_per_step"] == [4, 4, 2] and len(r["token_ids"]) == 10
    assert r["finish_reason"] == "length" and r["strategy"] == "confadapt(tau=1e-09,k_max=4,raw)"


def test_batch_file_order_and_html(tiny_model_dir, tmp_path, capsys):
    prompts = ["first <b>bold</b> & co", "second", "third question?"]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n\n")
    html_path = tmp_path / "view" / "chunks.html"
    rc, out, _ = _run(capsys, "--model", tiny_model_dir, "--batch-file", str(batch), "--batch-size", "2",
                      "--strategy", "static", "--k", "3", "--max-new-tokens", "8", "--json", "--html", str(html_path))
    assert rc == 0
    rows = _json_lines(out)
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["accepted_per_step"] == [3, 3, 2] for r in rows)

    page = html_path.read_text()
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["chunks.html"]  # written atomically, no tmp left
    assert html_path.stat().st_mode & 0o777 == 0o644
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page  # self-contained
    assert "first &lt;b&gt;bold&lt;/b&gt; &amp; co" in page and "<b>bold</b>" not in page  # prompt text escaped
    spans = re.findall(r'<span class="chunk c(\d)" title="forward (\d+): (\d+) tokens?[^"]*">.*?<sup>(\d+)</sup></span>',
                       page, flags=re.S)
    assert [int(s[3]) for s in spans] == [n for r in rows for n in r["accepted_per_step"]]
    assert all(s[2] == s[3] for s in spans)  # tooltip and superscript agree
    assert [s[0] for s in spans[:3]] == ["0", "1", "0"]  # alternating colours
    assert "mean 2.67 tokens/forward" in page  # 24 tokens / 9 forward passes


def test_terminal_view_without_tty(tiny_model_dir, capsys):
    rc, out, _ = _run(capsys, "--model", tiny_model_dir, "--prompt", "hello", "--strategy", "static", "--k", "2",
                      "--max-new-tokens", "5", "--no-chat-template")
    lines = out.splitlines()
    assert rc == 0 and "\033[" not in out  # captured stdout is not a TTY: brackets, no colour codes
    assert lines[0].startswith("[") and lines[0].endswith("]") and lines[0].count("][") >= 2
    assert re.match(r"5 tokens, 3 forwards, 1\.67 tokens/forward, [\d.]+ tok/s, finish=length \[static\(k=2\)\]",
                    lines[-1])


def _fake_result(token_ids, accepted):
    return SimpleNamespace(token_ids=token_ids, accepted_per_step=accepted, prompt="p", forward_passes=len(accepted),
                           tokens_per_forward=len(token_ids) / len(accepted), prefill_seconds=0.1,
                           decode_seconds=0.1, finish_reason="stop")


def test_chunk_pieces_split_multibyte_and_stop(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    text = "Price: 5€ 🙂 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert len(ids) >= 6
    # One token per chunk: multi-byte characters are split across chunks, yet every piece is valid text.
    pieces = chunk_pieces(_fake_result(ids + [eos], [1] * (len(ids) + 1)), tok, stop_token_ids=[eos])
    assert "".join(p for p, _, _ in pieces) == text
    assert not any("\ufffd" in p for p, _, _ in pieces)
    assert pieces[-1] == ("", 1, True)  # the stop token's chunk: no raw <|im_end|> text, marked as a stop
    # Chunks of 2 and 3 tokens, the last cut short by the stop token.
    res = _fake_result(ids[:4] + [eos], [2, 3])
    plain = render_terminal(res, tok, color=False, stop_token_ids=[eos])
    assert plain == f"[{tok.decode(ids[:2])}][{tok.decode(ids[:4])[len(tok.decode(ids[:2])):]}⏎]"
    coloured = render_terminal(res, tok, color=True, stop_token_ids=[eos])
    assert coloured.index(ANSI_BACKGROUNDS[0]) < coloured.index(ANSI_BACKGROUNDS[1])


def test_defaults_from_exported_generation_config(tiny_model_dir, tmp_path, capsys):
    out_dir = export_model(tiny_model_dir, tmp_path / "exp", strategy="static", k_max=3)
    rc, out, _ = _run(capsys, "--model", str(out_dir), "--prompt", "hi", "--max-new-tokens", "7", "--json")
    r = _json_lines(out)[0]
    assert rc == 0 and r["strategy"] == "static(k=3)" and r["accepted_per_step"] == [3, 3, 1]


def test_model_without_mtp_is_an_error_unless_converted_on_the_fly(smollm2_dir, tmp_path, capsys):
    tok = load_tokenizer(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # the save's progress bars
    rc, out, err = _run(capsys, "--model", str(tmp_path / "base"), "--prompt", "hi", "--max-new-tokens", "3")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "is not an MTP model" in err and "mtp train" in err and "--add-mtp-token" in err

    rc, out, err = _run(capsys, "--model", str(tmp_path / "base"), "--prompt", "hi", "--max-new-tokens", "3", "--json",
                        "--add-mtp-token")
    assert rc == 0 and len(_json_lines(out)) == 1
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "untrained conversion" in warnings[0]
    assert json.loads((tmp_path / "base" / "config.json").read_text()).get("mtp_mask_token_id") is None  # input untouched


@pytest.mark.parametrize("extra, message", [
    ([], "no prompt given"),
    (["--batch-file", "MISSING"], "does not exist"),
    (["--batch-file", "BAD"], "bad.jsonl:2:"),
    (["--batch-file", "NOFIELD"], 'nofield.jsonl:1: expected an object with a string "prompt"'),
    (["--prompt", "x", "--tau", "1.5", "--strategy", "confadapt"], "tau must be in (0, 1]"),
    (["--prompt", "x", "--tau", "abc"], "--tau"),
    (["--prompt", "x", "--strategy", "static", "--k", "0"], "k must be an integer"),
    (["--prompt", "x", "--strategy", "static"], "needs --k"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x", "--strategy", "beam"], "invalid choice"),
    (["--prompt", "x", "--tau", "0.5", "--calibrated"], "--calibrated: "),
    (["--prompt", "x", "--calibrated", "--no-calibration"], "not allowed with"),
])
def test_bad_input_is_one_error_line(tiny_model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "no prompt key"}\n')
    subst = {"MISSING": str(tmp_path / "missing.jsonl"), "BAD": str(tmp_path / "bad.jsonl"),
             "NOFIELD": str(tmp_path / "nofield.jsonl")}
    html_path = tmp_path / "out.html"
    rc, out, err = _run(capsys, "--model", tiny_model_dir, "--html", str(html_path), *[subst.get(a, a) for a in extra])
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not html_path.exists()


def test_exit_code_from_the_console_script(tmp_path):
    """The real process: exit status 2 and a single stderr line for bad input."""
    proc = subprocess.run([sys.executable, "-m", "mtp_cli", "generate", "--batch-file", str(tmp_path / "nope.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: batch file {tmp_path / 'nope.jsonl'} does not exist"]


def test_confadapt_uses_the_saved_calibrator(tiny_model_dir, tmp_path, capsys):
    """With --calibrated a typed tau thresholds the calibrator beside the model; without it (or with --no-calibration)
    a typed tau is the raw top-1 probability; the model's recorded tau keeps its recorded scale."""
    import shutil

    from adaptive.calibration import Calibrator

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    flat = {"temperature": 16.0, "n": 0, "source": "position"}  # calibrated confidence far below the raw one
    Calibrator("temperature", {2: flat}, pooled=flat, k_max=2, n_samples=0, n_prompts=0).save(model_dir)
    argv = ["--model", str(model_dir), "--prompt", "hi", "--strategy", "confadapt", "--tau", "4e-5", "--k-max", "4",
            "--max-new-tokens", "16", "--json"]
    rc, out, _ = _run(capsys, *argv, "--calibrated")
    calibrated = _json_lines(out)[0]
    rc_raw, out_raw, _ = _run(capsys, *argv, "--no-calibration")
    raw = _json_lines(out_raw)[0]
    rc_typed, out_typed, _ = _run(capsys, *argv)
    assert rc == rc_raw == rc_typed == 0
    assert _json_lines(out_typed)[0]["strategy"] == raw["strategy"]  # a typed tau is raw unless --calibrated
    assert calibrated["strategy"] == "confadapt(tau=4e-05,k_max=4,calibrated)"
    assert raw["strategy"] == "confadapt(tau=4e-05,k_max=4,raw)"
    assert max(raw["accepted_per_step"]) > 1  # the random model's raw top-1 probability (~1/V) passes tau sometimes ...
    assert max(calibrated["accepted_per_step"]) == 1  # ... the flattened one (T = 16) never does past position 1
    from adaptive.tuner import write_decoding_defaults

    write_decoding_defaults(model_dir, "confadapt", 4, 4e-5, tau_scale="calibrated")  # as `mtp tune` records it
    rc, out, _ = _run(capsys, "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--json")
    assert rc == 0 and _json_lines(out)[0]["strategy"] == "confadapt(tau=4e-05,k_max=4,calibrated)"
    (model_dir / "mtp_calibration.json").unlink()  # the recorded scale without its calibrator: one clear error
    rc, _, err = _run(capsys, "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4")
    assert rc == 2 and "calibrated scale" in err and err.count("error:") == 1
