"""issue 24 item 10: the dense-caption verbs check their arguments and output paths before any model loads, and
read their input lines under the rules of training data (named by line and field, never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RECORD = {"images": ["a.png"], "width": 8, "height": 8, "objects": [{"desc": "red circle", "bbox_2d": [0, 0, 4, 4]}],
          "summary": "a red circle"}


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    path = tmp_path / "dense.jsonl"
    path.write_text("".join(json.dumps({**RECORD, "images": [f"{i}.png"]}) + "\n" for i in range(4)))
    return path


def _verb(cli_in_process, *args: str) -> tuple[int, str]:
    code, _, err = cli_in_process("dense-caption", *args)
    assert "Traceback" not in err, err
    return code, err


def test_make_stage_data_refuses_bad_arguments_and_lines(dense: Path, tmp_path: Path, cli_in_process) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["make-stage-data", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "o")],
         "missing.jsonl: not found"),
        (["make-stage-data", str(dense), "--out-dir", str(tmp_path / "o"), "--group-size", "0"],
         "--group-size must be >= 1"),
        (["make-stage-data", str(dense), "--out-dir", str(a_file)],
         f"--out-dir {a_file}: exists and is not a directory"),
    ]
    for args, says in cases:
        code, err = _verb(cli_in_process, *args)
        assert code == 2 and says in err, (args, err)
    for line, says in [("[1, 2]", "line 3: field <record>: must be a JSON object (a dense-caption record), got list "
                                  "[reason: malformed_record]"),
                       (b"\xff\xfe", "line 3: field <line>: not UTF-8 text (byte 0xff at column 1) "
                                     "[reason: invalid_json]"),
                       ('{"images": ["x.png"]}', "line 3: field summary: required"),
                       ('{"images": ["x.png"], "summary": 3}', "line 3: field summary: must be a non-empty string")]:
        bad = tmp_path / "bad.jsonl"
        head = dense.read_bytes().splitlines(keepends=True)[:2]
        bad.write_bytes(b"".join(head) + (line if isinstance(line, bytes) else line.encode()) + b"\n")
        code, err = _verb(cli_in_process, "make-stage-data", str(bad), "--out-dir", str(tmp_path / "o"))
        assert code == 2 and f"{bad}: {says}" in err, err
    # skip mode counts the bad line; a BOM at the start changes nothing
    bad.write_bytes(b"\xef\xbb\xbf" + bad.read_bytes())
    code, out, err = cli_in_process("dense-caption", "make-stage-data", str(bad), "--out-dir", str(tmp_path / "o"),
                                    "--group-size", "1", "--on-bad-record", "skip")
    assert code == 0, err
    result = json.loads(out)
    assert result["groups"] == 2 and result["skipped"] == {"malformed_record": 1}


def test_stage_a_and_b_check_their_paths_before_the_model(dense: Path, tmp_path: Path, cli_in_process) -> None:
    """Checked before the config is even read (here it does not exist): a bad --out, a missing --summaries."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    groups = tmp_path / "groups.jsonl"
    groups.write_text('{"group": "g", "images": ["a.png"]}\n')
    config = str(tmp_path / "no_config.yaml")
    code, err = _verb(cli_in_process, "stage-a", config, "--images", str(groups), "--out", str(a_file / "o.jsonl"))
    assert code == 2 and f"stage-a: --out {a_file / 'o.jsonl'}: its folder {a_file}: exists and is not a directory" \
        in err, err
    code, err = _verb(cli_in_process, "stage-a", config, "--images", str(groups), "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path}: is an existing directory" in err, err
    code, err = _verb(cli_in_process, "stage-b", config, "--summaries", str(tmp_path / "none.jsonl"),
                      "--out", str(tmp_path / "v.jsonl"))
    assert code == 2 and f"--summaries {tmp_path / 'none.jsonl'}: not found" in err, err
    code, err = _verb(cli_in_process, "stage-a", config, "--images", str(groups), "--out", str(tmp_path / "o.jsonl"),
                      "--max-new-tokens", "0")
    assert code == 2 and "--max-new-tokens must be >= 1" in err, err


def test_stage_input_lines_are_named_by_line_and_field(tmp_path: Path) -> None:
    from dense_caption.inference import read_groups, read_summaries

    from arctic_vl import DataError

    groups = tmp_path / "groups.jsonl"
    groups.write_text('\ufeff{"group": "g", "images": ["a.png"]}\n{"group": "h", "images": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"groups\.jsonl: line 2: field images: must be a non-empty list of image "
                                        r"paths, got \[\] \[reason: malformed_record\]"):
        read_groups([str(groups)])
    summaries = tmp_path / "s.jsonl"
    summaries.write_text('{"group": "g", "index": 0, "summary": "x"}\n{"group": "g", "index": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"s\.jsonl: line 2: field <line>: not valid JSON \(a number with more than "
                                        r"4300 digits\) \[reason: invalid_json\]"):
        read_summaries(summaries)
