"""What the train-step benchmarks (``bench/classifier_step.py``, ``bench/segmenter_step.py``)
share: running each framework in its own process, its memory peak, and the result table."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource


def max_rss_bytes() -> int:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(fn, args) -> dict:
    """Runs ``fn(args)`` in a fresh spawned process (its own memory peak and threads)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


def print_table(rows: list[dict], args, header: str) -> None:
    """Prints ``header``, one Markdown row per framework and the JAX / PyTorch ratio; writes
    ``{args, rows, load}`` to ``args.out_json`` when it is set. ``header`` may contain
    ``{load}``, filled with the 1-minute load average taken after the runs."""
    load = os.getloadavg()[0]
    print(header.format(load=f"{load:.1f}"))
    print("| framework | device | images/s | peak memory (GiB) | TFLOP/s (share of peak) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        share = (f"{row['tflops_per_s']:.1f} ({100 * row['tflops_per_s'] / args.peak_tflops:.1f}%)"
                 if row.get("tflops_per_s") and row["device"] != "cpu" else "")
        print(f"| {row['framework']} | {row['device']} | {row['images_per_s']:.2f} | "
              f"{row['peak_mem_gib']:.2f} | {share} |")
    if len(rows) == 2:
        print(f"jax / torch images/s: {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load": load}, f, indent=1)
