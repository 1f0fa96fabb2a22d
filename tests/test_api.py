"""The plugin API: what `arctic_vl` exports, that each name states its contract, and the import structure.

The layer contracts themselves are checked by `lint-imports` (pyproject.toml, run by the README's test
command); these tests cover what import-linter cannot: every public name resolves and is documented, the
registries refuse classes that are not of their kind, and every core module imports first in a fresh
interpreter (no import-order dependence).
"""

from __future__ import annotations

import ast
import inspect
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

import arctic_vl

ROOT = Path(__file__).resolve().parents[1]


def _lazy_table() -> dict[str, str]:
    tree = ast.parse((ROOT / "arctic_vl" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_LAZY":
            return ast.literal_eval(node.value)
    raise AssertionError("no _LAZY table in arctic_vl/__init__.py")


def test_all_is_exactly_the_lazy_table():
    assert sorted(arctic_vl.__all__) == sorted(_lazy_table())
    assert len(set(arctic_vl.__all__)) == len(arctic_vl.__all__)


@pytest.mark.parametrize("name", sorted(_lazy_table()))
def test_every_public_name_resolves_and_states_its_contract(name):
    value = getattr(arctic_vl, name)
    assert value is getattr(__import__(_lazy_table()[name], fromlist=[name]), name)
    if inspect.isclass(value) or inspect.isfunction(value):
        doc = inspect.getdoc(value) or ""
        assert len(doc.split()) >= 4, f"arctic_vl.{name} needs a docstring that states its contract"


def test_base_classes_state_their_methods():
    """The methods the engine and the loop call on each base class exist with their real signatures."""
    sig = inspect.signature
    assert inspect.isabstract(arctic_vl.ModelFactory)
    assert {"build", "export"} <= arctic_vl.ModelFactory.__abstractmethods__
    assert list(sig(arctic_vl.ModelFactory.build).parameters) == ["self", "device", "output_dir", "path"]
    assert inspect.isabstract(arctic_vl.DataFactory)
    assert list(sig(arctic_vl.Trainer.loss).parameters) == ["self", "model", "batch", "counts"]
    assert list(sig(arctic_vl.Trainer.step_counts).parameters) == ["self", "micro"]
    assert "evaluate" in vars(arctic_vl.Trainer)
    for event in ("on_train_start", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end"):
        assert callable(getattr(arctic_vl.Callback, event))


def test_registries_refuse_a_class_of_another_kind_naming_both():
    arctic_vl.load_plugins()

    class NotATrainer(arctic_vl.Component):
        config_class = arctic_vl.TrainerConfig

    with pytest.raises(TypeError, match=r"NotATrainer is not a subclass of arctic_vl\.trainers\.base\.Trainer"):
        arctic_vl.TRAINERS.register("zz_not_a_trainer")(NotATrainer)
    assert "zz_not_a_trainer" not in arctic_vl.TRAINERS
    for registry, base in ((arctic_vl.MODELS, arctic_vl.ModelFactory), (arctic_vl.DATA, arctic_vl.DataFactory),
                           (arctic_vl.CALLBACKS, arctic_vl.Callback), (arctic_vl.OPTIMIZERS, arctic_vl.Optimizer),
                           (arctic_vl.SCHEDULERS, arctic_vl.Scheduler),
                           (arctic_vl.CHECKPOINTERS, arctic_vl.Checkpointer),
                           (arctic_vl.DISTRIBUTED, arctic_vl.DistributedBackend)):
        assert registry.base is base
        assert all(issubclass(cls, base) for _, cls in registry.items())


def test_lookups_do_not_discover_plugins():
    """Discovery happens at the entry points; a lookup in a fresh process without it finds nothing."""
    code = textwrap.dedent("""
        from arctic_vl.registry import TRAINERS
        from arctic_vl.errors import ConfigError
        try:
            TRAINERS.get("sft")
        except ConfigError as e:
            print("refused:", e)
        import arctic_vl
        arctic_vl.load_plugins()
        print("found:", TRAINERS.get("sft").__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "refused: unknown trainer type 'sft'" in out and "load_plugins()" in out
    assert "found: SFTTrainer" in out


def _core_modules() -> list[str]:
    names = ["arctic_vl"]
    for info in pkgutil.walk_packages(arctic_vl.__path__, "arctic_vl."):
        names.append(info.name)
    return sorted(names)


# Heavy third-party libraries load once; each core module is then imported FIRST in a forked child, so an
# import-order dependence inside the core (a cycle that only works from one side) fails that child.
FORK_WALK = """
import importlib, json, os, sys, traceback
import torch, transformers, pydantic, yaml, PIL.Image, numpy, safetensors  # noqa: F401
failed = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(w, traceback.format_exc()[-2000:].encode())
            os._exit(1)
    os.close(w)
    err = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        failed[name] = err
print(json.dumps(failed))
"""


def test_every_core_module_imports_first_in_a_fresh_interpreter():
    modules = _core_modules()
    assert len(modules) > 40
    proc = subprocess.run([sys.executable, "-c", FORK_WALK, json.dumps(modules)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    failed = json.loads(proc.stdout.splitlines()[-1])
    assert failed == {}


def test_import_contracts_cover_every_core_module_and_project():
    """The forbidden list of the 'projects import only the public API' contract names every core subpackage
    and module, and every shipped project is a root package of the contracts."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    top = {m.split(".")[1] for m in _core_modules() if m.count(".") >= 1}
    contract = next(c for c in config["contracts"] if c["name"].startswith("projects import only"))
    assert {m.split(".")[1] for m in contract["forbidden_modules"]} == top
    projects = sorted(p.name for p in (ROOT / "projects").iterdir() if (p / "pyproject.toml").is_file())
    packages = {p: (ROOT / "projects" / p / p).is_dir() for p in projects}
    assert all(packages.values()), packages
    assert set(projects) <= set(config["root_packages"])
    assert set(projects) <= set(contract["source_modules"])


def test_the_loop_reads_in_one_screen():
    """`Trainer.train` stays a short loop over named steps (the steps themselves live beside it)."""
    source = inspect.getsource(arctic_vl.Trainer.train)
    assert len(source.splitlines()) <= 25
    for step in ("setup", "step_batches", "train_step", "log_step", "maybe_evaluate", "maybe_save", "finish"):
        assert f"self.{step}(" in source


def test_newest_weights_contract():
    """The one rule for a run's weights: a function of the run directory (and its checkpointer), returning
    path, step, kind and epoch; the Engine resolves it with the run's checkpointer and builds its model."""
    import dataclasses

    sig = inspect.signature
    assert list(sig(arctic_vl.newest_weights).parameters) == ["run_dir", "checkpointer"]
    assert [f.name for f in dataclasses.fields(arctic_vl.RunWeights)] == ["path", "step", "kind", "epoch"]
    assert arctic_vl.RunWeights(Path("r/final"), 3, "final").describe() == "final r/final (step 3)"
    assert list(sig(arctic_vl.Engine.newest_weights).parameters) == ["self"]
    assert list(sig(arctic_vl.Engine.build_model).parameters) == ["self", "weights", "device"]
    assert "base" in sig(arctic_vl.Engine.evaluate).parameters
