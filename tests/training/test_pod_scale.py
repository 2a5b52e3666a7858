"""pmm_jax/training/pod_scale.py and configs/voc.py:pod<N>: every batch divides over the chips,
the training stages' lr scales with their batch and their steps inversely."""

import math

import pytest

import configs
from pmm_jax import config_rules
from pmm_jax.training import pod_scale


def voc(variant="paper"):
    return configs.get_config("voc", variant)


def test_pod64_divides_over_a_v5e_8x8_with_the_linear_rule():
    paper, pod = voc(), voc("pod64")
    assert config_rules.device_problems(paper, processes=16, local_devices=4)
    assert config_rules.device_problems(pod, processes=16, local_devices=4) == []
    for stage in ("cls", "seg"):
        assert (paper[stage].batch_size, pod[stage].batch_size) == (16, 64)
        assert pod[stage].lr == pytest.approx(4 * paper[stage].lr)
        assert pod[stage].num_steps == math.ceil(paper[stage].num_steps / 4)
    assert pod.seg.min_lr == pytest.approx(4 * paper.seg.min_lr)
    assert (pod.cam.batch_size, pod.cam.multicrop.tile_batch, pod.eval.batch_size) == (64, 64, 64)


def test_a_chip_count_that_divides_changes_nothing_and_bad_variants_are_refused():
    assert voc("pod8").to_dict() == voc().to_dict()
    assert voc("pod16").cls.batch_size == 16 and voc("pod32").seg.lr == pytest.approx(0.01)
    assert pod_scale.pod_chips("pod0") is None and pod_scale.pod_chips("podx") is None
    with pytest.raises(ValueError, match="pod<chips>"):
        voc("pods")


def test_the_refusal_names_the_pod_variant():
    problems = config_rules.device_problems(voc(), processes=16, local_devices=4)
    assert any("configs/voc.py:pod64" in p for p in problems)
