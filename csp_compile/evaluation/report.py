"""Presenting evaluation records: a text table and a PNG of accuracy against budget."""

from __future__ import annotations

from pathlib import Path

__all__ = ["REAL_COLUMNS", "format_table", "plot_accuracy", "plot_real_accuracy", "real_accuracy_markdown"]

COLUMNS = ("policy", "budget", "accuracy", "kl", "top1_agreement", "kept_fraction")
CHUNK_STYLES = ("--", ":", "-.")  # chunked-prefill rows, one style per chunk size


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def format_table(records: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """One row per record, fixed-width ``columns``."""
    rows = [columns] + [tuple(_cell(record.get(column)) for column in columns) for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(value.rjust(width) if i else value.ljust(width) for i, (value, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_accuracy(records: list[dict], path: str | Path, title: str = "") -> None:
    """PNG at ``path``: accuracy (or top-1 agreement when accuracy is unknown) against budget, one
    line per policy, the full cache as a dashed black line; a chunked-prefill row (``prefill_chunk``
    set) is drawn in its policy's colour with a dashed / dotted line and hollow markers."""
    plt = _pyplot()

    metric = "accuracy" if all(record["accuracy"] is not None for record in records) else "top1_agreement"
    full = [record for record in records if record["policy"] == "full"]
    policies = list(dict.fromkeys(record["policy"] for record in records if record["policy"] != "full"))
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    chunks = list(dict.fromkeys(r["prefill_chunk"] for r in records if r.get("prefill_chunk") is not None))
    colours: dict[str, str] = {}
    for policy in policies:
        rows = [r for r in records if r["policy"] == policy]
        chunk = rows[0].get("prefill_chunk")
        base = policy.split(" (chunk ")[0] if chunk is not None else policy
        colour = colours.setdefault(base, f"C{len(colours) % 10}")
        style = {} if chunk is None else {"linestyle": CHUNK_STYLES[chunks.index(chunk) % len(CHUNK_STYLES)],
                                          "markerfacecolor": "none"}
        points = sorted((r["budget"], r[metric]) for r in rows)
        axes.plot([b for b, _ in points], [v for _, v in points], marker="o", color=colour, label=policy, **style)
    if full:
        axes.axhline(full[0][metric], linestyle="--", color="black", linewidth=1, label="full cache")
    axes.set_xlabel("budget (fraction of the prompt kept in the KV cache)")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    if title:
        axes.set_title(title, fontsize=9)
    _save(figure, path)


REAL_COLUMNS = ("task", "length", "policy", "window", "budget", "accuracy", "kl", "needle_kept", "kept_fraction", "n")


def plot_real_accuracy(records: list[dict], path: str | Path, window: int, title: str = "") -> None:
    """PNG at ``path``: one panel per prompt length, accuracy against budget per policy at ``window``,
    the full cache as a dashed black line (real-model task records: ``length``, ``window``)."""
    plt = _pyplot()

    lengths = sorted({r["length"] for r in records})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4.0), dpi=110, squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in records if r["policy"] != "full"))
    for axis, length in zip(axes[0], lengths):
        rows = [r for r in records if r["length"] == length]
        for i, policy in enumerate(policies):
            points = sorted((r["budget"], r["accuracy"]) for r in rows if r["policy"] == policy and r["window"] == window)
            axis.plot([b for b, _ in points], [a for _, a in points], marker="o", color=f"C{i % 10}",
                      linestyle="-" if i < 10 else "--", label=policy)
        full = [r["accuracy"] for r in rows if r["policy"] == "full"]
        if full:
            axis.axhline(full[0], linestyle="--", color="black", linewidth=1, label="full cache")
        axis.set_title(f"{length} tokens, window {window}", fontsize=9)
        axis.set_xlabel("budget (fraction kept)")
        axis.set_xscale("log")
        budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
        axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
        axis.minorticks_off()
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def real_accuracy_markdown(records: list[dict], window: int, metric: str = "accuracy") -> str:
    """A markdown table of real-model task records at ``window``: one row per policy (the full cache
    first), one column per (length, budget), ``metric`` to 2 decimals; n per length in the header."""
    lengths = sorted({r["length"] for r in records})
    budgets = sorted({r["budget"] for r in records if r["policy"] != "full"})
    n = {length: next(r["n"] for r in records if r["length"] == length) for length in lengths}
    header = ["policy"] + [f"{length // 1024}k b{budget:g}" for length in lengths for budget in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cell = {(r["policy"], r["length"], r["budget"]): r[metric] for r in records
            if r["policy"] == "full" or r["window"] == window}
    full = ["full cache"] + [f"{cell[('full', length, 1.0)]:.2f}" for length in lengths for _ in budgets]
    lines.append("| " + " | ".join(full) + " |")
    for policy in dict.fromkeys(r["policy"] for r in records if r["policy"] != "full"):
        values = [cell.get((policy, length, budget)) for length in lengths for budget in budgets]
        lines.append("| " + " | ".join([policy] + ["" if v is None else f"{v:.2f}" for v in values]) + " |")
    lines.append("")
    lines.append(f"n = {', '.join(f'{n[length]} at {length}' for length in lengths)} prompts; window {window}")
    return "\n".join(lines)


def task_accuracy_markdown(records: list[dict], metric: str = "accuracy") -> str:
    """A markdown table of shipped-task records (one-shot prefill): one row per policy (the full cache
    first), one column per budget, ``metric`` to 3 decimals; n in the last line."""
    records = [r for r in records if r.get("prefill_chunk") is None]
    budgets = sorted({r["budget"] for r in records if r["policy"] != "full"})
    cell = {(r["policy"], r["budget"]): r[metric] for r in records}
    lines = ["| policy | " + " | ".join(f"b{b:g}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    if ("full", 1.0) in cell:
        lines.append("| full cache | " + " | ".join(f"{cell[('full', 1.0)]:.3f}" for _ in budgets) + " |")
    for policy in dict.fromkeys(r["policy"] for r in records if r["policy"] != "full"):
        values = [cell.get((policy, b)) for b in budgets]
        lines.append(f"| {policy} | " + " | ".join("" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append("")
    lines.append(f"n = {records[0]['n']} prompts")
    return "\n".join(lines)
