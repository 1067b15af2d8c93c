"""Plain-text tables of evaluation results (the official summary lines, per-category AP)."""

from __future__ import annotations

from collections.abc import Mapping

_ROWS = (
    ("AP", "Average Precision", "0.50:0.95", "all", 100),
    ("AP50", "Average Precision", "0.50", "all", 100),
    ("AP75", "Average Precision", "0.75", "all", 100),
    ("APs", "Average Precision", "0.50:0.95", "small", 100),
    ("APm", "Average Precision", "0.50:0.95", "medium", 100),
    ("APl", "Average Precision", "0.50:0.95", "large", 100),
    ("AR1", "Average Recall", "0.50:0.95", "all", 1),
    ("AR10", "Average Recall", "0.50:0.95", "all", 10),
    ("AR100", "Average Recall", "0.50:0.95", "all", 100),
    ("ARs", "Average Recall", "0.50:0.95", "small", 100),
    ("ARm", "Average Recall", "0.50:0.95", "medium", 100),
    ("ARl", "Average Recall", "0.50:0.95", "large", 100),
)


def format_table(metrics: Mapping) -> str:
    """The 12 statistics in the official layout, then OVIS occlusion, HOTA and per-category AP."""
    lines = []
    for key, title, iou, area, md in _ROWS:
        if key in metrics:
            kind = "(AP)" if title.endswith("Precision") else "(AR)"
            lines.append(
                f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={md:>3d} ]"
                f" = {metrics[key]:0.3f}"
            )
    occ = metrics.get("occlusion")
    if occ:
        lines.append("")
        lines.append(" OVIS occlusion      " + "  ".join(f"{k}={v:0.3f}" for k, v in occ.items()))
    if "HOTA" in metrics:
        lines.append("")
        lines.append(
            " Tracking (trackeval) "
            + "  ".join(f"{k}={metrics[k]:0.3f}" for k in ("HOTA", "DetA", "AssA"))
        )
    per_cat = metrics.get("per_category_AP")
    if per_cat:
        width = max(8, *(len(str(n)) for n in per_cat))
        lines.append("")
        lines.append(f" {'category':<{width}}  AP")
        lines.append(f" {'-' * width}  -----")
        for name, ap in per_cat.items():
            lines.append(f" {name:<{width}}  {ap:0.3f}" if ap > -1 else f" {name:<{width}}  -")
    return "\n".join(lines)
