"""training.png: the curves of one `mtp train` run, drawn from its log history (trainer_state.json).

One place draws it: `mtp train` writes `output_dir/training.png` when the run ends and `mtp demo` copies the same
drawing into its output. Panels: the distillation loss; student/teacher argmax agreement at positions >= 2 (the <MTP>
slots); and, when the run logged them (`acceptance_eval_steps`, distill/acceptance.py), ConfAdapt's tokens per
forward pass and mean acceptance length on held-out prompts with the agreement with the starting model's k=1.
Written atomically (distill/files.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.files import replace_atomically


def read_log_history(state_file) -> list[dict]:
    path = Path(state_file)
    if path.is_dir():
        path = path / "trainer_state.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("log_history", [])


def training_plot(log_history: list[dict], path) -> Path | None:
    """Draw the run's curves into `path` (PNG); None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [e for e in log_history if "loss" in e]
    accept = [e for e in log_history if "accept_tokens_per_forward" in e]
    if not logs and not accept:
        return None
    panels = 3 if accept else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    ax1, ax2 = axes[0], axes[1]
    steps = [e["step"] for e in logs]
    ax1.plot(steps, [e["loss"] for e in logs], marker=".")
    ax1.set(xlabel="step", ylabel="hard-teacher CE", title="distillation loss (each step draws its own k)")
    agree = [e for e in logs if "agree_pos>=2" in e]
    if agree:
        ax2.plot([e["step"] for e in agree], [e["agree_pos>=2"] for e in agree], marker=".", color="tab:green")
    ax2.set(xlabel="step", ylabel="agreement", title="student = teacher argmax at positions >= 2", ylim=(0, 1))
    if accept:
        ax3 = axes[2]
        steps = [e["step"] for e in accept]
        ax3.plot(steps, [e["accept_tokens_per_forward"] for e in accept], marker="o", label="tokens / forward")
        ax3.plot(steps, [e["accept_mean_length"] for e in accept], marker=".", linestyle="--",
                 label="mean acceptance length")
        last = max([e["step"] for e in log_history if "step" in e] + steps)
        top = max([e["accept_tokens_per_forward"] for e in accept] + [e["accept_mean_length"] for e in accept] + [2.0])
        ax3.set(xlabel="step", ylabel="tokens", title="ConfAdapt on held-out prompts (raw tau)", xlim=(0, last + 1),
                ylim=(0.9, top * 1.05))
        twin = ax3.twinx()
        twin.plot(steps, [e["accept_agreement"] for e in accept], marker="s", color="tab:red",
                  label="same answer as start k=1")
        twin.plot(steps, [e["accept_prefix_agreement"] for e in accept], marker=".", color="tab:pink",
                  linestyle=":", label="token prefix agreement")
        twin.set(ylabel="agreement", ylim=(0, 1.05))
        handles = ax3.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax3.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
