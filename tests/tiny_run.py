"""One tiny pipeline run per test session, shared by tests that need a finished workdir.

``tiny_workdir`` (import it into a test module) runs ``cls,cam,pseudo,seg,eval`` of
``configs/demo.py:tiny`` with few steps in this process, once per session however many modules
use it (the run is cached at module level: pytest would otherwise make one per importing
module), and returns the workdir path. The run takes minutes on a loaded 2-core machine.
"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_RUN: dict[str, str] = {}


def tiny_config():
    """``configs/demo.py:tiny`` cut down to what readers of a workdir need."""
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.stages = "cls,cam,pseudo,seg,eval"
    config.cls.num_steps = config.seg.num_steps = 4
    config.seg.runs = ("pus",)
    config.pseudo.variants = ("baseline", "ppmg")
    return config


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> str:
    if "path" not in _RUN:
        from pmm_jax import main

        path = str(tmp_path_factory.mktemp("tiny_run"))
        main.run(tiny_config(), path)
        _RUN["path"] = path
    return _RUN["path"]
