"""Benchmark of one PSPNet training step: pmm_jax (Flax NNX, jit) against the same network in
PyTorch, on the same machine in one run.

The network is PSPNet (PSP head, FCN auxiliary head with loss weight 0.4) on mmseg's
ResNetV1c (deep stem, strides 1,2,1,1, dilations 1,1,2,4 with contract_dilation), float32,
BatchNorm in training mode, SGD momentum 0.9 with weight decay; the loss is per-pixel
cross-entropy on logits upsampled to the crop, as the seg stage trains. ``--width_div``
divides every channel count (stem, stages, heads), ``--blocks`` overrides the depth, so a
CPU run stays short; the defaults are the paper's ResNet101 at crop 512, batch 16.

Each framework runs in its own spawned process (so peak memory is its own): ``--warmup``
untimed steps (compilation included for JAX), then ``--steps`` timed ones. Reported:
images/s, peak memory (GPU: the framework's peak allocated bytes; CPU: the process's peak
RSS), and on a GPU, the FLOP rate of the JAX step (XLA's count of the lowered step) and its
share of ``--peak_tflops``.

    python -m bench.segmenter_step --width_div=4 --blocks=1,1,2,1 --crop=128 --batch=4   # CPU
    python -m bench.segmenter_step                                                       # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from bench import step_report


def _widths(args):
    d = args.width_div
    return dict(base_width=64 // d, stem_width=64 // d, channels=512 // d, aux_channels=256 // d)


def _blocks(args):
    return tuple(int(b) for b in args.blocks.split(","))


def run_jax(args) -> dict:
    """images/s, peak memory and FLOPs of the jitted pmm_jax training step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from pmm_jax import pmm
    from pmm_jax.models.pspnet import PSPNet, upsample_logits
    from pmm_jax.models.resnet_v1c import ResNetV1c

    w = _widths(args)
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    backbone = ResNetV1c(blocks=_blocks(args), base_width=w["base_width"],
                         stem_width=w["stem_width"], rngs=rngs)
    model = PSPNet(backbone, args.num_classes, channels=w["channels"],
                   aux_channels=w["aux_channels"], rngs=rngs)
    model.train()
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.005, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, image, mask):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            out = model(image)
            ce = lambda logits: pmm.pus_loss(upsample_logits(logits, mask.shape[1:3]), mask,  # noqa: E731
                                             mode="none", beta=0.0, kappa=1.0)
            return ce(out["logits"]) + 0.4 * ce(out["aux_logits"])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    jitted = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(args.batch, args.crop, args.crop, 3)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, args.num_classes, (args.batch, args.crop, args.crop)),
                       jnp.int32)
    compiled = jitted.lower(state, image, mask).compile()
    for _ in range(args.warmup):
        state, loss = compiled(state, image, mask)
    float(loss)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, loss = compiled(state, image, mask)
    float(loss)
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    flops = _step_flops(jitted, state, image, mask)
    return {"framework": f"jax {jax.__version__}", "device": device.device_kind,
            "images_per_s": args.batch * args.steps / seconds,
            "peak_mem_gib": (stats["peak_bytes_in_use"] if "peak_bytes_in_use" in stats
                             else step_report.max_rss_bytes()) / 2**30,
            "step_tflop": flops / 1e12, "tflops_per_s": flops * args.steps / seconds / 1e12}


def _step_flops(jitted, *step_args) -> float:
    """XLA's FLOP count of the step, lowered for the CPU: the GPU program's convolutions are
    cuDNN custom calls that its cost analysis does not count (same HLO graph either way)."""
    lowered = jitted.trace(*step_args).lower(lowering_platforms=("cpu",))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def run_torch(args) -> dict:
    """images/s and peak memory of the same network and step in PyTorch."""
    import torch

    from bench.segmenter_torch import TorchPSPNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = _widths(args)
    torch.manual_seed(0)
    model = TorchPSPNet(_blocks(args), w["base_width"], w["stem_width"], w["channels"],
                        w["aux_channels"], args.num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    image = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    mask = torch.randint(0, args.num_classes, (args.batch, args.crop, args.crop), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, aux = model(image)
        loss = (torch.nn.functional.cross_entropy(logits, mask, ignore_index=255)
                + 0.4 * torch.nn.functional.cross_entropy(aux, mask, ignore_index=255))
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        loss = step()
    loss.item()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else step_report.max_rss_bytes()
    return {"framework": f"torch {torch.__version__}",
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "images_per_s": args.batch * args.steps / seconds, "peak_mem_gib": peak / 2**30}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width_div", type=int, default=1)
    parser.add_argument("--blocks", default="3,4,23,3")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="the device's dense peak (H100/H200 SXM bf16: 989)")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--out_json", default="")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [step_report.in_child(run_jax, args)]
    if not args.skip_torch:
        rows.append(step_report.in_child(run_torch, args))
    step_report.print_table(rows, args, (
        f"PSPNet/ResNetV1c blocks {args.blocks}, width/{args.width_div}, crop {args.crop}, "
        f"batch {args.batch}, {args.steps} steps; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {{load}}"))


if __name__ == "__main__":
    main()
