"""What a stage's marker records: the config keys that affect it, compared on rerun."""


import configs
from pmm_jax import stages
from pmm_jax.stages import record


def test_each_stage_depends_on_its_own_and_earlier_sections_only():
    config = configs.get_config("demo", "tiny")
    cls = record.relevant_config(config, "cls", stages.ORDER)
    pseudo = record.relevant_config(config, "pseudo", stages.ORDER)
    evaluation = record.relevant_config(config, "eval", stages.ORDER)
    assert {"seed", "data.name", "cls.lr", "cls.num_steps"} <= set(cls)
    assert not any(k.startswith(("cam.", "pseudo.", "seg.", "eval.", "crf.")) for k in cls)
    assert {"cls.lr", "cam.scales", "pseudo.alpha", "crf.backend", "eval.rule"} <= set(pseudo)
    assert not any(k.startswith(("seg.", "cycle.", "eval.sliding")) for k in pseudo)
    assert {"seg.pus.beta", "cycle.num_cycles", "eval.sliding_window"} <= set(evaluation)
    # Speed, logging and stage-list keys never make a stage stale.
    for key in ("stages", "cls.log_every", "seg.ckpt_every", "pseudo.num_workers",
                "eval.crf_workers", "cam.batch_size", "eval.batch_size", "data.data_dir",
                "cam.multicrop.tile_batch"):
        assert key not in evaluation, key


def test_changed_keys_lists_differences_of_keys_both_hold():
    old = {"cls.lr": 0.1, "cam.scales": [1.0], "removed.key": 1}
    new = {"cls.lr": 0.05, "cam.scales": [1.0], "added.key": 2}
    assert record.changed_keys(old, new) == ["cls.lr: 0.1 -> 0.05"]


def test_flatten_joins_nested_keys_with_dots_and_stores_values_as_json():
    assert record.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert record.flatten({"a": {"b": (1, (2, 3))}}) == {"a.b": [1, [2, 3]]}
