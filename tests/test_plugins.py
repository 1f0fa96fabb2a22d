"""Plugins: a separately packaged third-party plugin (and a broken one) found through entry points.

The plugins are written into a tmp dir with their own `*.dist-info` (METADATA + entry_points.txt), so
`importlib.metadata` finds them when the dir is on PYTHONPATH of a fresh process: no install, no change to
the core. The registry itself is unit-tested in-process on private Registry objects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from arctic_vl.errors import ConfigError
from arctic_vl.registry import ComponentConfig, Registry

PLUGIN = '''
"""A third-party arctic_vl plugin: a callback with its own config, a CLI verb and a config check."""

from pydantic import Field

from arctic_vl.callbacks.base import Callback
from arctic_vl.errors import ConfigError
from arctic_vl.plugins import register_cli_verb, register_config_check
from arctic_vl.registry import CALLBACKS, ComponentConfig


class CounterConfig(ComponentConfig):
    type: str = "tp_counter"
    every: int = Field(1, ge=1)
    label: str = "steps"


@CALLBACKS.register("tp_counter")
class Counter(Callback):
    config_class = CounterConfig


def hello(argv):
    print("hello from thirdparty_plugin", " ".join(argv))
    return 0


register_cli_verb("tp-hello", hello, help="say hello")


def no_forbidden_label(cfg, located):
    for i, cb in enumerate(cfg.callbacks):
        if cb.type == "tp_counter" and cb.label == "forbidden":
            raise ConfigError(
                f"{located.where(('callbacks', i, 'label'))}: callbacks[{i}].label: 'forbidden' is reserved "
                "by thirdparty_plugin. Allowed: any other label"
            )


register_config_check(no_forbidden_label)


def model_types(argv):
    from arctic_vl.models.families import _MODEL_TYPES

    print("model types:", " ".join(sorted(_MODEL_TYPES)))
    return 0


register_cli_verb("tp-model-types", model_types, help="list the model types")
'''

#: issue 24 item 11: registers in every table, then fails; none of it may stay
HALFWAY = '''
from arctic_vl.callbacks.base import Callback
from arctic_vl.errors import ConfigError
from arctic_vl.models.families import register_model_type
from arctic_vl.plugins import register_cli_verb, register_config_check
from arctic_vl.registry import CALLBACKS, ComponentConfig


class HalfConfig(ComponentConfig):
    type: str = "hw_callback"


@CALLBACKS.register("hw_callback")
class Half(Callback):
    config_class = HalfConfig


def reject_everything(cfg, located):
    raise ConfigError("rejected by the half-loaded plugin")


register_config_check(reject_everything)
register_cli_verb("hw-verb", lambda argv: 0, help="never usable")
register_model_type("hw_model_type", "llava_next")
raise RuntimeError("halfway on purpose")
'''


def _dist(root: Path, dist: str, module: str, ep_name: str, source: str) -> None:
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[arctic_vl.plugins]\n{ep_name} = {module}\n")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    _dist(root, "thirdparty_plugin", "thirdparty_plugin", "thirdparty", PLUGIN)
    _dist(root, "broken_plugin", "broken_plugin", "broken", 'raise RuntimeError("broken on purpose")\n')
    # SystemExit is no Exception: a plugin that exits on import must not take the process (and its exit code) down
    _dist(root, "exiting_plugin", "exiting_plugin", "exiting", 'import sys\nsys.exit(3)\n')
    _dist(root, "halfway_plugin", "halfway_plugin", "halfway", HALFWAY)
    (root / "train.yaml").write_text(
        "model:\n  family: llava_next\n  tiny: {layers: 1, hidden: 32, heads: 2, kv_heads: 1, intermediate: 64}\n"
        f"data:\n  sources: [{{path: {synthetic_data / 'train.llava.json'}, sample: 'first:4'}}]\n"
        "  micro_batch_size: 2\n  max_length: 512\n"
        "trainer:\n  output_dir: run\n  max_steps: 1\n  progress_bar: false\n"
        "callbacks:\n  - type: tp_counter\n")
    (root / "train.json").write_text("[]\n")
    base = "model:\n  family: llava_next\ndata:\n  sources: [train.json]\ncallbacks:\n"
    (root / "good.yaml").write_text(base + "  - type: tp_counter\n    every: 5\n")
    (root / "typo.yaml").write_text(base + "  - type: tp_counter\n    evry: 5\n")
    (root / "range.yaml").write_text(base + "  - type: progress\n  - type: tp_counter\n    every: 0\n")
    (root / "rejected.yaml").write_text(base + "  - type: tp_counter\n    label: forbidden\n")
    (root / "unknown.yaml").write_text(base + "  - type: tp_countr\n")
    (root / "halfway.yaml").write_text(base + "  - type: hw_callback\n")
    return root


DRIVER = """
import contextlib, io, json, sys
from arctic_vl.cli import main

results = {}
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results[" ".join(argv)] = [rc, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(plugin_dir: Path) -> dict[str, tuple[int, str, str]]:
    """Several CLI calls in ONE fresh process with the plugins on PYTHONPATH (a process costs ~1 s)."""
    import os
    import subprocess

    argvs = [["plugins"], ["tp-hello", "a", "b"], ["validate", "good.yaml"], ["validate", "typo.yaml"],
             ["validate", "range.yaml"], ["validate", "rejected.yaml"], ["validate", "unknown.yaml"], ["schema"],
             ["no-such-verb"], ["train", "train.yaml"], ["hw-verb"], ["validate", "halfway.yaml"],
             ["tp-model-types"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=plugin_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {k: tuple(v) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def test_plugins_lists_good_and_broken(runs):
    rc, out, err = runs["plugins"]
    assert rc == 0, err
    good = out.split("thirdparty (thirdparty_plugin, thirdparty_plugin 0.1): ok", 1)
    assert len(good) == 2, out
    assert "callbacks: tp_counter" in good[1] and "cli: tp-hello" in good[1]
    assert "broken (broken_plugin, broken_plugin 0.1): FAILED: RuntimeError: broken on purpose" in out
    assert "core (arctic_vl):" in out and "model: hf_vlm" in out
    # the failure is also reported on stderr once, with the plugin's name, and never as a traceback
    assert "plugin 'broken' (broken_plugin) failed to load: RuntimeError: broken on purpose" in err
    assert "Traceback" not in err


def test_plugin_calling_sys_exit_is_reported_and_the_rest_works(runs, plugin_dir):
    """issue 12 item 18: `sys.exit(3)` on import is reported; plugins, validate and training go on (exit 0)."""
    rc, out, err = runs["plugins"]
    assert rc == 0
    assert "exiting (exiting_plugin, exiting_plugin 0.1): FAILED: SystemExit: 3" in out
    assert "plugin 'exiting' (exiting_plugin) failed to load: SystemExit: 3" in err
    rc, out, _ = runs["validate good.yaml"]
    assert rc == 0 and "# config OK" in out
    rc, out, err = runs["train train.yaml"]
    assert rc == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 1 and (plugin_dir / "run" / "final" / "config.json").is_file()
    assert json.loads((plugin_dir / "run" / "run_info.json").read_text())["plugins"]["exiting"]["ok"] is False


def test_failed_plugin_registrations_are_rolled_back(runs):
    """issue 24 item 11: a plugin that registers a config check (and a callback, a verb, a model type) and then
    raises is reported as failed, and none of what it registered stays: good configs validate, its names are
    unknown."""
    rc, out, err = runs["plugins"]
    assert rc == 0, err
    assert "halfway (halfway_plugin, halfway_plugin 0.1): FAILED: RuntimeError: halfway on purpose" in out
    assert ("rolled back (not usable): callbacks: hw_callback; cli: hw-verb; config checks: reject_everything"
            in out), out
    rc, out, err = runs["validate good.yaml"]
    assert rc == 0 and "rejected by the half-loaded plugin" not in err, err
    rc, _, err = runs["hw-verb"]
    assert rc == 2 and "unknown verb or config file 'hw-verb'" in err
    rc, _, err = runs["validate halfway.yaml"]
    assert rc == 2 and "halfway.yaml:6: callbacks[0].type: unknown callback type 'hw_callback'" in err, err
    rc, out, err = runs["tp-model-types"]
    assert rc == 0, err
    assert "llava_next" in out.split() and "hw_model_type" not in out.split()


def test_plugin_cli_verb(runs):
    rc, out, err = runs["tp-hello a b"]
    assert rc == 0, err
    assert "hello from thirdparty_plugin a b" in out


def test_config_using_plugin_type_validates(runs, plugin_dir):
    rc, out, err = runs["validate good.yaml"]
    assert rc == 0, err  # while the broken plugin fails to load
    assert "type: tp_counter" in out and "every: 5" in out and "label: steps" in out
    assert "# config OK" in out


@pytest.mark.parametrize("name,where,path,says", [
    ("typo.yaml", "typo.yaml:7", "callbacks[0].evry", ["did you mean 'every'?", "Allowed: every, label, type"]),
    ("range.yaml", "range.yaml:8", "callbacks[1].every", ["greater than or equal to 1"]),
    ("rejected.yaml", "rejected.yaml:7", "callbacks[0].label", ["reserved by thirdparty_plugin"]),
    ("unknown.yaml", "unknown.yaml:6", "callbacks[0].type",
     ["Registered:", "tp_counter", "Did you mean 'tp_counter'?"]),
])
def test_plugin_config_errors(runs, name, where, path, says):
    rc, _, err = runs[f"validate {name}"]
    assert rc == 2, err
    assert "Traceback" not in err
    assert f"{where}: {path}: " in err, err
    for text in says:
        assert text in err, err


def test_schema_includes_plugin_types(runs):
    rc, out, _ = runs["schema"]
    assert rc == 0
    defs = json.loads(out)["$defs"]
    assert set(defs["callbacks.tp_counter"]["properties"]) == {"type", "every", "label"}


def test_unknown_verb_lists_plugin_verbs(runs):
    rc, _, err = runs["no-such-verb"]
    assert rc == 2
    assert "unknown verb or config file 'no-such-verb'" in err and "tp-hello" in err


def test_console_script_runs_plugin_verb(plugin_dir, cli_subprocess):
    """The real entry point in its own process, as a user would type it."""
    rc, out, err = cli_subprocess("tp-hello", "there", cwd=plugin_dir, pythonpath=[plugin_dir])
    assert rc == 0, err
    assert "hello from thirdparty_plugin there" in out
    assert "plugin 'broken'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ Registry unit tests


class _Cfg(ComponentConfig):
    type: str = "x"


def _component(name: str = "Thing") -> type:
    return type(name, (), {"config_class": _Cfg, "__module__": "tests.fake_module"})


def test_registry_unknown_name_lists_registered():
    reg = Registry("widget", "widget")
    reg.register("alpha")(_component("Alpha"))
    reg.register("beta")(_component("Beta"))
    assert reg.names() == ["alpha", "beta"]
    with pytest.raises(ConfigError) as info:
        reg.get("alpah")
    msg = str(info.value)
    assert "unknown widget type 'alpah'" in msg and "Registered: alpha, beta" in msg and "Did you mean 'alpha'?" in msg


def test_registry_taken_name_names_both_classes():
    reg = Registry("widget", "widget")
    reg.register("alpha")(_component("Alpha"))
    with pytest.raises(ValueError) as info:
        reg.register("alpha")(_component("Other"))
    msg = str(info.value)
    assert "tests.fake_module.Alpha" in msg and "tests.fake_module.Other" in msg and "'alpha'" in msg
    assert reg.get("alpha").__name__ == "Alpha"


def test_registry_same_class_twice_is_harmless():
    reg = Registry("widget", "widget")
    cls = _component("Alpha")
    assert reg.register("alpha")(cls) is cls
    assert reg.register("alpha")(cls) is cls
    assert reg.names() == ["alpha"] and reg.get("alpha") is cls and cls.registered_name == "alpha"
    assert "alpha" in reg and "beta" not in reg


def test_registry_requires_a_config_class():
    reg = Registry("widget", "widget")
    with pytest.raises(TypeError, match="must set config_class to a ComponentConfig subclass"):
        reg.register("bad")(type("Bad", (), {}))


def test_config_check_and_verb_registration_in_process():
    """register_config_check / register_cli_verb are idempotent for the same function (plugins may re-import)."""
    import arctic_vl.cli  # noqa: F401  (the CLI owns the core verbs: importing it reserves them)
    from arctic_vl import plugins

    def check(cfg, located):  # pragma: no cover - never run
        pass

    def verb(argv):  # pragma: no cover
        return 0

    before = list(plugins.CONFIG_CHECKS)
    try:
        plugins.register_config_check(check)
        plugins.register_config_check(check)
        assert [c for _, c in plugins.CONFIG_CHECKS].count(check) == 1
        plugins.register_cli_verb("zz-test-verb", verb, help="x")
        plugins.register_cli_verb("zz-test-verb", verb, help="x")
        assert plugins.CLI_VERBS["zz-test-verb"].run is verb
        with pytest.raises(ValueError, match="core arctic_vl verb"):  # it would never be dispatched
            plugins.register_cli_verb("validate", verb)
    finally:
        plugins.CONFIG_CHECKS[:] = before
        plugins.CLI_VERBS.pop("zz-test-verb", None)
