"""`mtp demo`: refuses foreign directories and bad flags before any work; the CI-sized run writes every artefact."""

import json

import pytest

from mtp_cli.main import main as mtp_main


def test_demo_never_touches_a_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert mtp_main(["demo", "--output-dir", str(foreign), "--minutes", "3"]) == 2
    assert "not created by `mtp demo`" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0.5"], "--minutes must be in [1, 1440]"),
    (["--target-agreement", "1.5"], "--target-agreement must be in (0, 1]"),
    (["--target-agreement", "0"], "--target-agreement must be in (0, 1]"),
    (["--target-drop", "0.1"], "unrecognized arguments"),
    (["--delta", "0"], "--delta must be in (0, 1)"),
    (["--steps", "3"], "unrecognized arguments"),
])
def test_demo_bad_flags_fail_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "d"
    assert mtp_main(["demo", "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_plan_scales_with_the_budget():
    from adaptive.demo import Plan

    small, full = Plan.for_minutes(3), Plan.for_minutes(20)
    assert small.train_seconds < full.train_seconds and small.held_out < full.held_out
    assert full.train_seconds == pytest.approx(0.4 * 20 * 60)
    assert set(full.taus) <= {0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.87, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6}
    # the default run's tuning set can certify agreement 0.95 at the demo's delta (0.10) over its k_max values
    from adaptive.ltt import min_certifiable_n

    assert full.n_tune >= min_certifiable_n(1 - 0.95, 0.10 / len(full.k_maxes))


@pytest.mark.slow
def test_demo_three_minutes_writes_every_artefact(smollm2_dir, gsm8k_path, tmp_path, capsys):
    out = tmp_path / "demo"
    assert mtp_main(["demo", "--minutes", "3", "--output-dir", str(out), "--dataset", str(gsm8k_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("training.png", "reliability.png", "tune/pareto.png", "tune/report.json", "chunks.html", "report.json",
                 "model/config.json", "model/mtp_calibration.json", "model/generation_config.json"):
        assert (out / name).is_file(), name
    for png in ("training.png", "reliability.png", "tune/pareto.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    labels = [row["label"] for row in report["evaluation"]]
    assert labels[0] == "k=1 (next-token)" and "static(k=3)" in labels
    assert any(label.startswith("selfspec") for label in labels)
    rows = {row["label"]: row for row in report["evaluation"]}
    # the lossless mode gives k=1's answers exactly
    assert rows[next(label for label in labels if label.startswith("selfspec"))]["agreement"] == 1.0
    assert report["rows"]["evaluate"] == len(report["evaluation"][0]["correct"])
    # mask-only adapters: the distilled model's k=1 is the base model's, token for token
    base_k1 = report["base_model_k1"]
    assert base_k1["token_identical"] == base_k1["n"] == report["rows"]["evaluate"]
    assert (out / "model" / "mtp_adapter" / "mtp_adapter.json").is_file()
    assert "accuracy" in printed and "tok/fwd" in printed
    gen = json.loads((out / "model" / "generation_config.json").read_text())
    assert gen["mtp_strategy"] in ("confadapt", "static", "selfspec")
    tuning = json.loads((out / "tune" / "report.json").read_text())
    assert tuning["objective"] == "agreement" and tuning["target"] == 0.95 and tuning["labelled"] is False
    choice = tuning["choice"]
    if choice["strategy"] == "confadapt":  # never slower than k=1 in the tuner's own measurement
        chosen = next(s for s in tuning["settings"] if (s["tau"], s["k_max"]) == (choice["tau"], choice["k_max"]))
        assert chosen["tokens_per_second"] >= chosen["reference_tokens_per_second"]
    elif choice["strategy"] == "selfspec":  # lossless, and measured faster than k=1
        assert gen["mtp_k_max"] == choice["k_max"] and tuning["lossless"]["speedup_vs_k1"] > 1
    else:
        assert (gen["mtp_strategy"], gen["mtp_k_max"]) == ("static", 1)


@pytest.mark.parametrize("choice, labels, shown", [
    ({"strategy": "confadapt", "tau": 0.9, "k_max": 4},
     ["k=1 (next-token)", "static(k=3)", "confadapt tau=0.9 calibrated k=4 (tuned)",
      "confadapt tau=0.9 calibrated k=auto:4", "selfspec(k_max=auto:4)"], "confadapt(tau=0.9,k_max=4,calibrated)"),
    ({"strategy": "static", "tau": None, "k_max": None},
     ["k=1 (next-token)", "static(k=3)", "confadapt tau=0.99 calibrated k=auto:4", "selfspec(k_max=auto:4)"],
     "confadapt(tau=0.99,k_max=auto:4,calibrated)"),
    ({"strategy": "selfspec", "tau": None, "k_max": "auto:4"},
     ["k=1 (next-token)", "static(k=3)", "confadapt tau=0.99 calibrated k=auto:4", "selfspec(k_max=auto:4) (tuned)"],
     "selfspec(k_max=auto:4)"),
])
def test_evaluate_runs_a_fixed_k_max_only_when_the_tuner_chose_it(monkeypatch, choice, labels, shown):
    """The table holds the modes the product would run: a fixed-k_max ConfAdapt the tuner measured slower than k=1
    (and so did not choose) is not evaluated again; ConfAdapt then runs under the span controller."""
    from adaptive import demo
    from adaptive.evaluate import EvalReport

    ran = []

    def fake_side_by_side(runs, problems, **kwargs):
        ran.extend((decoder, strategy.label) for decoder, strategy in runs)
        return [EvalReport(label=strategy.label, n=1, accuracy=0.0, stderr=float("nan"), agreement=1.0,
                           tokens_per_forward_mean=1.0, tokens_per_forward_std=0.0, tokens=1, forwards=1, seconds=1.0,
                           tokens_per_second=1.0, answers=["1"], correct=[False], results=[]) for _, strategy in runs]

    monkeypatch.setattr("adaptive.evaluate.run_side_by_side", fake_side_by_side)
    monkeypatch.setattr(demo, "_base_decoder", lambda: "base")
    plan = demo.Plan.for_minutes(20)
    calibrator = lambda logits: logits.softmax(-1).amax(-1)  # noqa: E731  (any callable scorer)
    tuning = {"choice": choice, "lossless": {"k_max": "auto:4"} if choice["strategy"] == "selfspec" else None}
    result = demo.evaluate("distilled", [{"question": "q", "answer": "1"}], plan, (4,), calibrator, tuning)
    assert [row["label"] for row in result.rows] == labels + ["base model k=1 (undistilled)"]
    assert [decoder for decoder, _ in ran] == ["distilled"] * len(labels) + ["base"]
    assert result.shown_label == shown and ran[result.shown][1] == shown
