"""The acceptance callback (distill/acceptance.py) and training.png (distill/plots.py) on the tiny random model.

A short run with `acceptance_eval_steps` must log tokens/forward, mean acceptance length and the agreements with the
starting model's k=1 into the log history, the console and an offline wandb run, and draw them in training.png; the
time budget must postpone a measurement that would exceed it.
"""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path

import pytest

from distill import acceptance
from distill import recipe as recipes
from mtp_cli import train as train_command
from distill.plots import training_plot

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("restore_environment")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB-log framing: 32 KiB blocks, 7-byte record headers;
    each record a wandb Record protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7  # the file starts with a 7-byte ":W&B" header
    assert data[:4] == b":W&B"
    records, chunk = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(chunk)
            chunk = b""
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) if i.nested_key else i.key: i.value_json for i in record.history.item})
    return rows


def test_acceptance_length_and_prefix_agreement():
    # vLLM: 1 + accepted drafts / steps; each row's last step (cut by the budget or a stop) is left out.
    assert acceptance.acceptance_length([[1, 3, 2, 1], [2, 2, 4]]) == pytest.approx(1 + (0 + 2 + 1 + 1 + 1) / 5)
    assert acceptance.acceptance_length([[1]]) == 1.0
    assert acceptance.prefix_agreement([5, 6, 7, 8], [5, 6, 9, 8]) == 0.5
    assert acceptance.prefix_agreement([5, 6], [5, 6, 7]) == 1.0
    assert acceptance.prefix_agreement([5, 6], [7]) == 0.0


def test_budget_postpones_a_measurement_that_would_exceed_it(monkeypatch):
    cb = acceptance.AcceptanceCallback(types.SimpleNamespace(), ["q"], "test", every=2, tau=0.9, k_max=4,
                                       max_new_tokens=4, budget=0.05, fmt="chat")
    cb.reference, cb.train_start = [[1]], 0.0
    calls = []
    monkeypatch.setattr(cb, "measure", lambda step: calls.append(step))
    monkeypatch.setattr(acceptance.time, "perf_counter", lambda: 100.0)  # 100 s of training so far
    cb.spent, cb.last_cost = 3.0, 1.5  # 3 + 1.5 <= 5% of 100 s: due
    control = types.SimpleNamespace(should_log=True)
    cb.on_step_end(None, types.SimpleNamespace(global_step=4), control)
    cb.on_step_end(None, types.SimpleNamespace(global_step=5), control)  # not a multiple of every
    cb.spent = 4.0  # 4 + 1.5 > 5: postponed
    cb.on_step_end(None, types.SimpleNamespace(global_step=6), control)
    assert calls == [4] and cb.postponed == 1


def test_callback_logs_to_console_history_wandb_and_training_png(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import wandb
    monkeypatch.setenv("MTP_SELFDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(out), "--max_train_samples", "16", "--eval_fraction", "0", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
            "--acceptance_eval_steps", "1", "--acceptance_prompts", "2", "--acceptance_max_new_tokens", "6",
            "--acceptance_budget", "1.0", "--report_to", "wandb", "--run_name", "acceptance-test"]
    assert train_command.main(argv) == 0
    wandb.finish()
    printed = capsys.readouterr().out
    assert "acceptance @ step 1" in printed and "acceptance @ step 2" in printed
    assert "tokens/forward, mean acceptance length" in printed

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    measured = [e for e in history if "accept_tokens_per_forward" in e]
    assert [e["step"] for e in measured] == [1, 2]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]  # the training log of each step is still there
    for entry in measured:
        assert entry["accept_tokens_per_forward"] >= 1.0 and entry["accept_mean_length"] >= 1.0
        assert 0.0 <= entry["accept_agreement"] <= 1.0 and 0.0 <= entry["accept_prefix_agreement"] <= 1.0
    reference = json.loads((out / acceptance.REFERENCE_FILE).read_text())
    assert reference["step"] == 0 and len(reference["prompts"]) == 2 and len(reference["token_ids"]) == 2
    cached = list((tmp_path / "cache" / "acceptance").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == reference
    assert "reference took" in printed

    # training.png: three panels (the acceptance curve is the third), wider than the two-panel drawing without it.
    with_curve = _png_size(out / "training.png")
    without = training_plot([e for e in history if "accept_tokens_per_forward" not in e], tmp_path / "plain.png")
    assert with_curve[0] > _png_size(without)[0]

    # A second run from the same starting model takes the reference from the cache.
    again = argv[:]
    again[again.index(str(out))] = str(tmp_path / "again")
    again[again.index("--report_to") + 1] = "none"
    assert train_command.main(again + ["--max_steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "reference came from the cache" in printed, printed
    assert json.loads((tmp_path / "again" / acceptance.REFERENCE_FILE).read_text()) == reference

    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = [row for row in _wandb_history(runs[0]) if "train/accept_tokens_per_forward" in row]
    assert [int(row["train/global_step"]) for row in logged] == [1, 2]
    for row, entry in zip(logged, measured):
        for name in acceptance.METRICS:
            assert float(row[f"train/{name}"]) == pytest.approx(entry[name])


def test_bad_acceptance_settings_are_user_errors(tiny_model_dir, tmp_path):
    from distill.errors import UserError

    base = ["--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--output_dir", str(tmp_path / "x")]
    for flags, message in ((["--acceptance_eval_steps", "-1"], "acceptance_eval_steps must be >= 0"),
                           (["--acceptance_tau", "1.5"], "acceptance_tau must be in"),
                           (["--acceptance_k_max", "9"], "more than the k_max 8")):
        with pytest.raises(UserError, match=message):
            recipes.parse_args(base + flags)
