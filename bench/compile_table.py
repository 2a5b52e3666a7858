"""`python -m bench.compile_table`: the paper-scale programs compiled for TPU slices and NVIDIA
GPUs on a machine that has neither, their per-chip memory, FLOPs and roofline in one table.

    python -m bench.compile_table --out=DIR --programs=pspnet_r101_ce,seam --targets=v5e:2x4
    python -m bench.compile_table --out=DIR --quick          # every program, tiny widths

XLA compiles without the hardware: ``jax.experimental.topologies.get_topology_desc`` describes
a TPU slice from libtpu (``pip install -e ".[tpu]"``), and XLA's GPU target description
(``bench/step_memory.py --gpu_target``, needs JAX's CUDA plugin) a GPU. Each program is what
the stages run under ``configs/voc.py`` (read from that file, precision set explicitly,
``compute_dtype="auto"`` being bfloat16 on a TPU/GPU): built shape-only (``nnx.eval_shape``),
jitted by the stage's own function (``trainer.make_step`` with the trainer's shardings: state
replicated and donated, batch split over the ``data`` axis of a mesh of every chip of the
slice; ``multicrop_inference.chunk_step``; ``dense_crf_jax.crf_posterior``), lowered on
``jax.ShapeDtypeStruct``s with those shardings and compiled by XLA's real TPU/GPU pipeline.

Per row (``results.json`` / ``results.md``): per-chip argument, temporary and output bytes of
``compiled.memory_analysis()`` and their sum less the donated (aliased) bytes against the
chip's memory (fits / does not fit); FLOPs and bytes accessed per chip per step from the
compiled program's ``cost_analysis()`` (after SPMD partitioning, remat recomputation
included); the roofline lower bound on one step, ``max(FLOPs / peak bf16 FLOP/s, bytes /
HBM bandwidth)`` from :data:`CHIPS` (which bound binds); that bound times the recipe's step
count (:func:`recipe_steps`) in hours; compile seconds with the load average; XLA flags;
jax/jaxlib/libtpu versions; date. Nothing runs on a chip: "compiled, not run".

Programs (:data:`PROGRAMS`): the ``cls`` step (SEAM on ResNet38-d, and on ScaleNet101 with a
stand-in structure), the ``seg`` step (PSPNet on ResNetV1c-101 and on Res2Net101, CE and
PUS), one multi-crop CAM chunk (``cam.multicrop.tile_batch`` tiles, mirrored), the JAX dense
CRF of one VOC-sized image with PPMG's label sets. ``--pod``: the ``configs/voc.py:pod<chips>``
variant for the target's chip count (docs/pod_scale.md), the way a slice with more chips than
the paper's batch runs the recipe. ``--quick``: widths / 32 (classifier) and / 16
(segmenter), one block per stage, crops 64, the CAM canvas 128, the CRF image 64x64: minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
from typing import Callable

# libtpu on a machine without a TPU: no metadata-server queries, a host name for the worker
# list it otherwise warns about, and several processes may load it at once (pytest workers).
# JAX itself computes on the CPU (the models are built there, shape-only).
TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": "cpu"}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TARGET_DIR = os.path.join(REPO, "bench", "gpu_targets")
VOC_TRAIN_IMAGES = 10582  # train_aug: what the CAM and pseudo-mask stages run over


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's memory, dense bf16 peak and memory bandwidth (docs/benchmarks.md sources)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    hbm_gb_s: float


# Vendor figures per chip (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e system architecture
# pages; NVIDIA H100 SXM5 and A100 SXM4 80GB data sheets; dense, no sparsity).
CHIPS = {
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v4": Chip("TPU v4", 32, 275, 1200),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
    "h100": Chip("NVIDIA H100 SXM", 80, 989, 3350),
    "a100": Chip("NVIDIA A100 SXM 80GB", 80, 312, 2039),
}
TPU_TARGETS = ("v5e:2x2", "v5e:2x4", "v4:2x2x1", "v5p:2x2x1", "v6e:2x2", "v5e:8x8")
GPU_TARGETS = ("h100", "a100")
TARGETS = TPU_TARGETS + GPU_TARGETS


def chip_of(target: str) -> Chip:
    return CHIPS[target.split(":")[0]]


# --------------------------------------------------------------------------------------------
# The configs' programs


def voc_config(variant: str = "paper"):
    """``configs/voc.py``'s ``get_config(variant)``, loaded from the file (configs/ is no
    package)."""
    spec = importlib.util.spec_from_file_location("voc_config", os.path.join(REPO, "configs",
                                                                             "voc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def scalenet_standin(layers, width_div: int) -> list[list[int]]:
    """A ScaleNet101 structure for shapes only: every block's planes split evenly over the four
    scales, ImageNet sides 56, 28, 28, 28 (the published json allocates them unevenly, so its
    FLOPs differ somewhat; the json is not shipped with the package)."""
    entries = []
    for k, depth in enumerate(layers):
        planes = 64 * 2 ** k // width_div
        widths = [planes // 4 + (i < planes % 4) for i in range(4)]
        entries += [[*widths, 56 if k == 0 else 28]] * depth
    return entries


def program_config(program: str, *, dtype: str, remat: bool, quick: bool, pod_chips: int = 0):
    """``configs/voc.py`` (its ``pod<chips>`` variant when ``pod_chips``) as ``program`` runs
    it: ``compute_dtype`` and both models' ``remat`` set, the program's backbone, and with
    ``quick`` every size shrunk (:data:`QUICK`)."""
    config = voc_config(f"pod{pod_chips}" if pod_chips else "paper")
    config.compute_dtype = dtype
    config.cls.model.remat = config.seg.model.remat = remat
    spec = PROGRAMS[program]
    cls_backbone, seg_backbone = config.cls.model.backbone, config.seg.model.backbone
    if quick:
        cls_backbone.update(width_div=QUICK["cls_width_div"], blocks=(1, 1, 1, 1))
        seg_backbone.update(width_div=QUICK["seg_width_div"], blocks=(1, 1, 1, 1))
        config.seg.model.channels //= QUICK["seg_width_div"]
        config.seg.model.aux_channels //= QUICK["seg_width_div"]
        config.cls.crop_size = config.seg.crop_size = QUICK["crop"]
        config.cam.multicrop.crop = config.cam.multicrop.stride = QUICK["crop"]
        config.data.eval_pad_to = (QUICK["canvas"], QUICK["canvas"])
    if spec.get("cls_backbone") == "scalenet101":
        div, layers = cls_backbone.width_div, cls_backbone.blocks
        config.cls.model.backbone = type(cls_backbone)(dict(
            name="scalenet101", width_div=div, layers=layers,
            structure=scalenet_standin(layers, div)))
        config.cls.model.dropout = 0.0  # PMM's ScaleNet classifier (configs/voc.py)
    if "seg_backbone" in spec:
        seg_backbone.name = spec["seg_backbone"]
        if spec["seg_backbone"] == "resnet101":  # ResNetV1c: no width_div key
            blocks = seg_backbone.blocks
            base = 64 // (seg_backbone.width_div if quick else 1)
            config.seg.model.backbone = type(seg_backbone)(dict(
                name="resnet101", blocks=blocks, base_width=base, stem_width=base,
                frozen_stages=-1))
    return config


QUICK = {"cls_width_div": 32, "seg_width_div": 16, "crop": 64, "canvas": 128, "crf_hw": (64, 64)}


def _shapes(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _train_step(model_fn, optimizer_fn, loss_fn, batch_shapes, config, mesh):
    """The trainer's jitted step on ``mesh`` and its abstract arguments: the model and
    optimiser built shape-only, the state replicated, the batch split over ``data``."""
    from flax import nnx

    from pmm_jax.training import sharding as shd
    from pmm_jax.training import trainer

    def objects():
        model = model_fn()
        model.train()
        return model, nnx.Optimizer(model, optimizer_fn(model), wrt=nnx.Param)

    graphdef, state = nnx.split(nnx.eval_shape(objects))
    step = trainer.make_step(graphdef, loss_fn, config.seed, mesh)
    rep, data = shd.replicated(mesh), shd.data_sharding(mesh)
    batch = {k: jax_sds(shape, dtype, data) for k, (shape, dtype) in batch_shapes.items()}
    return step, (_shapes(state, rep), batch)


def jax_sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def cls_step(config, mesh):
    """The ``cls`` stage's step (``stages.cls.run``: SEAM, its optimiser and loss) on a batch
    of ``cls.batch_size`` tiles of ``cls.crop_size`` (multi-crop and random-scale crops alike)."""
    import numpy as np

    from pmm_jax.cams import seam
    from pmm_jax.stages import cls

    cfg, fg = config.cls, config.data.num_classes - 1
    batch = {"image": ((cfg.batch_size, cfg.crop_size, cfg.crop_size, 3), np.float32),
             "labels": ((cfg.batch_size, fg), np.float32)}
    optimizer = lambda model: seam.make_optimizer(  # noqa: E731  (as stages.cls.run)
        model, cfg.lr, cfg.num_steps, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        official_momentum=cfg.get("official_momentum", False))[0]
    return _train_step(lambda: cls.build_model(config, config.seed), optimizer, seam.seam_loss,
                       batch, config, mesh)


def seg_step(loss: str):
    """The ``seg`` stage's step (PSPNet, mmseg's poly SGD, ``seg.run_loss(config, loss)``) on
    ``seg.batch_size`` crops of ``seg.crop_size``."""
    def build(config, mesh):
        import numpy as np

        from pmm_jax.stages import seg

        cfg = config.seg
        batch = {"image": ((cfg.batch_size, cfg.crop_size, cfg.crop_size, 3), np.float32),
                 "mask": ((cfg.batch_size, cfg.crop_size, cfg.crop_size), np.int32)}
        return _train_step(lambda: seg.build_model(config, config.seed),
                           lambda model: seg.make_optimizer(config, model)[0],
                           seg.run_loss(config, loss), batch, config, mesh)

    return build


def cam_chunk(config, mesh):
    """One step of the ``cam`` stage's multi-crop inference (``multicrop_inference.chunk_step``):
    ``cam.multicrop.tile_batch`` tiles over the mesh, each also mirrored, cut from a canvas of
    ``data.eval_pad_to`` per chip and added to its CAM sums."""
    import numpy as np
    from flax import nnx

    from pmm_jax.cams import multicrop_inference
    from pmm_jax.stages import cam, cls
    from pmm_jax.training import sharding as shd

    mc, chips = config.cam.multicrop, mesh.devices.size
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls.build_model(config, config.seed)))
    step = multicrop_inference.chunk_step(graphdef, cam.model_cam, mc.crop,
                                          config.cam.flip, mesh)
    rep, data = shd.replicated(mesh), shd.data_sharding(mesh)
    h, w = config.data.eval_pad_to
    fg = config.data.num_classes - 1
    tiles = max(chips, mc.tile_batch // chips * chips)
    args = (_shapes(state, rep), jax_sds((chips, h, w, 3), np.uint8, data),
            jax_sds((chips, h, w, fg), np.float32, data), jax_sds((chips, h, w), np.float32, data),
            jax_sds((tiles, len(multicrop_inference.TILE_FIELDS)), np.int32, data))
    return step, args


# PPMG: one binary CRF per present class, the sets padded to a power of two (generator.jax_crfs);
# two present classes, a VOC image of 500x375 padded to generator.PAD_MULTIPLE.
CRF_LABEL_SETS = 2


def crf_image(config, mesh):
    """``dense_crf_jax.crf_posterior`` of one VOC-sized image (375x500 padded to the pipeline's
    64-pixel bucket, 384x512) with PPMG's label sets (:data:`CRF_LABEL_SETS` binary CRFs) and
    ``config.pseudo.crf``'s parameters, on one chip, lattice tables at ``hard_capacity`` (never
    too small: the memory bound for any image of that size)."""
    import jax
    import numpy as np

    from pmm_jax.masks import dense_crf_jax, generator
    from pmm_jax.masks.dense_crf import CRFParams

    h, w = (config.get("crf_hw") or (-(-375 // generator.PAD_MULTIPLE) * generator.PAD_MULTIPLE,
                                     -(-500 // generator.PAD_MULTIPLE) * generator.PAD_MULTIPLE))
    params = CRFParams(**dict(config.pseudo.crf))
    chip = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    capacity = dense_crf_jax.hard_capacity(h, w)
    step = jax.jit(lambda image, probs, valid: dense_crf_jax.crf_posterior(
        image, probs, params, capacity, valid))
    return step, (jax_sds((h, w, 3), np.uint8, chip),
                  jax_sds((CRF_LABEL_SETS, 2, h, w), np.float32, chip),
                  jax_sds((h, w), bool, chip))


# name -> {"build": (config, mesh) -> (jitted, abstract args), "what", "kind", backbones}.
# kind: "cls"/"seg" (a train step: the stage's num_steps), "cam" (chunks over train_aug),
# "crf" (one image on one chip, over train_aug). The pseudo-mask core on the device is added
# here as ("pseudo_core", kind "crf"-like: one image) once it runs there.
PROGRAMS = {
    "seam": {"build": cls_step, "kind": "cls",
             "what": "cls step: SEAM, ResNet38-d (configs/voc.py)"},
    "seam_scalenet": {"build": cls_step, "kind": "cls", "cls_backbone": "scalenet101",
                      "what": "cls step: SEAM, ScaleNet101 (stand-in structure)"},
    "pspnet_r101_ce": {"build": seg_step("ce"), "kind": "seg", "seg_backbone": "resnet101",
                       "what": "seg step: PSPNet, ResNetV1c-101, CE"},
    "pspnet_r101_pus": {"build": seg_step("pus"), "kind": "seg", "seg_backbone": "resnet101",
                        "what": "seg step: PSPNet, ResNetV1c-101, PUS"},
    "pspnet_res2net_ce": {"build": seg_step("ce"), "kind": "seg", "seg_backbone": "res2net101",
                          "what": "seg step: PSPNet, Res2Net101 (configs/voc.py), CE"},
    "pspnet_res2net_pus": {"build": seg_step("pus"), "kind": "seg",
                           "seg_backbone": "res2net101",
                           "what": "seg step: PSPNet, Res2Net101 (configs/voc.py), PUS"},
    "cam_multicrop": {"build": cam_chunk, "kind": "cam",
                      "what": "cam: one multi-crop chunk (tile_batch tiles + flips, SEAM R38-d)"},
    "crf_ppmg": {"build": crf_image, "kind": "crf",
                 "what": "JAX dense CRF, one 384x512 image, PPMG label sets"},
}


def tiles_per_image(config) -> int:
    """Multi-crop tiles of one 500x375 VOC image at the config's scales (before mirroring)."""
    from pmm_jax.cams import multicrop_tiling

    mc = config.cam.multicrop
    return sum(len(multicrop_tiling.tile_boxes(500, 375, s, mc.crop, mc.stride))
               for s in mc.scales)


def recipe_steps(program: str, config, chips: int) -> tuple[int, str]:
    """``(steps, what)``: how many times the recipe runs this program (one training run of
    its stage; the CAMs / CRFs of train_aug)."""
    kind = PROGRAMS[program]["kind"]
    if kind in ("cls", "seg"):
        return int(config[kind].num_steps), f"{kind}.num_steps"
    if kind == "cam":
        tiles = max(chips, config.cam.multicrop.tile_batch // chips * chips)
        return (math.ceil(VOC_TRAIN_IMAGES * tiles_per_image(config) / tiles),
                f"{VOC_TRAIN_IMAGES} images x {tiles_per_image(config)} tiles / {tiles} per step")
    return (math.ceil(VOC_TRAIN_IMAGES / chips),
            f"{VOC_TRAIN_IMAGES} images, one per chip at a time")


# --------------------------------------------------------------------------------------------
# Targets and the compile


def target_mesh(target: str):
    """A mesh over every chip of ``target`` (a TPU topology name or a GPU of GPU_TARGETS),
    named like the trainer's (``sharding.make_mesh``: one ``data`` axis)."""
    import jax
    import numpy as np

    from pmm_jax.training import sharding as shd

    if target in GPU_TARGETS:
        from bench import step_memory

        return step_memory.gpu_mesh(gpu_target_file(target))
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(topology_name=target, platform="tpu")
    return jax.sharding.Mesh(np.asarray(topology.devices), (shd.DATA_AXIS,))


def gpu_target_file(target: str) -> str:
    return os.path.join(GPU_TARGET_DIR, f"{target}.txtpb")


def compile_options(target: str) -> dict:
    if target in GPU_TARGETS:
        from bench import step_memory

        return dict(step_memory.GPU_COMPILE_OPTIONS)
    return {}


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cost(compiled) -> dict:
    """``flops`` and ``bytes accessed`` per chip of a compiled program (XLA's cost analysis
    after SPMD partitioning; {} where the backend has none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis)
        return {}
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {k: float(v) for k, v in (analysis or {}).items() if k in ("flops", "bytes accessed")}


def memory(compiled) -> dict:
    """Per-chip bytes of ``compiled.memory_analysis()`` and ``total`` = argument + output +
    temp - alias (the donated state is updated in place)."""
    stats = compiled.memory_analysis()
    out = {k: int(getattr(stats, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def compile_program(program: str, target: str, *, dtype: str = "bfloat16", remat: bool = True,
                    quick: bool = False, pod: bool = False):
    """``(compiled, config, mesh, seconds)`` of ``program`` for ``target``; seconds: build,
    lowering and XLA's compile."""
    mesh = target_mesh(target)
    config = program_config(program, dtype=dtype, remat=remat, quick=quick,
                            pod_chips=mesh.devices.size if pod else 0)
    if quick and PROGRAMS[program]["kind"] == "crf":
        config.crf_hw = QUICK["crf_hw"]
    start = time.perf_counter()
    fn, args = PROGRAMS[program]["build"](config, mesh)
    lowered = fn.lower(*args)
    compiled = lowered.compile(compile_options(target) or None)
    return compiled, config, mesh, time.perf_counter() - start


def row_figures(program: str, target: str, *, dtype: str = "bfloat16", remat: bool = True,
                quick: bool = False, pod: bool = False) -> dict:
    """Every figure of one row (see the module docstring)."""
    load_before = os.getloadavg()
    compiled, config, mesh, seconds = compile_program(
        program, target, dtype=dtype, remat=remat, quick=quick, pod=pod)
    chip, chips = chip_of(target), mesh.devices.size
    mem, per_chip = memory(compiled), cost(compiled)
    flops, moved = per_chip.get("flops"), per_chip.get("bytes accessed")
    t_flops = None if flops is None else flops / (chip.bf16_tflops * 1e12)
    t_memory = None if moved is None else moved / (chip.hbm_gb_s * 1e9)
    bound = max((t for t in (t_flops, t_memory) if t is not None), default=None)
    steps, steps_what = recipe_steps(program, config, chips)
    kind = PROGRAMS[program]["kind"]
    batch = config[kind].batch_size if kind in ("cls", "seg") else None
    return {
        "program": program, "what": PROGRAMS[program]["what"], "target": target,
        "chip": dataclasses.asdict(chip), "chips": chips,
        "processes": len({d.process_index for d in mesh.devices.flat}),
        # the CRF computes in float32 whatever compute_dtype says; remat acts on training only
        "dtype": "float32" if kind == "crf" else dtype,
        "remat": remat if kind in ("cls", "seg") else None, "quick": quick, "pod": pod,
        "global_batch": batch, "per_chip_batch": None if batch is None else batch / chips,
        "lr": config[kind].lr if kind in ("cls", "seg") else None,
        "memory_bytes": mem, "memory_gib": {k: v / 2**30 for k, v in mem.items()},
        "fits": mem["total"] <= chip.memory_gib * 2**30,
        "flops_per_chip": flops, "bytes_accessed_per_chip": moved,
        "step_lower_bound_s": bound, "flops_bound_s": t_flops, "memory_bound_s": t_memory,
        "binds": (None if bound is None else "compute" if bound == t_flops else "memory"),
        "recipe_steps": steps, "recipe_steps_what": steps_what,
        "recipe_hours_lower_bound": None if bound is None else steps * bound / 3600,
        "compile_s": seconds, "load_before": load_before, "load_after": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
        "compile_options": compile_options(target),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _row_child(kwargs: dict) -> dict:
    os.environ.update({k: v for k, v in TPU_ENV.items() if k not in os.environ})
    return row_figures(**kwargs)


def skip_reason(target: str) -> str | None:
    """Why ``target`` cannot be compiled here (None: it can)."""
    if target in GPU_TARGETS:
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            return ('needs JAX\'s CUDA plugin: pip install -e ".[cuda12]" and XLA\'s target '
                    f"description in {os.path.relpath(gpu_target_file(target), REPO)} "
                    "(docs/benchmarks.md)")
        if not os.path.exists(gpu_target_file(target)):
            return f"no XLA GPU target description {gpu_target_file(target)}"
        return None
    if target not in TPU_TARGETS:
        return f"unknown target {target!r}; targets: {', '.join(TARGETS)}"
    if importlib.util.find_spec("libtpu") is None:
        return 'needs libtpu: pip install -e ".[tpu]"'
    return None


def run_row(program: str, target: str, **kwargs) -> dict:
    """One row in its own spawned process: ``{"status", "figures" | "error" | "reason"}``."""
    from bench import step_report

    reason = skip_reason(target)
    if reason:
        return {"status": "skipped", "reason": reason}
    try:
        return {"status": "ok", "figures": step_report.in_child(
            _row_child, dict(program=program, target=target, **kwargs))}
    except Exception as err:  # noqa: BLE001 - a row the compiler rejects is reported
        return {"status": "failed", "error": f"{type(err).__name__}: {str(err)[:2000]}"}


# --------------------------------------------------------------------------------------------
# The table


def _gib(x) -> str:
    return f"{x:.2f}"


def _sig(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def row_name(program: str, target: str, dtype: str = "bfloat16", remat: bool = True,
             pod: bool = False) -> str:
    tags = ([] if dtype == "bfloat16" else ["f32"]) + ([] if remat else ["no_remat"]) + (
        ["pod"] if pod else [])
    return "@".join([program, target]) + "".join(f"/{t}" for t in tags)


def markdown_rows(rows: dict) -> list[str]:
    """The compile table (one line per row) and the rows not compiled."""
    lines = ["| program | target (chips, hosts) | dtype, remat | batch (per chip) | "
             "argument / temp / output GiB | total GiB vs chip | fits | TFLOP / chip / step | "
             "GB accessed / chip | step lower bound (ms), binds | recipe steps | recipe hours "
             "(lower bound) | compile s (load 1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    other = []
    for name, result in rows.items():
        if result["status"] != "ok":
            other.append(f"- {name}: {result['status']}: {result.get('reason') or result.get('error')}")
            continue
        f = result["figures"]
        g = f["memory_gib"]
        batch = ("" if f["global_batch"] is None
                 else f"{f['global_batch']} ({f['per_chip_batch']:g})" + (" pod" if f["pod"] else ""))
        bound = f["step_lower_bound_s"]
        lines.append(" | ".join([
            f"| {f['program']}", f"{f['target']} ({f['chips']}, {f['processes']})",
            f"{f['dtype']}" + {True: ", remat", False: ", no remat", None: ""}[f["remat"]], batch,
            f"{_gib(g['argument'])} / {_gib(g['temp'])} / {_gib(g['output'])}",
            f"{_gib(g['total'])} / {f['chip']['memory_gib']:g}", "yes" if f["fits"] else "**NO**",
            _sig(None if f["flops_per_chip"] is None else f["flops_per_chip"] / 1e12),
            _sig(None if f["bytes_accessed_per_chip"] is None
                 else f["bytes_accessed_per_chip"] / 1e9),
            "n/a" if bound is None else f"{1000 * bound:.3g}, {f['binds']}",
            str(f["recipe_steps"]), _sig(f["recipe_hours_lower_bound"]),
            f"{f['compile_s']:.0f} ({f['load_before'][0]:.1f})"]) + " |")
    return lines + ([""] + other if other else [])


def chips_note() -> list[str]:
    return ["Chips (per chip: memory, dense bf16 peak, HBM bandwidth): " + "; ".join(
        f"{c.name} {c.memory_gib:g} GiB, {c.bf16_tflops:g} TFLOP/s, {c.hbm_gb_s:g} GB/s"
        for c in CHIPS.values()) + "."]


def write(out: str, report: dict) -> str:
    """``out/results.json`` and ``out/results.md`` (written atomically); the Markdown."""
    first = next((r["figures"] for r in report["rows"].values() if r["status"] == "ok"), {})
    text = "\n".join([
        "# Compile table (compiled, not run)", "",
        f"- command: `{report['command']}`", f"- date: {report['date']} (UTC)",
        f"- machine: {report['host']}, load average before "
        f"{', '.join(f'{x:.1f}' for x in report['load_before'])}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in (first.get('versions') or {}).items() if v)}",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; TPU compile options: XLA defaults; GPU: "
        "`xla_gpu_enable_triton_gemm=false`", "",
        *markdown_rows(report["rows"]), "", *chips_note(), ""])
    os.makedirs(out, exist_ok=True)
    for name, content in (("results.json", json.dumps(report, indent=1, default=str)),
                          ("results.md", text)):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, os.path.join(out, name))
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help="comma-separated: " + ",".join(PROGRAMS))
    parser.add_argument("--targets", default="v5e:2x4", help="comma-separated: " + ",".join(TARGETS))
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--no_remat", action="store_true")
    parser.add_argument("--pod", action="store_true",
                        help="configs/voc.py:pod<chips> (per-chip batch, scaled lr and steps)")
    parser.add_argument("--quick", action="store_true", help="tiny widths (minutes)")
    args = parser.parse_args(argv)
    for name, known in (("programs", PROGRAMS), ("targets", TARGETS)):
        bad = sorted(set(getattr(args, name).split(",")) - set(known))
        if bad:
            parser.error(f"unknown {name} {bad}; known: {', '.join(known)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"command": " ".join(["python -m bench.compile_table",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": started.isoformat(timespec="seconds"),
              "host": f"{os.cpu_count()} cores {platform.machine()}, {platform.platform()}",
              "load_before": os.getloadavg(), "rows": {}}
    for target in args.targets.split(","):
        for program in args.programs.split(","):
            name = row_name(program, target, args.dtype, not args.no_remat, args.pod)
            print(f"compile_table: {name} ...", file=sys.stderr, flush=True)
            report["rows"][name] = result = run_row(program, target, dtype=args.dtype,
                                                    remat=not args.no_remat, quick=args.quick,
                                                    pod=args.pod)
            print(f"compile_table: {name}: {result['status']}"
                  + (f" in {result['figures']['compile_s']:.0f} s" if result["status"] == "ok"
                     else f": {result.get('reason') or result.get('error')}"),
                  file=sys.stderr, flush=True)
    print(write(args.out, report))
    return report


if __name__ == "__main__":
    main()
