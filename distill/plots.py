"""The project's run figures, drawn from the records a command already wrote or returned.

training.png: the curves of one `mtp train` run, drawn from its log history (trainer_state.json). `mtp train` writes
`output_dir/training.png` when the run ends and `mtp demo` copies the same drawing into its output. Panels: the
distillation loss; student/teacher argmax agreement at positions >= 2 (the <MTP> slots); and, when the run logged them
(`acceptance_eval_steps`, distill/acceptance.py), ConfAdapt's tokens per forward pass and mean acceptance length on
held-out prompts with the agreement with the starting model's k=1.

The concurrency figure (`mtp bench-decode --plot`, adaptive/bench.py): each mode's throughput as a ratio to HF batched
greedy at the same concurrency, against concurrency on a log2 axis, a dashed line at 1.0 (greedy itself) and the
serving debriefs' anchors as labelled markers (the paper authors' SGLang fork, jwkirchenbauer/sglang-mtp-lm
PHASE3D_DEBRIEF.md: ConfAdapt at 0.26x and EAGLE-3 at 1.39x of non-MTP throughput at concurrency 16): does a mode
collapse as requests are batched together?

reliability.png (`mtp calibrate`, `mtp demo`): bin accuracy against bin confidence of span-position confidences, raw
and calibrated, against the diagonal, with the ECE of each curve (adaptive/metrics.py) and confidence histograms below.

pareto.png (`mtp tune`, adaptive/tuner.py): accuracy, or agreement with k=1, against tokens per forward and against
measured wall-clock tokens/s, one line per k_max over tau, certified settings filled, the choice starred and k=1 as
the reference line: what each setting costs in quality for what it gains in speed.

Every figure is written atomically (distill/files.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaptive.metrics import N_BINS, calibration_metrics, reliability_bins
from distill.errors import UserError
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
    # With a teacher: agreement with its argmax; with ground-truth labels (supervision gt, e.g. on the model's own
    # greedy text, where the label is the teacher's argmax along the greedy path): agreement with the label.
    key = "agree_pos>=2" if any("agree_pos>=2" in e for e in logs) else "gt_acc_pos>=2"
    target = "teacher argmax" if key == "agree_pos>=2" else "label"
    ax1.set(xlabel="step", ylabel="hard-teacher CE" if key == "agree_pos>=2" else "cross-entropy",
            title="distillation loss (each step draws its own k)")
    agree = [e for e in logs if key in e]
    if agree:
        ax2.plot([e["step"] for e in agree], [e[key] for e in agree], marker=".", color="tab:green", alpha=0.5,
                 label=f"student argmax = {target}")
    confident = [e for e in logs if "confidence_pos2" in e]
    if confident:
        ax2.plot([e["step"] for e in confident], [e["confidence_pos2"] for e in confident], marker=".",
                 color="tab:purple", alpha=0.5, label="top-1 probability at position 2")
    if agree or confident:
        ax2.legend(fontsize=7, loc="lower right")
    ax2.set(xlabel="step", ylabel="fraction", title="masks (positions >= 2) on the training rows", ylim=(0, 1))
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


def concurrency_plot(results: list[dict], path, *, anchors=(), title: str | None = None) -> Path:
    """Draw `ratio_vs_hf_greedy` against `concurrency` (log2 axis) for every mode of `results` (rows of
    adaptive.bench.run_bench) but hf-greedy, which is the dashed line at 1.0; `anchors`: dicts with label,
    concurrency and ratio, drawn as labelled markers. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    if not results:
        raise UserError("concurrency_plot needs at least one result row")
    modes = [m for m in dict.fromkeys(r["mode"] for r in results) if m != "hf-greedy"]
    levels = sorted({int(r["concurrency"]) for r in results} | {int(a["concurrency"]) for a in anchors})
    fig, ax = plt.subplots(figsize=(11.0, 5.0), constrained_layout=True)
    ax.axhline(1.0, color="black", ls="--", lw=1.2, label="HF batched greedy (1.0)")
    colors = plt.cm.tab10.colors
    top = 1.0
    for i, mode in enumerate(modes):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["concurrency"])
        xs, ys = [r["concurrency"] for r in rows], [r["ratio_vs_hf_greedy"] for r in rows]
        row_by_row = any(r.get("note", "").startswith("row-by-row") for r in rows)
        label = f"{mode} (row by row at c > 1)" if row_by_row else mode
        ax.plot(xs, ys, marker="o", color=colors[i % len(colors)], lw=1.5, ms=5, label=label,
                ls=":" if mode.startswith("hf-") else "-")
        top = max([top] + ys)
    for a, (marker, color) in zip(anchors, [("X", "black"), ("*", "gold"), ("D", "gray")] * 4):
        ax.plot(a["concurrency"], a["ratio"], marker, color=color, ms=14, mec="black",
                label=f"{a['label']}: {a['ratio']:.2f}x at c={a['concurrency']}")
        ax.annotate(f"{a.get('short', a['label'])} {a['ratio']:.2f}x", (a["concurrency"], a["ratio"]),
                    textcoords="offset points", xytext=(-10, 0), ha="right", va="center", fontsize=8)
        top = max(top, a["ratio"])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(levels))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlim(levels[0] / 1.5, levels[-1] * 1.5)
    ax.set_ylim(0, top * 1.15)
    ax.set_xlabel("concurrency (requests decoded together)")
    ax.set_ylabel("throughput / HF batched greedy at the same concurrency")
    ax.set_title(title or "tokens/s relative to HF batched greedy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    try:
        return replace_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def pareto_plot(path, settings: list[dict], reference: dict, *, choice: dict | None = None,
                target: float | None = None, title: str | None = None, objective: str = "drop") -> Path:
    """Accuracy (or agreement with k=1) vs tokens/forward (left) and vs measured wall-clock tokens/s (right): one
    line per k_max over tau (annotated), certified settings filled, the chosen one starred, k=1's speed as a vertical
    reference line (1 token/forward; its measured tok/s) and the target band shaded. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agreement = objective == "agreement"
    quality = "agreement" if agreement else "accuracy"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    panels = (("tokens_per_forward_mean", "tokens per forward (acceleration factor)"),
              ("tokens_per_second", "wall-clock tokens/s (measured beside k=1, same batch size)"))
    ref_y = 1.0 if agreement else float(reference["accuracy"])
    chosen = (choice or {}).get("setting")
    k_maxes = sorted({int(s["k_max"]) for s in settings})
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(k_maxes), 1)))
    ref_x = {"tokens_per_forward_mean": 1.0,
             "tokens_per_second": reference.get("speed_sample_tokens_per_second") or reference.get("tokens_per_second")}
    for ax, (field, xlabel) in zip(axes, panels):
        if target is not None:
            low = target if agreement else ref_y - target
            ax.axhspan(low, ref_y, color="tab:green", alpha=0.12, lw=0,
                       label=f"within target ({'agreement >= ' if agreement else 'drop <= '}{target:g})")
            ax.axhline(low, color="tab:green", ls="--", lw=1)
        if ref_x[field] is not None:
            ax.axvline(ref_x[field], color="black", ls=":", lw=1.5, label="k=1 (plain decoding): slower to the left")
            ax.plot(ref_x[field], ref_y, "s", color="black", ms=8, label="Static(1) reference")
        for color, k in zip(colors, k_maxes):
            rows = sorted((s for s in settings if int(s["k_max"]) == k and s.get(field) is not None
                           and s.get(quality) is not None), key=lambda s: -s["tau"])
            if not rows:
                continue
            xs, ys = [s[field] for s in rows], [s[quality] for s in rows]
            ax.plot(xs, ys, "-", color=color, lw=1.2, label=f"ConfAdapt k_max={k}")
            for s, x, y in zip(rows, xs, ys):
                ax.plot(x, y, "o", ms=7, color=color, mfc=color if s.get("certified") else "white", mew=1.5)
                ax.annotate(f"{s['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if chosen is not None and chosen.get(field) is not None:
            ax.plot(chosen[field], chosen[quality], "*", color="tab:red", ms=18, mec="black",
                    label=f"chosen: tau={chosen['tau']:g}, k_max={chosen['k_max']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("agreement with k=1" if agreement else "accuracy")
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "o", color="gray", mfc="gray", label="certified")
    axes[0].plot([], [], "o", color="gray", mfc="white", label="not certified")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].legend(fontsize=7, loc="lower left")
    if chosen is None and choice is not None:
        axes[1].set_title("chosen: plain decoding (k=1)", fontsize=9)
    fig.suptitle(title or f"mtp tune: {quality} vs speed")

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    try:
        return replace_atomically(Path(path), write)
    finally:
        plt.close(fig)


def reliability_diagram(path, curves: dict, n_bins: int = N_BINS, title: str | None = None) -> Path:
    """PNG: bin accuracy vs bin confidence per curve ({name: (confidence, correct)}) against the diagonal, ECE in the
    legend; confidence histograms (log counts) below. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise UserError("reliability_diagram needs at least one curve")
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True, constrained_layout=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfectly calibrated")
    colors = plt.cm.tab10(np.arange(len(curves)))
    for color, (name, (conf, correct)) in zip(colors, curves.items()):
        bins = reliability_bins(conf, correct, n_bins)
        m = calibration_metrics(conf, correct, n_bins)
        used = bins["count"] > 0
        top.plot(bins["confidence"][used], bins["accuracy"][used], "o-", color=color, ms=5,
                 label=f"{name} (ECE {m['ece']:.3f}, n={m['n']})")
        bottom.hist(np.asarray(conf, dtype=np.float64), bins=bins["edges"], histtype="step", lw=1.5, color=color)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy (draft == greedy token)")
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(title or "reliability of span-position confidences (j >= 2)")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("drafts")
    bottom.grid(alpha=0.3)
    try:
        return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
