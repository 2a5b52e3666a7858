"""pmm_jax/registry.py: named entries of an extension axis and the config.plugins modules."""

import sys

import pytest

from pmm_jax import registry


def test_register_get_names_in_order():
    reg = registry.Registry("toy method")
    first = reg.register("b", object())
    second = reg.register("a", object())
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"]
    assert reg.get("b") is first and reg.get("a") is second
    assert "a" in reg and "c" not in reg
    assert reg.register("b", first) is first  # the same entry again: no-op


def test_register_as_decorator():
    reg = registry.Registry("toy method")

    @reg.register("f")
    def f():
        return 1

    assert reg.get("f") is f and f() == 1


def test_unknown_name_lists_registered_names():
    reg = registry.Registry("toy method")
    reg.register("one", 1)
    reg.register("two", 2)
    with pytest.raises(registry.UnknownNameError, match=r"unknown toy method 'tow'; "
                       r"registered: 'one', 'two'"):
        reg.get("tow")
    with pytest.raises(ValueError, match="registered: 'one', 'two'"):
        reg.get(["unhashable"])
    assert reg.check("one") is None
    assert reg.check("tow") == "is not a registered toy method (registered: 'one', 'two')"


def test_taken_or_bad_names_are_refused():
    reg = registry.Registry("toy method")
    reg.register("x", 1)
    with pytest.raises(ValueError, match="'x' is already registered"):
        reg.register("x", 2)
    assert reg.register("x", 2, replace=True) == 2 and reg.get("x") == 2
    for bad in ("", "a,b", " x", 3):
        with pytest.raises(ValueError, match="must be a non-empty string"):
            reg.register(bad, 1)


def test_import_plugins(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin_mod.py").write_text(
        "from pmm_jax import registry\nREG = registry.Registry('toy')\nREG.register('t', 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.import_plugins(" toy_plugin_mod , ") == ["toy_plugin_mod"]
    assert sys.modules["toy_plugin_mod"].REG.names() == ("t",)
    assert registry.import_plugins("") == []
    with pytest.raises(ValueError, match=r"config.plugins: cannot import module "
                       r"'no_such_plugin_mod' \(ModuleNotFoundError"):
        registry.import_plugins("no_such_plugin_mod")
    with pytest.raises(ValueError, match="must be a comma-separated string"):
        registry.import_plugins(None)
