"""The results table of a run: ``WORKDIR/results.json`` (written by stage ``eval``) as rows
and as Markdown."""

from __future__ import annotations


def result_rows(res: dict) -> list[tuple[str, float | None]]:
    """``(result, mIoU fraction or None: not available)`` rows of a results dict, in table
    order.

    ``seg_miou["cyclic"]`` repeats the last cycle's figure (a stable key for scripts): it is
    listed once, on that cycle's row.
    """
    rows = []
    if "cam_miou" in res:
        rows.append((f"CAM (bg threshold {res['cam_bg_threshold']})", res["cam_miou"]))
    scored = res.get("pseudo_mask_eval")
    where = f"{scored['split']}, {scored['num_images']} images" if scored else "train subset"
    for name, value in res.get("pseudo_mask_miou", {}).items():
        rows.append((f"pseudo-mask {name} ({where})", value))
    seg_mious = res.get("seg_miou", {})
    last_cycle = max((n for n in seg_mious if n.startswith("cycle") and n[5:].isdigit()),
                     key=lambda n: int(n[5:]), default=None)
    for name, value in seg_mious.items():
        if name == "cyclic" and last_cycle is not None:
            continue
        label = f"{name} (cyclic)" if name == last_cycle else name
        rows.append((f"segmenter {label} (val)", value))
    return rows


def format_table(res: dict) -> str:
    """The results as a Markdown table (mIoU in percent; "n/a" where not available: a
    dataset without val, or without ground truth on the images scored)."""
    rows = result_rows(res)
    lines = ["| result | mIoU (%) |", "| --- | --- |"]
    lines += [f"| {name} | {'n/a' if value is None else f'{100 * value:.2f}'} |"
              for name, value in rows]
    lines += ["", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in res.get("seconds", {}).items()]
    return "\n".join(lines)
