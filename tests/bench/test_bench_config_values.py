"""bench/config_values.py: the benchmarks read configs/ itself; where ml_collections is missing
(a GPU image with only jax, flax, optax, orbax, numpy and torch) its stand-in builds the same
values, and leaves ``sys.modules`` as it found it."""

import sys

import pytest

from bench import config_values


@pytest.mark.parametrize("name, variant", [("voc", None), ("voc", "rehearsal"), ("coco", None),
                                           ("demo", "tiny")])
def test_stand_in_config_holds_the_config_values(name, variant, monkeypatch):
    real = config_values.get_config(name, variant)
    assert type(real).__name__ == "ConfigDict"
    monkeypatch.setitem(sys.modules, "ml_collections", None)  # import ml_collections fails
    stand_in = config_values.get_config(name, variant)
    assert isinstance(stand_in, config_values.AttrDict)
    assert stand_in.to_dict() == real.to_dict()
    assert sys.modules["ml_collections"] is None
    assert not [m for m in sys.modules if m.startswith("bench_config_")]


def test_attr_dict_reads_and_writes_attributes():
    d = config_values.AttrDict(a={"b": 1})
    d.a.c = 2
    assert d.a.b == 1 and d["a"]["c"] == 2 and d.to_dict() == {"a": {"b": 1, "c": 2}}
    assert getattr(d, "missing", "default") == "default"
