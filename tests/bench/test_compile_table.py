"""bench/compile_table.py: the tiny-width classifier step, segmenter step and JAX dense CRF
compiled for a 2-host TPU slice (v5e:2x4, 8 chips) by XLA's TPU compiler (libtpu, from the
test extra), and the figures the table reports checked against an independent lowering of
the same program (built by the benchmarks' own builders, not by compile_table)."""

import os

import pytest

if os.environ.get("PMM_TPU_COMPILE_TESTS") != "1":
    pytest.skip("TPU compiles take tens of minutes on 2 cores: PMM_TPU_COMPILE_TESTS=1 with "
                "the [tpu] extra runs them", allow_module_level=True)
pytest.importorskip("libtpu")
pytestmark = pytest.mark.tpu_compile

# Only once the tests run: TPU_WORKER_HOSTNAMES in the environment makes every later
# `python -m pmm_jax.main` of this worker take itself for a Cloud TPU host.
# libtpu takes a lock file; both pytest workers (and the spawned row processes) load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import classifier_step, compile_table, segmenter_step  # noqa: E402
from pmm_jax.training import sharding as shd  # noqa: E402
from pmm_jax.training import trainer  # noqa: E402

TARGET = "v5e:2x4"


def row(program):
    result = compile_table.run_row(program, TARGET, quick=True)
    assert result["status"] == "ok", result
    return result["figures"]


def tpu_mesh():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=TARGET, platform="tpu").devices
    return jax.sharding.Mesh(np.asarray(devices), (shd.DATA_AXIS,))


def compile_train_step(graphdef, state, loss_fn, batch, mesh):
    """The trainer's step on ``mesh`` from concrete (CPU) objects' shapes."""
    rep, data = shd.replicated(mesh), shd.data_sharding(mesh)
    to_sds = lambda tree, s: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree)
    step = trainer.make_step(graphdef, loss_fn, 0, mesh)
    return step.lower(to_sds(state, rep), to_sds(batch, data)).compile()


def assert_same_compile(figures, compiled):
    """The row's memory and FLOPs are those of ``compiled``; its derived figures follow."""
    stats = compiled.memory_analysis()
    mem = figures["memory_bytes"]
    for key in ("argument", "output", "temp", "alias"):
        assert mem[key] == getattr(stats, f"{key}_size_in_bytes"), key
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert figures["fits"] == (mem["total"] <= 16 * 2**30)
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
    assert figures["flops_per_chip"] == pytest.approx(flops, rel=1e-3)
    chip = compile_table.CHIPS["v5e"]
    bound = max(figures["flops_per_chip"] / (chip.bf16_tflops * 1e12),
                figures["bytes_accessed_per_chip"] / (chip.hbm_gb_s * 1e9))
    assert figures["step_lower_bound_s"] == pytest.approx(bound)
    assert figures["recipe_hours_lower_bound"] == pytest.approx(
        figures["recipe_steps"] * bound / 3600)
    assert (figures["chips"], figures["processes"]) == (8, 2)


def test_classifier_step_for_v5e_2x4():
    figures = row("seam")
    args = classifier_step.parse_args(["--method=seam", "--width_div=32", "--blocks=1,1,1,1",
                                       "--crop=64", "--batch=16", "--dtype=bfloat16",
                                       "--remat"])
    model, tx, loss_fn = classifier_step.jax_model(args)
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    image, labels = classifier_step.make_batch(args)
    compiled = compile_train_step(graphdef, state, loss_fn,
                                  {"image": image, "labels": labels}, tpu_mesh())
    assert_same_compile(figures, compiled)
    assert figures["recipe_steps"] == 20 * 10582 // 16 and figures["global_batch"] == 16


def test_segmenter_step_for_v5e_2x4():
    from pmm_jax.stages import seg

    figures = row("pspnet_r101_ce")
    args = segmenter_step.parse_args(["--width_div=16", "--blocks=1,1,1,1", "--crop=64",
                                      "--batch=16", "--dtype=bfloat16", "--remat"])
    config = segmenter_step.seg_config(args)
    model = seg.build_model(config, config.seed)
    tx, _ = seg.make_optimizer(config, model)
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    image, mask = segmenter_step.make_batch(args)
    compiled = compile_train_step(graphdef, state, seg.run_loss(config, "ce"),
                                  {"image": image, "mask": mask}, tpu_mesh())
    assert_same_compile(figures, compiled)
    assert figures["recipe_steps"] == 20000


def test_dense_crf_for_one_v5e_chip():
    from pmm_jax.masks import dense_crf, dense_crf_jax

    figures = row("crf_ppmg")
    h, w = compile_table.QUICK["crf_hw"]
    chip = jax.sharding.SingleDeviceSharding(tpu_mesh().devices.flat[0])
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=chip)  # noqa: E731
    compiled = jax.jit(lambda image, probs, valid: dense_crf_jax.crf_posterior(
        image, probs, dense_crf.PSEUDO_MASK_CRF, dense_crf_jax.hard_capacity(h, w), valid)).lower(
        sds((h, w, 3), np.uint8), sds((compile_table.CRF_LABEL_SETS, 2, h, w), np.float32),
        sds((h, w), bool)).compile()
    stats = compiled.memory_analysis()
    for key in ("argument", "output", "temp"):
        assert figures["memory_bytes"][key] == getattr(stats, f"{key}_size_in_bytes"), key
    assert figures["recipe_steps"] == math.ceil(10582 / 8)

