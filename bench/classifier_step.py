"""One CAM-classifier training step, pmm_jax (Flax NNX, the ``cls`` stage's jitted trainer step)
and the same network in PyTorch: what ``bench.suite``'s ``seam`` and ``plain`` rows time, and
a check that both sides do the same work.

The network is wide ResNet38-d (PMM's classifier dilations 2, 4, 2; every BatchNorm in
inference mode with frozen affine parameters, as the official code trains it). ``--dtype``:
float32 (default) or bfloat16, i.e. the model's ``compute_dtype`` on the JAX side
(``pmm_jax.training.precision``: bf16 convolutions, float32 parameters, heads and losses) and PyTorch
AMP (``torch.autocast(device, torch.bfloat16)`` around forward and loss) on the other.

* ``--method=seam`` (default, the VOC config's classifier): the SEAM model (CAM head + PCM),
  both views (the crop and its 0.3x copy) through the network, the official losses
  (classification, rvmin, ER, ECR) and SEAM's four-group poly SGD with conv1a/b2 frozen.
  JAX side: ``pmm_jax.cams.seam.SEAM``, ``seam.seam_loss`` and ``seam.make_optimizer`` through
  ``pmm_jax.training.trainer``'s jitted, donated, sharded step (the very function ``trainer.train``
  runs). PyTorch side: ``bench/classifier_torch.py`` (official layout, ``TorchSEAM``,
  the official loop body, parameter groups with ``requires_grad=False`` on frozen layers).
* ``--method=plain``: the ``plain`` classifier (Dropout2d + 1x1 CAM head, multilabel
  soft-margin on GAP) with ``optimizers.sgd_poly`` (one lr for every parameter, BN affine
  parameters included; weight decay on kernels only) on both sides.

The batch (random images, random multi-hot labels with at least one class) is fixed and
already on the device: no input pipeline is timed. ``run_jax`` / ``run_torch`` (each run by
the suite in its own spawned process) time ``warmup`` untimed and ``steps`` timed steps and
report through ``bench/step_report.py``. Full ResNet38 at crop 448 costs about 2.5 TFLOP per
image and SEAM step; ``--gpu`` is the paper's VOC setting (crop 448, batch 16, 3 warm-up and
10 timed steps), the defaults are sized for a small CPU (crop 128, batch 2). Only jax, flax,
optax, orbax, numpy and torch need be installed.

The command line checks the work instead of timing it: with a small network it copies the
PyTorch weights into the Flax model and compares the loss and every trained parameter's
gradient (dropout off)::

    python -m bench.classifier_step --method=seam --width_div=32 --blocks=1,1,1,1 --crop=48
"""

from __future__ import annotations

import argparse

from bench import config_values, step_report

# Poly schedules are built for this many steps, so the learning rate never reaches 0 here.
SCHEDULE_STEPS = 10_000
CPU_SETTINGS = {"crop": 128, "batch": 2, "warmup": 1, "steps": 3}


def gpu_settings() -> dict:
    """``--gpu``'s defaults: configs/voc.py's classifier crop and batch, 3 + 10 steps."""
    cls = config_values.get_config("voc").cls
    return {"crop": cls.crop_size, "batch": cls.batch_size, "warmup": 3, "steps": 10}


def _blocks(args):
    return tuple(int(b) for b in args.blocks.split(","))


def make_batch(args):
    """The fixed NHWC float32 images and float32 multi-hot labels (numpy)."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.batch, args.crop, args.crop, 3)).astype(np.float32)
    labels = (rng.random((args.batch, args.num_classes)) < 0.2).astype(np.float32)
    labels[np.arange(args.batch), rng.integers(0, args.num_classes, args.batch)] = 1.0
    return image, labels


def jax_model(args):
    """``(model, tx, loss_fn)`` of the configured classifier, as the ``cls`` stage builds them."""
    from pmm_jax.cams import classifier, seam
    from pmm_jax.models import init_rngs
    from pmm_jax.models.cam_classifier import CAMClassifier
    from pmm_jax.models.resnet38 import ResNet38
    from pmm_jax.training import optimizers, precision

    rngs = init_rngs(0)
    backbone = ResNet38(width_div=args.width_div, blocks=_blocks(args),
                        remat=getattr(args, "remat", False), rngs=rngs)
    if args.method == "seam":
        model = seam.SEAM(backbone, args.num_classes, dropout=0.5, rngs=rngs)
        tx, _ = seam.make_optimizer(model, args.lr, SCHEDULE_STEPS,
                                    official_momentum=args.official_momentum)
        loss_fn = seam.seam_loss
    else:
        model = CAMClassifier(backbone, args.num_classes, dropout=0.5, rngs=rngs)
        tx, _ = optimizers.sgd_poly(args.lr, SCHEDULE_STEPS)
        loss_fn = classifier.plain_loss
    return precision.set_compute_dtype(model, getattr(args, "dtype", "float32")), tx, loss_fn


def build_jax(args):
    """``(step, state, batch)``: the trainer's jitted step for the configured classifier, its
    replicated train state and the sharded batch."""
    from flax import nnx

    from pmm_jax.training import sharding as shd
    from pmm_jax.training import trainer

    model, tx, loss_fn = jax_model(args)
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    mesh = shd.make_mesh()
    state = shd.replicate(state, mesh)
    step = trainer.make_step(graphdef, loss_fn, 0, mesh)
    image, labels = make_batch(args)
    batch = shd.shard_batch({"image": image, "labels": labels}, mesh)
    return step, state, batch


def run_jax(args) -> dict:
    """images/s, loss, peak memory, XLA memory and FLOPs of the jitted pmm_jax training step."""
    return step_report.time_jax(args, *build_jax(args))


def build_torch(args, device="cpu"):
    """``(model, optimizer, loss(), set_lr(step))`` for the same classifier in PyTorch."""
    import torch
    import torch.nn.functional as F

    from bench import classifier_torch as ct

    torch.manual_seed(0)
    kwargs = dict(div=args.width_div, blocks=_blocks(args), dilations=(2, 4, 2), dropout=0.5)
    image, labels = make_batch(args)
    image = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device)
    labels = torch.from_numpy(labels).to(device)
    if args.method == "seam":
        model = ct.TorchSEAM(args.num_classes, **kwargs).to(device)
        groups = ct.seam_param_groups(model, args.lr, 5e-4)
        forward = lambda: ct.seam_loss(model, image, labels)["loss"]  # noqa: E731
    else:
        model = ct.TorchCAMClassifier(args.num_classes, **kwargs).to(device)
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        for group in groups:
            group.update(lr=args.lr, mult=1.0)
        forward = lambda: F.multilabel_soft_margin_loss(model(image), labels)  # noqa: E731

    def loss():
        with step_report.torch_autocast(getattr(args, "dtype", "float32"), device):
            return forward()

    ct.train_mode(model)
    momentum = 5e-4 if args.official_momentum and args.method == "seam" else 0.9
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=momentum)

    def set_lr(step):
        for group in opt.param_groups:
            group["lr"] = args.lr * group["mult"] * (1 - step / SCHEDULE_STEPS) ** 0.9

    return model, opt, loss, set_lr


def run_torch(args) -> dict:
    """images/s and peak memory of the same network and step in PyTorch."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, opt, loss_fn, set_lr = build_torch(args, device)

    def step(i):
        set_lr(i)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return step_report.time_torch(args, device, step)


def torch_key(path) -> str:
    """State-dict key of a Flax parameter path (the Flax CAM head ``classifier`` is ``fc8``)."""
    from pmm_jax.tools import weight_conversion

    path = ".".join(map(str, path))
    if path.startswith("classifier."):
        path = "fc8" + path[len("classifier"):]
    return weight_conversion.torch_key(path)


def jax_twin(args, torch_model):
    """The Flax model of :func:`jax_model`, built shape-only (nothing to initialise), holding
    ``torch_model``'s weights; dropout key streams are zero keys (unused in eval mode)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pmm_jax.tools import weight_conversion

    abstract = nnx.eval_shape(lambda: jax_model(args)[0])
    graphdef, weights, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    source = torch_model.state_dict()
    weights = nnx.from_flat_state([
        (path, var.replace(jnp.asarray(weight_conversion.from_torch_layout(
            source[torch_key(path)].detach().cpu().numpy()))))
        for path, var in nnx.to_flat_state(weights)])
    rest = jax.tree_util.tree_map(
        lambda x: (jax.random.key(0, impl="rbg") if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                   else jnp.zeros(x.shape, x.dtype)), rest)
    return nnx.merge(graphdef, weights, rest)


def check_same_work(args) -> dict:
    """Runs both sides' loss and gradients once with the same weights and batch, dropout off,
    and returns ``{"loss_jax", "loss_torch", "max_grad_err"}`` (the largest gradient error of
    any trained parameter relative to that parameter's largest gradient). Raises
    AssertionError when the trained parameter sets differ."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from pmm_jax.cams import classifier, seam
    from pmm_jax.tools import weight_conversion

    torch_model, _, torch_loss, _ = build_torch(args)
    model = jax_twin(args, torch_model)
    loss_fn = seam.seam_loss if args.method == "seam" else classifier.plain_loss
    torch_model.eval()
    model.eval()
    loss = torch_loss()
    loss.backward()
    image, labels = make_batch(args)
    batch = {"image": jnp.asarray(image), "labels": jnp.asarray(labels)}
    (ours, _), grads = nnx.jit(nnx.value_and_grad(
        lambda m: loss_fn(m, batch, None), has_aux=True))(model)
    grads = {torch_key(path): v[...] for path, v in nnx.to_flat_state(grads)}
    trained = {k: p for k, p in torch_model.named_parameters() if p.requires_grad}
    errors = {}
    for key, param in trained.items():
        ref = weight_conversion.from_torch_layout(param.grad.numpy())
        errors[key] = float(np.max(np.abs(np.asarray(grads[key]) - ref))
                            / (np.max(np.abs(ref)) + 1e-12))
    return {"loss_jax": float(ours), "loss_torch": loss.item(),
            "max_grad_err": max(errors.values()), "worst": max(errors, key=errors.get),
            "trained": len(trained)}


def parse_args(argv=None) -> argparse.Namespace:
    voc, gpu = config_values.get_config("voc"), gpu_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("seam", "plain"), default="seam")
    parser.add_argument("--width_div", type=int, default=1)
    parser.add_argument("--blocks", default=",".join(map(str, voc.cls.model.backbone.blocks)),
                        help="basic blocks of b2..b5")
    parser.add_argument("--gpu", action="store_true",
                        help=f"full-size defaults {gpu} (else {CPU_SETTINGS})")
    parser.add_argument("--crop", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--num_classes", type=int, default=voc.data.num_classes - 1,
                        help="foreground classes")
    parser.add_argument("--lr", type=float, default=voc.cls.lr)
    parser.add_argument("--official_momentum", action="store_true",
                        help="SEAM: momentum 5e-4 as the official optimiser (default 0.9)")
    step_report.add_common_args(parser)
    args = parser.parse_args(argv)
    for key, value in (gpu if args.gpu else CPU_SETTINGS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    """Both sides' loss and gradients once with the same weights (use a small network)."""
    args = parse_args(argv)
    result = step_report.in_child(check_same_work, args)
    print(f"{args.method}: loss jax {result['loss_jax']:.6f}, torch {result['loss_torch']:.6f}; "
          f"{result['trained']} trained parameters, largest relative gradient error "
          f"{result['max_grad_err']:.2e} ({result['worst']})")
    ok = (abs(result["loss_jax"] - result["loss_torch"]) <= 1e-4 * abs(result["loss_torch"])
          and result["max_grad_err"] < 1e-3)
    if not ok:
        raise SystemExit("the two sides disagree")
    return result


if __name__ == "__main__":
    main()
