"""One PSPNet training step: the ``seg`` stage's own jitted step (pmm_jax) and the same network
in PyTorch; what ``bench.suite``'s ``pspnet`` rows time.

JAX side: exactly what ``pmm_jax.stages.seg.train_segmenter`` hands ``trainer.train``: the
model from ``segmenter.build_model`` (PSPNet + FCN auxiliary head on mmseg's ResNetV1c, the
config's ``compute_dtype``), ``segmenter.make_optimizer`` (mmseg's poly SGD, frozen stages
masked), the ``ce`` run's ``losses.run_loss`` (decode + 0.4 x auxiliary cross-entropy on logits
upsampled to the crop) and ``trainer.make_step`` (the jitted, donated step, state replicated
and batch sharded over every device), with configs/voc.py's ``seg`` settings
(read through ``bench/config_values.py``). PyTorch side:
``bench/segmenter_torch.py``, same layout, BatchNorm in training mode, SGD momentum 0.9 with
weight decay on every parameter (mmseg's), the same loss.

``--dtype``: float32 (default) or bfloat16: ``config.compute_dtype`` on the JAX side (bf16
convolutions, float32 parameters, BN statistics, logits and loss) and PyTorch AMP
(``torch.autocast(device, torch.bfloat16)``) on the other. ``--width_div`` divides every
channel count (stem, stages, heads), ``--blocks`` overrides the depth, so a CPU run stays
short; the defaults are the paper's ResNet101 at crop 512, batch 16.

``run_jax`` / ``run_torch`` (each run by the suite in its own spawned process, so peak memory
is its own) time ``--warmup`` untimed steps (compilation before them for JAX), then
``--steps`` timed ones, and report through ``bench/step_report.py``. Only jax, flax, optax,
orbax, numpy and torch need be installed (no TensorFlow, clu, ml_collections or pydensecrf).
"""

from __future__ import annotations

import argparse

from bench import config_values, step_report
from bench.config_values import AttrDict as Section


def voc_seg():
    """configs/voc.py's ``seg`` section (its optimiser, loss and head settings)."""
    return config_values.get_config("voc").seg


def _widths(args):
    d = args.width_div
    return dict(base_width=64 // d, stem_width=64 // d, channels=512 // d, aux_channels=256 // d)


def _blocks(args):
    return tuple(int(b) for b in args.blocks.split(","))


def seg_config(args) -> Section:
    """The slice of a pmm_jax config the seg stage's step reads: configs/voc.py's ``seg``
    settings on ResNetV1c (``args.blocks``, widths / ``args.width_div``, nothing frozen)."""
    w, voc = _widths(args), voc_seg()
    backbone = Section(name="resnet101", blocks=_blocks(args), base_width=w["base_width"],
                       stem_width=w["stem_width"], frozen_stages=-1)
    model = Section(backbone=backbone, init_from="", bins=tuple(voc.model.bins),
                    channels=w["channels"], dropout=voc.model.dropout,
                    aux_channels=w["aux_channels"], remat=getattr(args, "remat", False))
    seg = Section(model=model, pus=Section(mode="none", beta=0.5, kappa=0.5, reduction="all"),
                  **{k: voc[k] for k in ("lr", "min_lr", "momentum", "weight_decay",
                                             "decay_1d", "num_steps", "aux_weight")})
    return Section(seed=0, compute_dtype=args.dtype, seg=seg,
                   data=Section(num_classes=args.num_classes))


def make_batch(args):
    """The fixed NHWC float32 images and int32 label masks (numpy)."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.batch, args.crop, args.crop, 3)).astype(np.float32)
    mask = rng.integers(0, args.num_classes, (args.batch, args.crop, args.crop)).astype(np.int32)
    return image, mask


def build_jax(args):
    """``(step, state, batch)``: the seg stage's jitted train step, its replicated train state
    and the sharded batch."""
    from flax import nnx

    from pmm_jax.segmentation import losses, segmenter
    from pmm_jax.training import sharding as shd
    from pmm_jax.training import trainer

    config = seg_config(args)
    model = segmenter.build_model(config, config.seed)
    tx, _ = segmenter.make_optimizer(config, model)
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    mesh = shd.make_mesh()
    state = shd.replicate(state, mesh)
    step = trainer.make_step(graphdef, losses.run_loss(config, "ce"), config.seed, mesh)
    image, mask = make_batch(args)
    return step, state, shd.shard_batch({"image": image, "mask": mask}, mesh)


def run_jax(args) -> dict:
    """images/s, loss, peak memory, XLA memory and FLOPs of the seg stage's train step."""
    return step_report.time_jax(args, *build_jax(args))


def run_torch(args) -> dict:
    """images/s, loss and peak memory of the same network and step in PyTorch."""
    import torch

    from bench.segmenter_torch import TorchPSPNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, voc = _widths(args), voc_seg()
    torch.manual_seed(0)
    model = TorchPSPNet(_blocks(args), w["base_width"], w["stem_width"], w["channels"],
                        w["aux_channels"], args.num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=voc.lr, momentum=voc.momentum,
                          weight_decay=voc.weight_decay)
    image, mask = make_batch(args)
    image = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device)
    mask = torch.from_numpy(mask).long().to(device)
    ce = torch.nn.functional.cross_entropy

    def step(_):
        opt.zero_grad(set_to_none=True)
        with step_report.torch_autocast(args.dtype, device):
            logits, aux = model(image)
            loss = (ce(logits, mask, ignore_index=255)
                    + voc.aux_weight * ce(aux, mask, ignore_index=255))
        loss.backward()
        opt.step()
        return loss

    return step_report.time_torch(args, device, step)


def parse_args(argv=None) -> argparse.Namespace:
    voc = config_values.get_config("voc")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width_div", type=int, default=1)
    parser.add_argument("--blocks", default=",".join(map(str, voc.seg.model.backbone.blocks)))
    parser.add_argument("--crop", type=int, default=voc.seg.crop_size)
    parser.add_argument("--batch", type=int, default=voc.seg.batch_size)
    parser.add_argument("--num_classes", type=int, default=voc.data.num_classes)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    step_report.add_common_args(parser)
    return parser.parse_args(argv)
