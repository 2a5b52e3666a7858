"""The import layering of ``pmm_jax`` as docs/design.md states it: no module imports a module
of a layer above its own. The layer table is read from docs/design.md (section "Layers"), so
the documented layers and the checked ones are the same table."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pmm_jax"


def documented_layers() -> list[tuple[str, set[str]]]:
    """``[(layer, {unit})]`` bottom first, from docs/design.md's layer table; a unit is a
    sub-package (``cams``) or a top-level module (``main``) of ``pmm_jax``."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| *(\d+) ([^|]+?) *\| *([^|]+?) *\|$", section, re.M)
    assert rows, "docs/design.md has no layer table under '## Layers'"
    layers = [(int(n), name, {u.strip().strip("`").rstrip("/").removesuffix(".py")
                              for u in units.split(",")}) for n, name, units in rows]
    assert [n for n, _, _ in layers] == list(range(1, len(layers) + 1))
    return [(name, units) for _, name, units in layers]


def unit_of(module: str) -> str:
    """``pmm_jax.cams.seam`` -> ``cams``; ``pmm_jax.main`` -> ``main``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``pmm_jax`` module ``path`` imports, wherever the import
    statement is (top level, inside a function, under ``TYPE_CHECKING``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pmm_jax":  # from pmm_jax import stages
                found += [(node.lineno, f"pmm_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found
            if name == "pmm_jax" or name.startswith("pmm_jax.")]


def violations(graph: dict[str, list[tuple[int, str]]], layers: list[tuple[str, set[str]]]
               ) -> list[str]:
    """Each import in ``graph`` (``{module: [(line, imported module)]}``) of a unit in a
    layer above the importing module's."""
    rank = {unit: (i, name) for i, (name, units) in enumerate(layers) for unit in units}
    found = []
    for module, imported in graph.items():
        if module == "pmm_jax":
            continue  # the package's __init__ (it imports nothing of the package)
        own, own_name = rank[unit_of(module)]
        for line, target in imported:
            if target == "pmm_jax":
                continue
            other, other_name = rank[unit_of(target)]
            if other > own:
                found.append(f"{module}:{line} imports {target}: layer '{other_name}' is above "
                             f"'{own_name}'")
    return found


def package_graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_init_imports_nothing_of_the_package():
    assert package_graph()["pmm_jax"] == []


def test_every_unit_of_the_package_has_one_layer():
    layers = documented_layers()
    units = [u for _, us in layers for u in us]
    assert len(units) == len(set(units)), "a unit is listed in two layers of docs/design.md"
    present = {unit_of(m) for m in package_graph() if m != "pmm_jax"}
    assert present - set(units) == set(), "add these to docs/design.md's layer table"
    assert set(units) - present == set(), "docs/design.md lists units the package lacks"


def test_no_module_imports_a_layer_above_it():
    assert violations(package_graph(), documented_layers()) == []


def test_upward_arrows_are_caught():
    """The arrows that once ran up the layers fail the check."""
    arrows = {"pmm_jax.segmentation.predict_images": [(72, "pmm_jax.stages.cycle")],
              "pmm_jax.export": [(64, "pmm_jax.stages.seg")],
              "pmm_jax.notebook_utils": [(72, "pmm_jax.stages.seg")],
              "pmm_jax.config_rules": [(100, "pmm_jax.stages")],
              "pmm_jax.masks.generator": [(1, "pmm_jax.segmentation.inference")],
              "pmm_jax.cams.seam": [(1, "pmm_jax.data.dataset")]}
    found = violations(arrows, documented_layers())
    assert len(found) == len(arrows), found


def test_the_parser_sees_every_form_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import pmm_jax.cams.seam\nfrom pmm_jax import stages, files\n"
                      "def f():\n    from pmm_jax.data.dataset import Dataset\n"
                      "import numpy\n")
    assert imports(source) == [(1, "pmm_jax.cams.seam"), (2, "pmm_jax.stages"),
                               (2, "pmm_jax.files"), (4, "pmm_jax.data.dataset")]
