"""``results.md`` of ``bench.suite``: its results as Markdown tables (train steps, pseudo-masks,
CAM inference, then the skipped and failed rows with their reasons and errors)."""

from __future__ import annotations

STEP_ROWS_KEY = "jax"


def _num(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def header(report: dict) -> list[str]:
    device, host, load = report["device"], report["host"], report["load"]
    versions = ", ".join(f"{k} {v}" for k, v in device["versions"].items() if v)
    return [f"# bench.suite results{' (--quick: small shapes)' if report['quick'] else ''}", "",
            f"- command: `{report['command']}`",
            f"- date: {report['date']} (UTC), {report['seconds']:.0f} s",
            f"- device: {device['count']} x {device['kind']} ({device['platform']}); the configs' "
            f"precision here: {device['config_dtype']}",
            f"- host: {host['cores']} cores {host['processor'] or host['machine']}, "
            f"{host['platform']}, Python {host['python']}",
            f"- load average (1, 5, 15 min): before {', '.join(f'{x:.1f}' for x in load['before'])}; "
            f"after {', '.join(f'{x:.1f}' for x in load['after'])}",
            f"- versions: {versions}", ""]


def step_table(rows: dict) -> list[str]:
    lines = ["## Train steps", "",
             "| row | dtype | remat | crop x batch | images/s | step (ms) | compile (s) | "
             "peak mem (GiB) | TFLOP/step | share of bf16 peak | loss finite | PyTorch images/s "
             "| PyTorch peak (GiB) | JAX / PyTorch | JAX / PyTorch float32 |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
             "| ---: | ---: |"]
    for name, result in rows.items():
        figures = result.get("figures") or {}
        if result["status"] != "ok" or STEP_ROWS_KEY not in figures:
            continue
        jax, settings = figures["jax"], figures["settings"]
        torch = figures.get("torch") or (rows.get(figures.get("torch_from"), {})
                                         .get("figures", {}).get("torch"))
        share = (100 * jax["tflops_per_s"] / jax["peak_tflops"]
                 if jax.get("tflops_per_s") and jax.get("peak_tflops") else None)
        torch_cells = (["n/a (" + figures.get("torch_skipped", "no comparator") + ")", "", ""]
                       if torch is None else
                       [f"{torch['images_per_s']:.2f}" + (f" (row {figures['torch_from']})"
                                                          if "torch_from" in figures else ""),
                        f"{torch['peak_mem_gib']:.2f}",
                        f"{jax['images_per_s'] / torch['images_per_s']:.2f}"])
        # A bf16 row against PyTorch float32 too (the targets' 2x): its ``_f32`` row's PyTorch.
        f32 = (rows.get(f"{name}_f32", {}).get("figures") or {}).get("torch")
        versus_f32 = ("" if f32 is None or settings["dtype"] == "float32"
                      else f"{jax['images_per_s'] / f32['images_per_s']:.2f}")
        lines.append(" | ".join([
            f"| {name}", settings["dtype"], "yes" if settings["remat"] else "no",
            f"{settings['crop']} x {settings['batch']}", f"{jax['images_per_s']:.2f}",
            f"{1000 * jax['step_s']:.1f}", f"{jax['compile_s']:.1f}", f"{jax['peak_mem_gib']:.2f}",
            _num(jax.get("step_tflop"), ".4g", "n/a"),
            _num(share, ".1f", "n/a (CPU)" if jax["device"] == "cpu" else "n/a") + ("%" if share else ""),
            "yes" if jax["loss_finite"] else "NO", *torch_cells, versus_f32]) + " |")
    return lines + [""]


def pseudo_table(rows: dict) -> list[str]:
    lines = ["## Pseudo-masks (PPMG)", ""]
    pool = rows.get("pseudo_masks", {})
    if pool.get("status") == "ok":
        f = pool["figures"]
        lines += [f"`python -m pmm_jax.pseudo_masks --num_workers={f['workers']}` vs a "
                  f"one-process official loop; {f['source']}; best of {f['rounds']} interleaved "
                  f"round(s), start-up included; load during the rounds "
                  f"{', '.join(f'{x:.1f}' for x in f['load_1min'])}.", "",
                  "| runner | s / image | CPU s / image | speed-up | target | pixels equal |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |",
                  f"| official loop, 1 process | {f['official_s_per_image']:.3f} | "
                  f"{f['official_cpu_s_per_image']:.3f} | 1.00 | | |",
                  f"| generator, {f['workers']} workers | {f['generator_s_per_image']:.3f} | "
                  f"{f['generator_cpu_s_per_image']:.3f} | "
                  f"{f['speedup']:.2f} | {f['target_speedup']:.2f} "
                  f"({'met' if f['meets_target'] else 'NOT met'}) | {100 * f['agreement']:.3f}% |",
                  ""]
    jax = rows.get("pseudo_masks_jax", {})
    if jax.get("status") == "ok":
        f = jax["figures"]
        agree = "n/a (no pydensecrf)" if f["agreement"] is None else f"{100 * f['agreement']:.3f}%"
        lines += [f"JAX dense CRF, the generator's per-image path in one process; {f['source']}: "
                  f"{f['s_per_image']:.3f} s / image after a first pass of {f['first_pass_s']:.1f} s "
                  f"(compilation included); pixels equal to the official loop: {agree}.", ""]
    return lines


def cam_table(rows: dict) -> list[str]:
    cam = rows.get("cam", {})
    if cam.get("status") != "ok":
        return []
    f = cam["figures"]
    return ["## CAM inference", "",
            f"Multi-crop CAMs (SEAM ResNet38-d, {f['dtype']}, flips) of one {f['image'][1]}x"
            f"{f['image'][0]} image at {len(f['scales'])} scale(s) {f['scales']}, tiles of "
            f"{f['crop']}: {f['s_per_image']:.3f} s / image (first call and timed calls "
            f"{f['first_and_timed_s']:.1f} s).", ""]


def compile_table(rows: dict) -> list[str]:
    """The ``compile:`` rows (``bench/compile_table.py``'s table; compiled, not run)."""
    from bench import compile_table as ct

    done = {n: r for n, r in rows.items() if n.startswith("compile:") and r["status"] == "ok"}
    if not done:
        return []
    return ["## Compiled for TPU slices and GPUs (compiled, not run)", "",
            *ct.markdown_rows(done), "", *ct.chips_note(), ""]
def photo_table(rows: dict) -> list[str]:
    row = rows.get("photo_predict", {})
    if row.get("status") != "ok":
        return []
    f = row["figures"]
    model = f"PSPNet width/{f['model']['width_div']}, blocks {f['model']['blocks']}"
    return ["## A 12 MP photo at the VOC canvas", "",
            f"One {f['photo'][1]}x{f['photo'][0]} photo on the {f['canvas'][0]}x{f['canvas'][1]} "
            f"canvas ({model}, scales {f['eval']['scales']}, flip {f['eval']['flip']}, no CRF); "
            "seconds per photo (compiled), host peak (tracemalloc):", "",
            "| path | s / photo | host peak MB |", "| --- | --- | --- |",
            f"| pmm_jax.predict (no CRF) | {f['predict_s']:.2f} | {f['predict_host_peak_mb']} |",
            f"| pmm_jax.export.load | {f['export_load_s']:.2f} | "
            f"{f['export_load_host_peak_mb']} |",
            f"| PIL resize + model alone + PIL resize back | {f['baseline_s']:.2f} | "
            f"{f['baseline_host_peak_mb']} |",
            f"| model alone | {f['model_alone_s']:.2f} | |",
            f"| canvas.shrink / PIL resize alone | {f['shrink_s']:.2f} / {f['pil_resize_s']:.2f} "
            f"| {f['shrink_host_peak_mb']} |", "",
            f"Peak RSS {f['peak_rss_mb']} MB; shrink vs PIL: max difference "
            f"{f['shrink_vs_pil']['max']}, share off by more than 1: "
            f"{f['shrink_vs_pil']['share_over_1']:.2%}; predict equals export: "
            f"{f['predict_equals_export']}.", ""]


def other_rows(rows: dict) -> list[str]:
    lines = []
    for name, result in rows.items():
        if result["status"] == "skipped":
            lines.append(f"- {name} ({result['what']}): skipped: {result['reason']}")
        elif result["status"] == "failed":
            lines.append(f"- {name} ({result['what']}): FAILED: {result['error']}")
    return ["## Rows not measured", "", *lines, ""] if lines else []


def markdown(report: dict) -> str:
    rows = report["rows"]
    return "\n".join(header(report) + step_table(rows) + pseudo_table(rows) + cam_table(rows)
                     + photo_table(rows) + compile_table(rows) + other_rows(rows))
