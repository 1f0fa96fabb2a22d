"""issue 24 item 10: `predict` checks its arguments and its --out file before the config or the model is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "{dir}"], "predict: --out {dir}: is an existing directory; name the file to write"),
    (["--out", "{file}/p.jsonl"], "predict: --out {file}/p.jsonl: its folder {file}: exists and is not a directory"),
    (["--prompt", " "], "--prompt must not be empty"),
])
def test_predict_refuses_bad_arguments_up_front(args, says, tmp_path: Path, cli) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    (tmp_path / "a_file").write_text("x")
    fill = {"dir": str(tmp_path), "file": str(tmp_path / "a_file")}
    argv = ["--out", str(tmp_path / "p.jsonl"), *[a.format(**fill) for a in args]]
    # the config does not exist: an argument error must come first (before, each ran on into the model load)
    rc, _, err = cli("predict", str(tmp_path / "no_config.yaml"), "--images", str(image), *argv)
    assert rc == 2 and "Traceback" not in err, err
    assert says.format(**fill) in err, err
