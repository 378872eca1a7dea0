"""`mtp demo`: refuses foreign directories and bad flags before any work; GSM8K answer extraction."""

import pytest

from distill.cli import main as mtp_main


def test_demo_never_touches_a_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert mtp_main(["demo", "--output-dir", str(foreign), "--steps", "1"]) == 2
    assert "not created by `mtp demo`" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert mtp_main(["demo", "--output-dir", str(tmp_path / "d"), "--tau", "2"]) == 2  # checked before any work
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("text, answer", [
    ("so 5 + 3 = 8.\n#### 8", "8"), ("The answer is 1,234.", "1234"), ("It costs $18.00", "18"),
    ("#### -3.5", "-3.5"), ("no digits", None), ("48/2 = 24 in May, 48+24 = 72 clips", "72"),
])
def test_final_answer(text, answer):
    from adaptive.demo import final_answer

    assert final_answer(text) == answer
