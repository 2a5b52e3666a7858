"""What the train-step benchmarks (``bench/classifier_step.py``, ``bench/segmenter_step.py``)
share: running each framework in its own process, timing its train step, its memory peak,
XLA's FLOP and memory figures of the compiled step, the device's bf16 peak (``bench.suite``
makes the table)."""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import time

# Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s by device kind (vendor data
# sheets); the first key contained in ``device_kind`` wins, so the more specific come first.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "TPU v6 lite": 918.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v4": 275.0,
}
DTYPES = ("float32", "bfloat16")


def max_rss_bytes() -> int:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(fn, args) -> dict:
    """Runs ``fn(args)`` in a fresh spawned process (its own memory peak and threads), which
    then exits normally (not terminated: libtpu reports a SIGTERM with a stack dump)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(fn, (args,))
        pool.close()
        pool.join()
        return result


def peak_tflops(device_kind: str, given: float | None) -> float | None:
    """``given`` (``--peak_tflops``) or the bf16 peak of ``device_kind`` from
    :data:`BF16_PEAK_TFLOPS`; None when unknown (a CPU, or a device not in the table)."""
    if given:
        return given
    return next((peak for kind, peak in BF16_PEAK_TFLOPS.items() if kind in device_kind), None)


def step_flops(compiled, lowered) -> tuple[float | None, str]:
    """``(FLOPs, source)`` of one step from XLA's cost analysis on the backend it runs on: the
    lowered (unoptimised) program's count, where every convolution is still an HLO
    convolution, or else the compiled program's (on a GPU the compiled program's convolutions
    are cuDNN custom calls that its cost analysis skips, so that count is a fallback only).
    ``(None, why)`` when neither has a count: never a silent 0."""
    def count(stage) -> float:
        try:
            cost = stage.cost_analysis()
        except Exception:  # noqa: BLE001  (a backend without cost analysis)
            return 0.0
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0))

    for stage, source in ((lowered, "lowered step"), (compiled, "compiled step")):
        flops = count(stage)
        if flops > 0:
            return flops, source
    return None, "XLA reported no FLOP count on this backend"


def memory_gib(compiled) -> dict:
    """XLA's static buffer sizes of the compiled step in GiB: ``temp`` (activations and
    scratch the program allocates), ``argument``, ``output``, ``alias`` (donated)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {name: getattr(stats, f"{name}_size_in_bytes") / 2**30
            for name in ("temp", "argument", "output", "alias")}


def torch_autocast(dtype: str, device: str):
    """``torch.autocast(device, torch.bfloat16)`` for ``dtype == "bfloat16"`` (PyTorch AMP,
    the comparator of a bf16 JAX step), else a no-op context."""
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def jax_row(args, compiled, lowered, seconds: float, loss: float, compile_s: float) -> dict:
    """The JAX side's result row: images/s, loss, peak memory (the device allocator's peak on
    an accelerator, the process's peak RSS on a CPU), XLA's memory and FLOP figures."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    flops, source = step_flops(compiled, lowered)
    cpu = device.platform == "cpu"
    peak = None if cpu else peak_tflops(device.device_kind, args.peak_tflops)
    return {"framework": f"jax {jax.__version__}", "dtype": args.dtype,
            "device": "cpu" if cpu else device.device_kind, "images_per_s": args.batch * args.steps / seconds,
            "step_s": seconds / args.steps, "last_loss": loss, "compile_s": compile_s,
            "peak_mem_gib": (stats["peak_bytes_in_use"] if "peak_bytes_in_use" in stats
                             else max_rss_bytes()) / 2**30,
            "xla_memory_gib": memory_gib(compiled), "flops_source": source,
            "step_tflop": None if flops is None else flops / 1e12,
            "tflops_per_s": None if flops is None else flops * args.steps / seconds / 1e12,
            "peak_tflops": peak}


def time_jax(args, step, state, batch) -> dict:
    """Compiles the jitted ``step`` (timed: ``compile_s``), runs ``args.warmup`` untimed and
    ``args.steps`` timed steps on the fixed ``batch``, and returns :func:`jax_row`."""
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    seconds = time.perf_counter() - start
    return jax_row(args, compiled, lowered, seconds, loss, compile_s)


def time_torch(args, device: str, step) -> dict:
    """Runs ``step(i)`` (one PyTorch training step, returning its loss tensor) for
    ``args.warmup`` untimed and ``args.steps`` timed steps and returns :func:`torch_row`."""
    for i in range(args.warmup):
        loss = step(i)
    loss.item()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    last = loss.item()
    return torch_row(args, device, time.perf_counter() - start, last)


def torch_row(args, device: str, seconds: float, loss: float) -> dict:
    """The PyTorch side's result row (peak: allocator peak on CUDA, peak RSS on a CPU)."""
    import torch

    cuda = device == "cuda"
    return {"framework": f"torch {torch.__version__}", "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "images_per_s": args.batch * args.steps / seconds, "step_s": seconds / args.steps,
            "last_loss": loss, "threads": torch.get_num_threads(),
            "peak_mem_gib": (torch.cuda.max_memory_allocated() if cuda
                             else max_rss_bytes()) / 2**30}


def add_common_args(parser) -> None:
    """``--dtype``, ``--remat``, ``--peak_tflops``."""
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="JAX: the models' compute_dtype; PyTorch: bfloat16 = AMP autocast")
    parser.add_argument("--remat", action="store_true",
                        help="JAX: the model config's remat (backbone blocks recomputed in the "
                        "backward pass, pmm_jax/models/remat.py)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: known device kinds, "
                        "e.g. H100/H200 989)")
