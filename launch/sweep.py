r"""Expands a hyperparameter sweep into runs of ``pmm_jax.main`` and collects their results.

A sweep is defined next to its config by a ``get_sweep(name)`` function returning a list of
override dicts, e.g. ``[{"pseudo.alpha": 8.0}, {"pseudo.alpha": 11.0}]``. Each entry becomes
one run with ``--config.<key>=<value>`` overrides in ``ROOT/<run name>``.

    python launch/sweep.py --config=configs/demo.py --sweep=alpha --root=/tmp/sweep          # run here, in sequence
    python launch/sweep.py --config=configs/voc.py --sweep=pus --root=gs://b/s --print_only  # commands for a cluster
    python launch/sweep.py --config=configs/demo.py --sweep=alpha --root=/tmp/sweep --collect_only

Every run's ``results.json`` is flattened (``seg_miou.pus``) into one table written as
``ROOT/sweep.csv`` and ``ROOT/sweep.md``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; only when run as a script, so that importing this
    module (tests, notebooks) never clashes with ``pmm_jax.main``'s ``--config``."""
    flags.DEFINE_string("config", None, "Config file defining get_sweep(name), e.g. configs/demo.py[:variant].")
    flags.DEFINE_string("sweep", None, "Name of the sweep passed to get_sweep().")
    flags.DEFINE_string("root", None, "Directory that holds one workdir per run.")
    flags.DEFINE_bool("print_only", False, "Print the commands instead of running them.")
    flags.DEFINE_bool("collect_only", False, "Only collect existing results.")
    flags.DEFINE_multi_string("extra", [], "Overrides added to every run, e.g. --extra=--config.seed=1.")
    flags.mark_flags_as_required(["config", "sweep", "root"])


def load_sweep(config_arg: str, name: str) -> list[dict]:
    """Calls ``get_sweep(name)`` of the config file (the ``:variant`` suffix is ignored here)."""
    path = config_arg.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise app.UsageError(f"{path} defines no get_sweep(name)")
    return module.get_sweep(name)


def run_name(overrides: dict) -> str:
    """A readable, filesystem-safe name: ``pseudo.alpha=8.0,seed=1`` -> ``alpha-8.0_seed-1``."""
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in sorted(overrides.items())]
    return "_".join(parts).replace("/", "-").replace(" ", "") or "default"


def command(config_arg: str, workdir: str, overrides: dict, extra: list[str]) -> list[str]:
    """The ``pmm_jax.main`` command line of one run."""
    args = [sys.executable, "-m", "pmm_jax.main", f"--config={config_arg}", f"--workdir={workdir}"]
    args += [f"--config.{key}={value}" for key, value in sorted(overrides.items())]
    return args + list(extra)


def collect(root: str, runs: dict[str, dict]) -> list[dict]:
    """One flat row per run with its overrides and results (missing results are marked)."""
    # The markers' flattening (imported here: pmm_jax.stages loads JAX, which --print_only
    # does not need; run from the repo root after ``pip install -e .``).
    from pmm_jax.stages.record import flatten

    rows = []
    for name, overrides in runs.items():
        path = os.path.join(root, name, "results.json")
        row = {"run": name, **{f"override.{k}": v for k, v in overrides.items()}}
        if os.path.exists(path):
            with open(path) as f:
                row.update(flatten(json.load(f)))
        else:
            row["status"] = "no results.json"
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict], keys=("override.", "cam_miou", "pseudo_mask_miou.", "seg_miou.", "status")) -> str:
    """The table's headline columns (overrides and mIoUs) in Markdown."""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row)
               if c == "run" or any(c.startswith(prefix) for prefix in keys)]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    runs = {run_name(o): o for o in load_sweep(FLAGS.config, FLAGS.sweep)}
    if not FLAGS.collect_only:
        for name, overrides in runs.items():
            cmd = command(FLAGS.config, os.path.join(FLAGS.root, name), overrides, FLAGS.extra)
            if FLAGS.print_only:
                print(shlex.join(cmd))
            else:
                print(f"== run {name}: {shlex.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True)
    if FLAGS.print_only:
        return
    rows = collect(FLAGS.root, runs)
    os.makedirs(FLAGS.root, exist_ok=True)
    with open(os.path.join(FLAGS.root, "sweep.csv"), "w") as f:
        f.write(to_csv(rows))
    table = to_markdown(rows)
    with open(os.path.join(FLAGS.root, "sweep.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    define_flags()
    app.run(main)
