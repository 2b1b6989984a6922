"""The end-of-run report printed by `imcl-train`, and its number formats."""

from __future__ import annotations

import math
from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report: steps, validation mAP, final losses, lambdas and every path."""
    lines = []
    stage = summary.get("logistic_stage")
    if stage:
        lines += [_format_one(stage, "stage 1/2: logistic baseline"), ""]
        lines.append(_format_one(summary, "stage 2/2: IMCL warm-started from the baseline"))
    else:
        lines.append(_format_one(summary, f"{summary['method']} run"))
    if summary.get("wall_seconds") is not None:
        lines.append(f"total time: {format_duration(summary['wall_seconds'])}")
    return "\n".join(lines)


def _format_one(summary: dict[str, Any], title: str) -> str:
    steps, start = summary["steps"], summary.get("start_step", 0)
    session = (f"{summary.get('steps_this_run', steps)} in this session, resumed at step {start}"
               if start else f"{summary.get('steps_this_run', steps)} in this session")
    lines = [f"{title}: {steps} steps ({session})"]
    if summary.get("best_val_mAP") is not None:
        lines.append(f"  validation mAP   best {format_number(summary['best_val_mAP'])} at step "
                     f"{summary['best_step']}, last {format_number(summary.get('last_val_mAP'))} "
                     f"(all classes {format_number(summary.get('last_val_mAP_all_classes'))})")
    else:
        lines.append("  validation       none (no --val_split); the last model is kept as best")
    logs = summary.get("final_train_logs") or {}
    losses = [f"{key} {format_number(logs[key])}" for key in ("loss", "bce", "loss_y", "loss_f")
              if key in logs]
    if losses:
        lines.append("  training loss    " + "  ".join(losses) + "  (mean of the last interval)")
    if "omp_valid_fraction" in logs:
        lines.append(f"  OMP              valid neighbours {logs['omp_valid_fraction']:.1%}, label "
                     f"residual {format_number(logs.get('residual_y_before'))} -> "
                     f"{format_number(logs.get('residual_y_after'))}, feature residual "
                     f"{format_number(logs.get('residual_f_before'))} -> "
                     f"{format_number(logs.get('residual_f_after'))}")
    resolved = summary.get("resolved") or {}
    if "lambda_y" in resolved:
        lines.append(f"  smoothness       lambda_y {format_number(resolved['lambda_y'])}  lambda_f "
                     f"{format_number(resolved['lambda_f'])}")
    if resolved.get("warm_start"):
        lines.append(f"  warm start       {resolved['warm_start']}")
    files = summary.get("files") or {}
    for key, label in (("model_dir", "run folder"), ("best_model", "best model"),
                       ("latest_model", "final model"), ("run_config", "configuration"),
                       ("tensorboard", "TensorBoard"), ("export", "SavedModel")):
        if files.get(key):
            value = files[key]
            if key == "tensorboard":
                value = f"tensorboard --logdir {value}"
            lines.append(f"  {label:16s} {value}")
    return "\n".join(lines)


def format_number(value) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
