"""Presenting evaluation records: a text table and a PNG of accuracy against budget."""

from __future__ import annotations

from pathlib import Path

__all__ = ["format_table", "plot_accuracy"]

COLUMNS = ("policy", "budget", "accuracy", "kl", "top1_agreement", "kept_fraction")


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(records: list[dict]) -> str:
    """One row per record, fixed-width columns (COLUMNS)."""
    rows = [COLUMNS] + [tuple(_cell(record.get(column)) for column in COLUMNS) for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(value.rjust(width) if i else value.ljust(width) for i, (value, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_accuracy(records: list[dict], path: str | Path, title: str = "") -> None:
    """PNG at ``path``: accuracy (or top-1 agreement when accuracy is unknown) against budget, one
    line per policy, the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if all(record["accuracy"] is not None for record in records) else "top1_agreement"
    full = [record for record in records if record["policy"] == "full"]
    policies = list(dict.fromkeys(record["policy"] for record in records if record["policy"] != "full"))
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for policy in policies:
        points = sorted((r["budget"], r[metric]) for r in records if r["policy"] == policy)
        axes.plot([b for b, _ in points], [v for _, v in points], marker="o", label=policy)
    if full:
        axes.axhline(full[0][metric], linestyle="--", color="black", linewidth=1, label="full cache")
    axes.set_xlabel("budget (fraction of the prompt kept in the KV cache)")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
