"""The command line: verbs, dispatch, launcher arguments, exit codes."""

from __future__ import annotations

import os

import pytest

import arctic_vl.cli as cli_module


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the train verb (both routes to it) by a recorder: no training happens."""
    calls: list[list[str]] = []

    def fake(argv: list[str]) -> int:
        calls.append(list(argv))
        return 0

    monkeypatch.setattr(cli_module, "cmd_train", fake)
    monkeypatch.setitem(cli_module.COMMANDS, "train", fake)
    return calls


def test_unknown_verb_exits_2(cli):
    rc, _, err = cli("frobnicate")
    assert rc == 2
    assert "unknown verb or config file 'frobnicate'" in err
    for verb in ("train", "validate", "plugins", "schema"):
        assert verb in err
    assert "Traceback" not in err


def test_config_alone_means_train(fake_train, good_yaml, cli):
    assert cli(str(good_yaml), "--set", "trainer.max_steps=1")[0] == 0
    assert cli("train", str(good_yaml), "--set", "trainer.max_steps=1")[0] == 0
    assert fake_train == [[str(good_yaml), "--set", "trainer.max_steps=1"]] * 2
    # a path that looks like a config goes to train even when missing (which then reports it)
    assert cli("missing.yml")[0] == 0 and fake_train[-1] == ["missing.yml"]
    # an existing file without a .yaml suffix too
    other = good_yaml.parent / "run.cfg"
    other.write_text(good_yaml.read_text())
    assert cli(str(other))[0] == 0 and fake_train[-1] == [str(other)]


@pytest.mark.parametrize("launcher", [["--local_rank=0"], ["--local_rank", "0"], ["--local-rank=0"]])
def test_local_rank_is_accepted_and_stripped(launcher, fake_train, good_yaml, cli, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "x")
    monkeypatch.delenv("LOCAL_RANK")  # restored (to unset) after the test
    assert cli(*launcher, str(good_yaml))[0] == 0
    assert cli(str(good_yaml), *launcher)[0] == 0
    assert fake_train == [[str(good_yaml)], [str(good_yaml)]]
    assert os.environ["LOCAL_RANK"] == "0"


def test_local_rank_with_validate(good_yaml, cli, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, out, err = cli("validate", "--local_rank=0", str(good_yaml))
    assert rc == 0, err
    assert "# config OK" in out


def test_help_and_no_arguments(cli):
    rc, out, _ = cli("--help")
    assert rc == 0 and "usage: arctic_vl" in out
    rc, out, _ = cli()
    assert rc == 2 and "usage: arctic_vl" in out  # no verb: usage, as a usage error
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip()


def test_verb_usage_errors_exit_2(cli):
    rc, _, err = cli("validate")  # no CONFIG
    assert rc == 2 and "the following arguments are required: config" in err
    rc, _, err = cli("validate", "x.yaml", "--bogus")
    assert rc == 2 and "unrecognized arguments: --bogus" in err
    rc, out, _ = cli("validate", "--help")
    assert rc == 0 and "--set KEY=VALUE" in out


def test_missing_config_file_exits_2(in_tmp, cli):
    rc, _, err = cli("no_such.yaml")  # the train route: validated before anything is built
    assert rc == 2
    assert "no_such.yaml: config file not found" in err and "Traceback" not in err


def test_internal_failure_exits_1(cli, monkeypatch):
    def boom(argv: list[str]) -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setitem(cli_module.COMMANDS, "schema", boom)
    rc, _, err = cli("schema")
    assert rc == 1
    assert "arctic_vl: failed: RuntimeError: kaboom" in err


def test_console_script_validate(good_yaml, cli_subprocess):
    """One real process: exit 0, the resolved config and the model type."""
    rc, out, err = cli_subprocess("validate", "good.yaml", cwd=good_yaml.parent)
    assert rc == 0, err
    assert "# model: tiny llava_next" in out and "max_steps: 2" in out


@pytest.mark.parametrize("verb", [["make-synthetic-data", "{out}", "--n", "3", "--seed", "0"],
                                  ["make-tiny-model", "llava", "{out}"]])
@pytest.mark.parametrize("case", ["under_a_file", "is_a_file"])
def test_verbs_refuse_an_output_directory_they_cannot_create(verb, case, tmp_path, cli):
    """A verb's output directory that lies under a file, or is one: exit 2 naming the option, the path and why,
    before any work (was a raw FileNotFoundError / FileExistsError with exit 1)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "sub" if case == "under_a_file" else blocker
    rc, _, err = cli(*[a.format(out=out) for a in verb])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"OUT_DIR {out}: " in err
    assert ("cannot be created" if case == "under_a_file" else "exists and is not a directory") in err


@pytest.mark.parametrize("args, says", [
    (["--layers", "0"], "--layers 0: Input should be greater than or equal to 1"),
    (["--hidden", "100000"], "--hidden 100000: Input should be less than or equal to 8192"),
    (["--heads", "0"], "--heads 0: Input should be greater than or equal to 1"),
    (["--kv-heads", "-1"], "--kv-heads -1: Input should be greater than or equal to 1"),
    (["--vision-layers", "0"], "--vision-layers 0: Input should be greater than or equal to 1"),
    (["--image-size", "0"], "--image-size 0: Input should be greater than or equal to 1"),
    (["--heads", "3"], "tiny.heads (3) must divide tiny.hidden (64)"),
    (["--seed", "-1"], "--seed -1: must be in 0..2**32-1"),
])
def test_make_tiny_model_refuses_absurd_sizes(args, says, tmp_path, cli):
    """issue 24 item 8: a non-positive or absurd size is exit 2 naming the option, and nothing is written."""
    rc, _, err = cli("make-tiny-model", "llava", str(tmp_path / "m"), *args)
    assert rc == 2 and "Traceback" not in err, err
    assert f"make-tiny-model: {says}" in err, err
    assert not (tmp_path / "m").exists()


def test_output_file_checks_a_verbs_output_file(tmp_path):
    """The API's check of a file a verb writes: folder created, a directory or an unwritable file refused."""
    from arctic_vl import ConfigError, output_file

    assert output_file(tmp_path / "new" / "deeper" / "p.jsonl", "--out") == tmp_path / "new" / "deeper" / "p.jsonl"
    assert (tmp_path / "new" / "deeper").is_dir() and not (tmp_path / "new" / "deeper" / "p.jsonl").exists()
    with pytest.raises(ConfigError, match=rf"--out {tmp_path}: is an existing directory"):
        output_file(tmp_path, "--out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*/f/p\.jsonl: its folder .*/f: exists and is not a directory"):
        output_file(tmp_path / "f" / "p.jsonl", "--out")
    if os.geteuid() != 0:  # root writes anything
        (tmp_path / "ro").write_text("x")
        (tmp_path / "ro").chmod(0o444)
        with pytest.raises(ConfigError, match="exists and is not writable"):
            output_file(tmp_path / "ro", "--out")


def test_inspect_data_refuses_a_negative_count(good_yaml, cli):
    rc, _, err = cli("inspect-data", str(good_yaml), "--n", "-1")
    assert rc == 2 and "--n must be >= 0" in err


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_console_script_ends_a_multi_process_run_without_interpreter_finalization(world_size, tmp_path):
    """The console script's end (`entry`): in a process of a multi-process run the exit handlers run, the output
    is flushed and the process ends with os._exit, so no gloo worker thread can meet a finalizing interpreter
    (see `arctic_vl.cli.entry`); in one process it exits normally. The exit code is main's either way."""
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(
        "import atexit, sys, arctic_vl.cli as c\n"
        "marker = sys.argv[1]\n"
        "atexit.register(lambda: open(marker + '.atexit', 'w').close())\n"
        "import os\n"
        "class Finalized:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(1, b' finalized')\n"
        "keep = Finalized()\n"
        "sys.argv = ['arctic_vl', 'no-such-verb']\n"
        "print('printed before the end', end='')\n"
        "c.entry()\n")
    marker = tmp_path / "m"
    env = {**os.environ, "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, str(child), str(marker)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "unknown verb" in proc.stderr
    assert proc.stdout.startswith("printed before the end")  # flushed
    assert (tmp_path / "m.atexit").exists()  # exit handlers ran
    # the interpreter's finalization (module globals torn down) runs only in one process
    assert proc.stdout.endswith(" finalized") == (world_size == "1")
