"""Where a train step's memory goes: XLA's static buffer sizes of the compiled JAX step
(``compiled.memory_analysis()``: temp = activations kept for the backward pass plus scratch)
beside the bytes of the tensors PyTorch's autograd saves for the backward pass of the same
network and batch (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once),
for the two benchmarks' networks in float32 and bfloat16 (PyTorch: AMP autocast), with and
without rematerialisation of the backbone blocks (the model config's ``remat``,
pmm_jax/models/remat.py).

Runs on the CPU (compiling only: the JAX step is never executed, nothing is timed), so it works
where no GPU is lent:

    python -m bench.step_memory --crop=224 --batch=2 --cases=seam

On the CPU, XLA's pipeline removes ``jax.checkpoint``'s optimisation barriers early
(``OptimizationBarrierExpander``, "cse_barrier_expander", right after CSE) and CSE then merges
the recomputation with the forward pass, so a remat step would compile to the plain one; the
GPU pipeline keeps the barriers until after scheduling. ``--keep_remat_barriers`` (default on)
compiles with that pass disabled so that the CPU figures show what remat does where the
barriers are kept. These are static buffer sizes of a CPU compile, not a GPU's peak memory
(no cuDNN workspaces, different fusion and scheduling).

``--gpu_target=FILE`` compiles for an NVIDIA GPU instead, still without one: JAX's CUDA
plugin (``pip install "jax[cuda12]==<this jax version>"``) builds a compile-only one-GPU
topology from an XLA GPU target description (a ``GpuTargetConfigProto`` text file: XLA ships
them as ``xla/backends/gpu/target_config/specs/<gpu>.txtpb``; jaxlib 0.10.2's plugin needs
the ``collective_memory_granularity`` line removed), and the step goes through XLA's real GPU
pipeline (cuDNN convolutions, GPU fusion, scheduling and rematerialisation against that
device's memory, buffer assignment):

    python -m bench.step_memory --gpu_target=h200.txtpb --crop=448 --batch=16 --cases=seam

Without a device nothing is autotuned: cuDNN algorithms stay unpicked with zero-byte
workspaces, so a GPU's temp can exceed these figures by the workspaces of the algorithms it
picks (and its allocator peak by what autotuning allocates while compiling). XLA's Triton
GEMM fusions are turned off (``xla_gpu_enable_triton_gemm``): without autotuning, jaxlib
0.10.2 finds no tile sizes for some small dots of these steps; they go to cuBLAS.

PyTorch's saved tensors at the paper's sizes (about 16 GiB for SEAM at crop 448, batch 16,
float32) may not fit a small machine: ``--torch_fit_batches=2,4`` measures them at two small
batches and extrapolates to ``--batch`` (they are affine in the batch).

Cases: ``seam`` and ``plain`` (bench/classifier_step.py: full ResNet38-d) and ``seg``
(bench/segmenter_step.py: PSPNet, ResNetV1c-101), each at ``--crop``/``--batch``.
Activation memory grows linearly with batch x crop^2, so the figures scale to the paper's
crop 448 (SEAM) / 512 (seg) at batch 16 by ``16 * crop_paper^2 / (batch * crop^2)``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from bench import classifier_step, segmenter_step, step_report
from pmm_jax.training import sharding as shd

CASES = ("seam", "plain", "seg")


def bench_args(case: str, args) -> argparse.Namespace:
    """The benchmark's own argument namespace for ``case`` at this crop, batch, dtype and
    remat setting."""
    common = [f"--crop={args.crop}", f"--batch={args.batch}", f"--dtype={args.dtype}",
              *(["--remat"] if args.remat else [])]
    if case == "seg":
        return segmenter_step.parse_args(common)
    return classifier_step.parse_args([f"--method={case}", *common])


def jax_memory(case: str, args) -> dict:
    """XLA's buffer sizes (GiB) of the compiled (never executed) step of ``case``, for the CPU
    or, with ``args.gpu_target``, for that GPU."""
    module = segmenter_step if case == "seg" else classifier_step
    step, state, batch = module.build_jax(bench_args(case, args))
    if args.gpu_target:
        return step_report.memory_gib(compile_for_gpu(step, state, batch, args.gpu_target))
    from pmm_jax.models.remat import KEEP_BARRIERS

    options = KEEP_BARRIERS if args.keep_remat_barriers else None
    return step_report.memory_gib(step.lower(state, batch).compile(options))


# Without autotuning, XLA's Triton GEMM emitter finds no tile sizes for some small dots of
# these steps (jaxlib 0.10.2: "Couldn't find output tile sizes"): they go to cuBLAS instead.
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def gpu_mesh(target_config: str) -> jax.sharding.Mesh:
    """A compile-only mesh of one GPU described by the ``GpuTargetConfigProto`` text file
    ``target_config``; no GPU needed, but JAX's CUDA plugin."""
    from jax.experimental import topologies

    with open(target_config) as f:
        spec = f.read()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=spec,
                                                topology="1x1x1")
    except NotImplementedError as err:
        raise SystemExit(f"--gpu_target needs JAX's CUDA plugin, which is not installed or did "
                         f'not load ({err}): pip install "jax[cuda12]=={jax.__version__}"') from err
    return jax.sharding.Mesh(np.asarray(topology.devices), (shd.DATA_AXIS,))


def compile_for_gpu(step, state, batch, target_config: str):
    """``step`` (``trainer.make_step``'s jitted function) compiled for the GPU of
    ``target_config`` from the shapes of ``state`` and ``batch`` alone, with the trainer's
    shardings (state replicated and donated, batch split over the data axis)."""
    mesh = gpu_mesh(target_config)
    rep, data = shd.replicated(mesh), shd.data_sharding(mesh)
    shapes = lambda tree, sharding: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    gpu_step = jax.jit(step.__wrapped__, in_shardings=(rep, data), out_shardings=(rep, rep),
                       donate_argnums=0)
    return gpu_step.lower(shapes(state, rep), shapes(batch, data)).compile(GPU_COMPILE_OPTIONS)


def torch_saved_gib(case: str, args) -> float:
    """GiB of the distinct tensors autograd saves in PyTorch's forward pass (and loss)."""
    import torch

    bargs = bench_args(case, args)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if case == "seg":
            import numpy as np

            from bench.segmenter_torch import TorchPSPNet

            w = segmenter_step._widths(bargs)
            model = TorchPSPNet(segmenter_step._blocks(bargs), w["base_width"],
                                w["stem_width"], w["channels"], w["aux_channels"],
                                bargs.num_classes).train()
            image, mask = segmenter_step.make_batch(bargs)
            with step_report.torch_autocast(bargs.dtype, "cpu"):
                logits, aux = model(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))
                loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(
                    mask.astype(np.int64)))
        else:
            _, _, loss_fn, _ = classifier_step.build_torch(bargs)
            loss = loss_fn()
    del loss
    return sum(storages.values()) / 2**30


def torch_saved_fit_gib(case: str, args, batches: tuple[int, int]) -> float:
    """:func:`torch_saved_gib` at ``args.batch`` extrapolated from two smaller ``batches``, for
    sizes whose saved tensors do not fit this machine's memory. Saved bytes are affine in the
    batch: the weights (or, under AMP, their bf16 copies) are saved once, activations once
    per image."""
    low, high = (torch_saved_gib(case, argparse.Namespace(**{**vars(args), "batch": b}))
                 for b in batches)
    per_image = (high - low) / (batches[1] - batches[0])
    return low + (args.batch - batches[0]) * per_image


def parse_batches(text: str) -> tuple[int, int] | None:
    """``--torch_fit_batches``: ``""`` (measure at ``--batch``) or two increasing batches."""
    if not text:
        return None
    batches = tuple(int(b) for b in text.split(","))
    if len(batches) != 2 or not 0 < batches[0] < batches[1]:
        raise SystemExit(f"--torch_fit_batches wants two increasing batch sizes, got {text!r}")
    return batches


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--remat", default="off,on",
                        help="which remat settings to compile: off, on or off,on")
    parser.add_argument("--keep_remat_barriers", type=int, default=1,
                        help="1: compile with XLA's cse_barrier_expander disabled (see above)")
    parser.add_argument("--gpu_target", default="",
                        help="GpuTargetConfigProto text file: compile for that GPU (see above)")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--torch_fit_batches", default="",
                        help="e.g. 2,4: PyTorch's saved bytes measured at these two batches "
                             "and extrapolated to --batch (affine in the batch)")
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    args.torch_fit_batches = parse_batches(args.torch_fit_batches)
    if args.gpu_target:
        # The models are built on the CPU (only their shapes reach the GPU compile), which
        # also lets the CUDA plugin load where there is no GPU (it skips its device checks).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = {}
    where = (f"compiled for the GPU of {args.gpu_target}, deviceless" if args.gpu_target else
             "CPU compile; remat barriers "
             f"{'kept' if args.keep_remat_barriers else 'XLA default'}")
    if args.torch_fit_batches:
        where += "; PyTorch extrapolated from batches %d and %d" % args.torch_fit_batches
    print(f"crop {args.crop}, batch {args.batch}, jax {jax.__version__} ({where}; GiB)")
    print("| step | dtype | remat | XLA temp | XLA arguments | XLA output | "
          "PyTorch saved activations |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            child_args = {**vars(args), "dtype": dtype, "remat": False}
            saved = (None if args.skip_torch
                     else step_report.in_child(_torch_child, (case, child_args)))
            for remat in args.remat.split(","):
                child_args["remat"] = remat == "on"
                jax_mem = step_report.in_child(_jax_child, (case, child_args))
                results[f"{case}/{dtype}/remat_{remat}"] = {"jax": jax_mem,
                                                            "torch_saved_gib": saved}
                torch_cell = "-" if saved is None else f"{saved:.2f}"
                print(f"| {case} | {dtype} | {remat} | {jax_mem['temp']:.2f} | "
                      f"{jax_mem['argument']:.2f} | {jax_mem['output']:.2f} | {torch_cell} |",
                      flush=True)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _jax_child(case_args):
    case, args = case_args
    return jax_memory(case, argparse.Namespace(**args))


def _torch_child(case_args):
    case, args = case_args
    args = argparse.Namespace(**args)
    if args.torch_fit_batches:
        return torch_saved_fit_gib(case, args, args.torch_fit_batches)
    return torch_saved_gib(case, args)


if __name__ == "__main__":
    main()
