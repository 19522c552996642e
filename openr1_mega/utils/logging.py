"""Metric logging: every step to JSONL and TensorBoard, and to W&B when it is installed.

The JSONL file (`metrics.jsonl`, one object per step) is the record tests and plots
read; TensorBoard event files sit beside it. Only rank 0 writes. `plot_metrics` draws the
curves a person wants to see (reward, accuracy, completion length) into a PNG.

W&B starts when `wandb` imports and a project is set (the `project` argument, else the
WANDB_PROJECT environment variable, as wandb itself reads it), unless WANDB_MODE=disabled.
The run is named after the output directory unless a name is given (or WANDB_NAME is
set). A W&B failure (no network, no login) is a warning: the JSONL record goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def wandb_init_kwargs(out_dir: str | Path, run_name: str | None = None,
                      project: str | None = None,
                      env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The `wandb.init` arguments for a run writing to `out_dir`, or None when W&B is off
    (no project set, or WANDB_MODE=disabled)."""
    project = project or env.get("WANDB_PROJECT")
    if not project or env.get("WANDB_MODE", "").lower() == "disabled":
        return None
    name = run_name or env.get("WANDB_NAME") or Path(out_dir).resolve().name
    return {"project": project, "name": name, "dir": str(out_dir)}


def start_wandb(kwargs: dict[str, Any] | None) -> Any:
    """The W&B run for `kwargs` (from wandb_init_kwargs), or None when W&B is off,
    not installed, or fails to start."""
    if kwargs is None:
        return None
    try:
        import wandb
    except ImportError:
        logger.info("W&B project %r set but wandb is not installed: logging to JSONL/TB only",
                    kwargs["project"])
        return None
    try:
        return wandb.run or wandb.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - W&B is optional; the JSONL record goes on
        logger.warning("W&B did not start (%s: %s); logging to JSONL/TB only",
                       type(err).__name__, err)
        return None


class MetricsLogger:
    """Append step metrics to `<out>/metrics.jsonl`, TensorBoard (`<out>/tb`) and W&B."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, run_name: str | None = None,
                 project: str | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        self.wandb = start_wandb(wandb_init_kwargs(out_dir, run_name, project))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` for `step` (non-finite values are kept in JSONL as strings)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict], keys: list[str], out_png: str | Path, title: str = "") -> Path:
    """One panel per key (value over step) saved as a PNG; missing keys are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * max(len(present), 1)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], present):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
