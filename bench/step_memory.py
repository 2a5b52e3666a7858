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

Cases: ``seam`` and ``plain`` (bench/classifier_step.py: full ResNet38-d) and ``seg``
(bench/segmenter_step.py: PSPNet, ResNetV1c-101), each at ``--crop``/``--batch``.
Activation memory grows linearly with batch x crop^2, so the figures scale to the paper's
crop 448 (SEAM) / 512 (seg) at batch 16 by ``16 * crop_paper^2 / (batch * crop^2)``.
"""

from __future__ import annotations

import argparse
import json

from bench import classifier_step, segmenter_step, step_report

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
    """XLA's buffer sizes (GiB) of the compiled (never executed) step of ``case``."""
    module = segmenter_step if case == "seg" else classifier_step
    step, state, batch = module.build_jax(bench_args(case, args))
    from pmm_jax.models.remat import KEEP_BARRIERS

    options = KEEP_BARRIERS if args.keep_remat_barriers else None
    return step_report.memory_gib(step.lower(state, batch).compile(options))


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
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--out_json", default="")
    args = parser.parse_args(argv)
    results = {}
    print(f"crop {args.crop}, batch {args.batch} (CPU compile; GiB; remat barriers "
          f"{'kept' if args.keep_remat_barriers else 'XLA default'})")
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
    return torch_saved_gib(case, argparse.Namespace(**args))


if __name__ == "__main__":
    main()
