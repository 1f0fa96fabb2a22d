"""CONTRIBUTING.md's example plugin, built and installed from the text of the page, trains.

Every fenced block whose first line is `# file: PATH` is written to PATH; the package is installed with pip
(a real wheel build, into a throwaway target directory on PYTHONPATH) and used from the page's own config:
its record format reads the data (a bad record is counted by its own reason), its trainer's second
normaliser makes (micro-batch 2) and (micro-batch 1 x accumulation 2) give equal losses, its callback writes
one line per step, its CLI verb lists its format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e_utils import REPO, read_metrics, subprocess_env

BLOCK = re.compile(r"```\w*\n# file: (\S+)\n(.*?)```", re.S)

DRIVER = """
import contextlib, io, json, sys
from arctic_vl.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_the_documented_plugin_builds_installs_and_trains(tmp_path: Path, synthetic_data: Path):
    files = BLOCK.findall((REPO / "CONTRIBUTING.md").read_text())
    assert {p for p, _ in files} >= {"example-plugin/pyproject.toml", "example-plugin/arctic_vl_example/__init__.py",
                                      "example-plugin/run.yaml"}
    for rel, text in files:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(tmp_path / "example-plugin")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (site / "arctic_vl_example" / "__init__.py").is_file()

    work = tmp_path / "example-plugin"
    images = sorted(Path(p) for p in (synthetic_data / "images").glob("*.png"))[:3]
    for image in images:
        shutil.copy(image, work / image.name)
    rows = [{"question": f"<image>\nWhat colour? ({i})", "answer": "red", "image": images[i % 3].name}
            for i in range(6)]
    rows += [{"question": "What is 2 + 2?", "answer": "four"}, {"question": "Blank?", "answer": "  "}]
    (work / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    argvs = [["plugins"], ["example-formats"], ["run.yaml"],
             ["run.yaml", "--set", "trainer.output_dir=runs/accumulated", "--set", "data.micro_batch_size=1",
              "--set", "trainer.gradient_accumulation_steps=2"]]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (plugins_rc, plugins_out, _), (fmt_rc, fmt_out, _), (rc1, _, err1), (rc2, _, err2) = json.loads(
        proc.stdout.splitlines()[-1])
    assert plugins_rc == 0 and "example (arctic_vl_example, arctic-vl-example 0.1.0): ok" in plugins_out
    assert "record_formats: qa_pairs" in plugins_out and "cli: example-formats" in plugins_out
    assert fmt_rc == 0 and "qa_pairs" in fmt_out.split()
    assert rc1 == 0, err1
    assert rc2 == 0, err2

    plain, accumulated = work / "runs" / "example", work / "runs" / "accumulated"
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["skipped_records"] == {"empty_answer": 1}
    a, b = read_metrics(plain), read_metrics(accumulated)
    assert [m["step"] for m in a] == [1, 2, 3]
    assert all(m["hidden_l2"] > 0 and m["ce"] > 0 for m in a)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5  # the second normaliser is exact
    log = [line.split("\t") for line in (plain / "loss_log.tsv").read_text().splitlines()]
    assert [int(s) for s, _ in log] == [1, 2, 3]
    assert [float(v) for _, v in log] == [m["loss"] for m in a]
