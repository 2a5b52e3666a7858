r"""Runs the PMM pipeline: ``python -m pmm_jax.main --config=configs/demo.py --workdir=DIR``.

Stages (``--config.stages=cls,cam,pseudo,seg,cycle,eval``) run in order; each reads its
inputs from the workdir and skips work already done, so rerunning the same command after a
kill resumes. Overrides use ml_collections syntax (``--config.seg.num_steps=100``); the config
is locked, so a misspelt key is an error. A completed stage made with other settings is
refused unless ``--redo=STAGES`` names it (``pmm_jax.stages.plan``); one run at a time holds
the workdir (``WORKDIR/.lock``).

Several processes (hosts) run the same command on one shared workdir. On a Cloud TPU VM and
under SLURM/Open MPI they find each other by themselves; elsewhere pass
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (``pmm_jax.training.distributed``).
"""

from __future__ import annotations

import ast
import contextlib
import logging as std_logging
import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pmm_jax.command_line import end_now, fail  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs of the run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (with "
    "--num_processes and --process_id); unset = detect a TPU pod/SLURM/MPI job, else one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_REDO = flags.DEFINE_list(
    "redo", [], "Stages to run again from scratch, their outputs deleted first (e.g. "
    "--redo=pseudo,seg): needed when a setting that affects a completed stage changed.")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(path: str) -> None:
    """Creates the workdir and proves it is writable, or raises a clear error."""
    try:
        os.makedirs(path, exist_ok=True)
        # One probe per process: several processes may check a shared workdir at once.
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise app.UsageError(f"--workdir={path} is not writable: {err}") from err


def config_error(err: Exception, argv: list[str]) -> str:
    """One paragraph for an error loading the config file or applying an override."""
    text = str(err)
    # ml_collections quotes a KeyError's message inside an AttributeError's: unwrap them.
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            inner = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
        if not (isinstance(inner, str) and inner[:1] in ("'", '"')):
            break  # keep the quotes of a bare key: 'nope'
        text = inner
    text = " ".join(str(text).split())
    if "[Errno" in text:  # a missing or unreadable config file: keep the OS's own words
        text = text[text.index("[Errno"):]
    unknown = re.match(r"'([^']+)'", text)
    overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    culprits = [o for o in overrides if unknown and unknown.group(1) in o.split(".")]
    if isinstance(err, (AttributeError, KeyError)) and culprits:
        return (f"{culprits[0]}: the config has no key {unknown.group(1)!r}"
                f"{text[unknown.end():]} (configs are locked: an override must name an "
                "existing key)")
    source = next((arg for arg in argv if arg.startswith("--config=")), "--config")
    return f"{source}: cannot load the config ({type(err).__name__}: {text})"


def override_problems(argv: list[str]) -> list[str]:
    """What is wrong with each ``--config.KEY=VALUE`` of ``argv`` applied alone to the config
    file (an unknown key, a value of the wrong type), in order; [] when the file itself does
    not load."""
    config_args = [arg for arg in argv[1:] if arg.startswith("--config=")]
    found = []
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        args = [argv[0], *config_args[-1:], arg]
        alone = flags.FlagValues()
        config = config_flags.DEFINE_config_file("config", None, "", flag_values=alone,
                                                 lock_config=True, sys_argv=args)
        try:
            alone(args)
            config.value.to_dict()
        except flags.Error as err:
            found.append(" ".join(str(err).split()).removeprefix("flag "))
        except (AttributeError, ImportError, KeyError, OSError, SyntaxError, TypeError,
                ValueError) as err:
            found.append(config_error(err, args))
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad config file or override reported as one paragraph
    and exit status 1 instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.to_dict()  # a config that failed to load raises its error here
        return rest
    except flags.Error as err:
        message = " ".join(str(err).split())
        if "Traceback (most recent call last)" in message:  # an error inside get_config()
            message = (message.split("Traceback")[0]
                       + str(err).strip().splitlines()[-1])
    except (AttributeError, ImportError, KeyError, OSError, SyntaxError, TypeError,
            ValueError) as err:
        message = config_error(err, argv)
    bad = override_problems(argv)
    if len(bad) > 1:  # every malformed override at once, not the first alone
        message = f"{len(bad)} overrides are wrong: " + "; ".join(bad)
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


@contextlib.contextmanager
def hold_workdir(wd):
    """The run's hold on ``wd``: process 0 takes its lock (``workdir.lock``) for the whole run
    and the run's other processes share it; all of them stop when another run holds it."""
    from pmm_jax.files import workdir
    from pmm_jax.training import distributed

    with contextlib.ExitStack() as stack:
        busy = None
        if distributed.is_main():
            try:
                stack.enter_context(workdir.lock(wd))
            except workdir.WorkdirBusyError as err:
                busy = str(err)
        if distributed.any_process(busy is not None):
            raise workdir.WorkdirBusyError(busy or workdir.busy_message(wd))
        yield


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache for ``config.compilation_cache``: "" = off,
    "workdir" = ``WORKDIR/xla_cache``, anything else a folder. Returns the folder used.

    A program compiled once is then read back wherever it recurs: the cyclic segmenter's
    train step is the CE run's, every segmenter's test-time program is the same, and a
    resumed run recompiles nothing. An explicit ``JAX_COMPILATION_CACHE_DIR`` wins (the test
    suite shares one cache that way).
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not setting:
        return None
    folder = os.path.join(workdir, "xla_cache") if setting == "workdir" else setting
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def run(config, workdir: str, redo: list[str] = ()) -> dict:
    """Runs the configured stages in ``workdir`` (redoing those in ``redo``); returns
    ``{stage: marker}`` of those run. ``config.json`` keeps the first run's config."""
    from pmm_jax import config_rules, stages
    from pmm_jax.files import safe_io
    from pmm_jax.files.workdir import Workdir
    from pmm_jax.training import distributed

    names = stages.parse_stages(config.stages)
    redo = stages.parse_stages(",".join(redo), "--redo") if redo else []
    check_workdir(workdir)
    enable_compilation_cache(config.get("compilation_cache", ""), workdir)
    wd = Workdir(workdir)
    with hold_workdir(wd):
        # Opened before anything else: a folder of images is checked (bad input stops here)
        # and built.
        data = open_dataset(config, wd)
        config_rules.check_dataset(config, data)  # its split names, before any stage
        if distributed.is_main():
            record_dataset(wd, data, names, redo)
        if distributed.is_main() and not os.path.exists(wd.config_json):
            safe_io.write_json(wd.config_json, config.to_dict())
        actions = stages.plan(names, redo, config, wd)
        distributed.barrier("planned")  # nothing is deleted before every process has planned
        return {name: stages.run_stage(name, config, wd, data, action)
                for name, action in actions.items()}


def open_dataset(config, wd):
    """The run's dataset (``pmm_jax.data.dataset``), resolved once for every stage. tfds
    builds a generated dataset on first use: process 0 opens it first, the others wait."""
    from pmm_jax.data import dataset
    from pmm_jax.training import distributed

    if distributed.is_main():
        data = dataset.open_dataset(config, wd)
    distributed.barrier("dataset-ready")
    return data if distributed.is_main() else dataset.open_dataset(config, wd)


def record_dataset(wd, data, names: list[str], redo: list[str]) -> None:
    """Writes ``WORKDIR/dataset.json`` (name, class names, canvas: what ``pmm_jax.predict``
    and ``pmm_jax.export`` need without reopening the dataset). Refuses (StageError) a
    dataset other than the one the workdir's completed stages were made from, e.g. a folder
    edited since (its build key changed), unless every completed stage is redone."""
    from pmm_jax import stages
    from pmm_jax.files import safe_io

    if os.path.exists(wd.dataset_json):
        before = safe_io.read_json(wd.dataset_json)["name"]
        kept = [n for n in stages.completed(wd) if n not in redo]
        if before != data.name and kept:
            raise stages.StageError(
                f"{wd.root} holds stage(s) {', '.join(kept)} made from dataset {before}, but the "
                f"dataset is now {data.name} (for a folder: it changed since); use another "
                f"--workdir, or redo them: --redo={','.join(kept)}"
                + ("" if set(kept) <= set(names) else f" --config.stages={','.join(kept)}"))
    safe_io.write_json(wd.dataset_json, {"name": data.name, "class_names": list(data.class_names),
                                    "canvas": list(data.canvas)})


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    from pmm_jax import config_rules, registry, stages
    from pmm_jax.data.builder_base import DatasetNotPreparedError, InputError
    from pmm_jax.files import safe_io, workdir
    from pmm_jax.training import checkpoints, distributed, trainer
    # Library chatter (orbax's read-only notices, tfds) only on errors; this package's
    # progress messages at INFO.
    logging.set_verbosity(logging.ERROR)
    std_logging.getLogger("pmm_jax").setLevel(std_logging.INFO)
    try:
        # Modules that register methods from outside the package, before the rules read the
        # registries.
        registry.import_plugins(_CONFIG.value.get("plugins", ""))
        config_rules.check(_CONFIG.value)  # every setting, before any work starts
        if _REDO.value:
            stages.parse_stages(",".join(_REDO.value), "--redo")
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        import jax

        config_rules.check_devices(_CONFIG.value, processes=jax.process_count(),
                                   local_devices=jax.local_device_count())
    except ValueError as err:
        fail(str(err))
    try:
        run(_CONFIG.value, _WORKDIR.value, _REDO.value)
    except (app.UsageError, stages.StageError, checkpoints.CheckpointError,
            trainer.DivergenceError, safe_io.NonFiniteError, workdir.WorkdirBusyError,
            DatasetNotPreparedError, InputError, config_rules.ConfigError) as err:
        fail(str(err))  # each message says what to do; a traceback would bury it
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; rerun the same command to resume\n")
        end_now(130)
    except Exception:  # a bug: its traceback, then the same prompt exit
        traceback.print_exc()
        end_now(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
