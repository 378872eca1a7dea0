"""`mtp bench-decode` on the tiny model: every mode at every concurrency, the sweep table and figure, bad input
(timings are reported, never asserted)."""

from __future__ import annotations

import json
import math

import pytest

from adaptive.bench import COLLAPSE_ANCHORS, format_sweep, format_table, held_out_questions
from mtp_cli.bench_decode import parse_concurrency, prompt_count
from mtp_cli.main import main as mtp_main
from distill.errors import UserError


def test_bench_decode_json(tiny_model_dir, gsm8k_path, capsys):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, "--dataset", str(gsm8k_path), "--prompts", "3",
                   "--max-new-tokens", "5", "--concurrency", "1,2", "--k-max", "4", "--tau", "0.5", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)  # the whole stdout is one JSON document
    assert doc["concurrency"] == [1, 2] and doc["prompts"] == 3
    modes = ["hf-greedy", "hf-prompt-lookup", "static(k=1)", "static(k=3)", "confadapt(tau=0.5,k_max=4,raw)",
             "selfspec(k_max=4)"]
    rows = doc["results"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [(b, m) for b in (1, 2) for m in modes]
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0 and math.isfinite(r["ratio_vs_hf_greedy"])
        assert r["ratio_vs_hf_greedy"] > 0 and r["tokens_per_forward"] >= 1.0
        assert r["tokens"] <= 3 * 5
    by = {(r["concurrency"], r["mode"]): r for r in rows}
    for b in (1, 2):
        assert by[(b, "hf-greedy")]["ratio_vs_hf_greedy"] == 1.0
        assert by[(b, "static(k=3)")]["tokens_per_forward"] > 1.0
        # Lossless modes reproduce greedy decoding on every prompt (fp32, tiny model).
        for mode in ("hf-prompt-lookup", "static(k=1)", "selfspec(k_max=4)"):
            assert by[(b, mode)]["lossless"] and by[(b, mode)]["equal_to_hf_greedy"] == "3/3"
        assert not by[(b, "confadapt(tau=0.5,k_max=4,raw)")]["lossless"]
    assert by[(2, "hf-prompt-lookup")]["note"].startswith("row-by-row") and by[(1, "hf-prompt-lookup")]["note"] == ""
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 2 and "row-by-row" in table


def test_bench_decode_k_max_list_with_auto(tiny_model_dir, gsm8k_path, capsys):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, "--dataset", str(gsm8k_path), "--prompts", "2",
                   "--max-new-tokens", "4", "--batch-sizes", "2", "--k-max", "4,auto:3", "--tau", "0.5", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["concurrency"] == [2]  # --batch-sizes is the older name of --concurrency
    modes = [r["mode"] for r in doc["results"]]
    assert modes == ["hf-greedy", "hf-prompt-lookup", "static(k=1)", "static(k=3)", "confadapt(tau=0.5,k_max=4,raw)",
                     "confadapt(tau=0.5,k_max=auto:3,raw)", "selfspec(k_max=4)", "selfspec(k_max=auto:3)"]
    by = {r["mode"]: r for r in doc["results"]}
    assert by["static(k=1)"]["ratio_vs_k1"] == 1.0 and by["selfspec(k_max=auto:3)"]["equal_to_hf_greedy"] == "2/2"
    acc = by["confadapt(tau=0.5,k_max=4,raw)"]["acceptance"]
    assert acc["mean_acceptance_length"] == pytest.approx(by["confadapt(tau=0.5,k_max=4,raw)"]["tokens_per_forward"])
    assert "acceptance" not in by["hf-greedy"]
    assert doc["k_max"] == [4, "auto:3"]


def test_held_out_questions_are_the_tail(gsm8k_path):
    lines = gsm8k_path.read_text().splitlines()
    assert held_out_questions(gsm8k_path, 2) == [json.loads(x)["question"] for x in lines[-2:]]


def test_bench_decode_concurrency_sweep_and_plot(tiny_model_dir, gsm8k_path, tmp_path, capsys):
    import matplotlib.image

    plot = tmp_path / "sweep.png"
    plot.write_bytes(b"an earlier figure")  # replaced once the sweep is done
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, "--dataset", str(gsm8k_path), "--concurrency", "2,1",
                   "--prompts", "2", "--max-new-tokens", "4", "--k-max", "3,auto:3", "--tau", "0.5",
                   "--no-prompt-lookup", "--repeats", "1", "--json", "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert doc["concurrency"] == [1, 2] and doc["prompt_lookup_num_tokens"] is None
    modes = ["hf-greedy", "static(k=1)", "static(k=3)", "confadapt(tau=0.5,k_max=3,raw)",
             "confadapt(tau=0.5,k_max=auto:3,raw)", "selfspec(k_max=3)", "selfspec(k_max=auto:3)"]
    rows = doc["results"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [(c, m) for c in (1, 2) for m in modes]
    for c in (1, 2):
        at_c = {r["mode"]: r for r in rows if r["concurrency"] == c}
        greedy, plain = at_c["hf-greedy"]["tokens_per_second"], at_c["static(k=1)"]["tokens_per_second"]
        for r in at_c.values():  # every ratio is taken against the same concurrency's references
            assert r["ratio_vs_hf_greedy"] == pytest.approx(r["tokens_per_second"] / greedy)
            assert r["ratio_vs_k1"] == pytest.approx(r["tokens_per_second"] / plain)
            assert r["tokens_per_forward"] >= 1.0 and 0 < r["tokens"] <= 2 * 4
        assert at_c["selfspec(k_max=auto:3)"]["equal_to_hf_greedy"] == "2/2"
    assert [(a["concurrency"], a["ratio"]) for a in doc["anchors"]] == [(16, 0.26), (16, 1.39)]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(plot).shape[:2]
    assert height > 300 and width > 500
    assert f"wrote {plot}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.png"]  # no temporary file left beside it


def test_sweep_table_has_every_mode_at_every_concurrency_and_the_anchors():
    rows = [{"concurrency": c, "mode": m, "ratio_vs_hf_greedy": r, "tokens_per_forward": t}
            for c, m, r, t in [(1, "hf-greedy", 1.0, 1.0), (1, "static(k=3)", 0.61, 3.0),
                               (4, "hf-greedy", 1.0, 1.0), (4, "static(k=3)", 0.72, 3.0)]]
    lines = format_sweep(rows).splitlines()
    assert lines[0].split()[-2:] == ["c=1", "c=4"]
    assert lines[3].split()[-4:] == ["0.61", "(3.00)", "0.72", "(3.00)"]
    anchor = next(line for line in lines if line.startswith(COLLAPSE_ANCHORS[0]["label"]))
    assert anchor.split()[-4:] == ["2.31", "(0.26", "at", "c=16)"]  # c=16 is not a column: given beside


def test_concurrency_plot_draws_every_mode(tmp_path):
    import matplotlib.colors
    import matplotlib.image

    from distill.plots import concurrency_plot

    rows = [{"concurrency": c, "mode": m, "ratio_vs_hf_greedy": r, "note": ""}
            for c in (1, 4, 16) for m, r in [("hf-greedy", 1.0), ("static(k=1)", 0.97), ("selfspec(k_max=4)", 0.8)]]
    path = concurrency_plot(rows, tmp_path / "c.png", anchors=COLLAPSE_ANCHORS)
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 500

    def pixels(color) -> int:
        return int((abs(image - matplotlib.colors.to_rgb(color)).max(axis=-1) < 0.02).sum())

    # one line per mode but hf-greedy (tab10 in order) and the gold star of the EAGLE-3 anchor; no third mode line
    assert pixels("tab:blue") > 50 and pixels("tab:orange") > 50 and pixels("gold") > 20
    assert pixels("tab:green") == 0
    with pytest.raises(UserError, match="at least one"):
        concurrency_plot([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_parse_concurrency_and_prompt_count():
    assert parse_concurrency("16, 1,4,16") == [1, 4, 16]
    assert prompt_count(None, [1, 16]) == 16 and prompt_count(None, [1, 4, 64]) == 64 and prompt_count(None, [2]) == 16
    assert prompt_count(3, [1, 2]) == 3
    with pytest.raises(UserError, match="--prompts 8 is below the largest --concurrency 16"):
        prompt_count(8, [1, 16])


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", ","], "--concurrency"),
    (["--concurrency", "1,-4"], "--concurrency"),
    (["--concurrency", "1,64", "--prompts", "16"], "--prompts 16 is below the largest --concurrency 64"),
    (["--prompts", "0"], "--prompts"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--plot", "/nonexistent/dir/sweep.png"], "not an existing directory"),
    (["--plot", "sweep.jpg"], ".png"),
    (["--plot", "/"], ".png"),
    (["--tau", "0"], "tau"),
    (["--dataset", "/nonexistent.jsonl"], "does not exist"),
    (["--k-max", "4,banana"], "k_max"),
])
def test_bench_decode_bad_input(tiny_model_dir, capsys, argv, message):
    rc = mtp_main(["bench-decode", "--model", tiny_model_dir, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:")


def test_held_out_questions_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "a"}\n{"answer": "b"}\n')
    with pytest.raises(UserError, match=r"q.jsonl:2:"):
        held_out_questions(bad, 1)


def test_repeats_interleave_the_modes_and_pair_each_ratio_within_its_round(tiny_model_dir, monkeypatch):
    """Round r runs the modes rotated by r; a round the machine slowed down (every mode 3x slower) moves no ratio,
    and each ratio is the median over rounds of the within-round ratio."""
    import adaptive.bench as bench
    from adaptive.loading import load_mtp_model

    model, tokenizer = load_mtp_model(tiny_model_dir)
    speed = {"hf-greedy": 10.0, "static(k=1)": 9.0, "static(k=3)": 18.0, "confadapt(tau=0.5,k_max=4,raw)": 7.0,
             "selfspec(k_max=4)": 12.0}  # tokens per second of an undisturbed round
    order, calls = [], {"n": 0}

    def timed(label, rows_in, new):
        if new == bench.WARMUP_TOKENS:
            return [[1] * new for _ in rows_in], 1.0
        order.append(label)
        round_ = calls["n"] // len(speed)
        calls["n"] += 1
        tokens = 10 * len(rows_in)
        return [[1] * 10 for _ in rows_in], tokens / speed[label] * (3.0 if round_ == 1 else 1.0)

    class Result:
        forward_passes = 5

    def fake_hf(model_, tokenizer_, rows_in, b, new, stops, lookup):
        rows, seconds = timed("hf-greedy", rows_in, new)
        return rows, seconds, len(rows) * new

    def fake_mtp(decoder, strategy, rows_in, b, new):
        rows, seconds = timed(strategy.label, rows_in, new)
        return rows, seconds, [Result() for _ in rows]

    monkeypatch.setattr(bench, "_run_hf", fake_hf)
    monkeypatch.setattr(bench, "_run_mtp", fake_mtp)
    monkeypatch.setattr("adaptive.metrics.acceptance_metrics", lambda *a, **k: {})
    results = bench.run_bench(model, tokenizer, ["q1", "q2"], concurrency=[2], max_new_tokens=10, k_max=4, tau=0.5,
                              prompt_lookup=False, repeats=3, progress=False)
    modes = list(speed)
    assert order == modes + modes[1:] + modes[:1] + modes[2:] + modes[:2]
    by = {r["mode"]: r for r in results}
    for mode, tps in speed.items():
        assert by[mode]["ratio_vs_k1"] == pytest.approx(tps / speed["static(k=1)"])
        assert by[mode]["ratio_vs_hf_greedy"] == pytest.approx(tps / speed["hf-greedy"])
        assert by[mode]["tokens_per_second"] == pytest.approx(tps) and by[mode]["repeats"] == 3
    with pytest.raises(UserError, match="repeats"):
        bench.run_bench(model, tokenizer, ["q1"], concurrency=[1], max_new_tokens=4, k_max=4, tau=0.5, repeats=0)
