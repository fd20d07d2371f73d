"""The demo's picture: training and eval loss of its jobs, read back from their MLflow runs."""

from __future__ import annotations

import os
from pathlib import Path

from peftray.stack.procs import private_dir


def loss_history(run_id: str, config=None) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(step, value), ...]}` for the loss metrics of one MLflow run."""
    from peftray.registry.client import mlflow_client

    client = mlflow_client(config)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in ("loss", "eval_loss"):
        points = client.get_metric_history(run_id, key)
        if points:
            out[key] = sorted((p.step, p.value) for p in points)
    return out


def plot_losses(runs: dict[str, str], path: Path, config=None) -> Path | None:
    """Write one PNG with a line per job (train loss solid, eval loss dashed). Returns the path, or None."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = 0
    for i, (label, run_id) in enumerate(runs.items()):
        color = f"C{i}"
        for key, points in loss_history(run_id, config).items():
            steps, values = zip(*points)
            style = "-" if key == "loss" else "--o"
            ax.plot(steps, values, style, color=color, label=f"{label} {key.replace('_', ' ')}", markersize=3)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("peftray demo: LoRA fine-tuning of the tiny Llama")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    # the stack's state folder is its owner's alone (0700/0600), and so is the picture put in it
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
