"""Data that turns bad after the header check, and bytes that are no record: the bad-record policy holds.

Images whose header reads but whose pixels do not decode (a truncated PNG or JPEG, a broken PNG data stream) are
found in DataLoader workers: under `on_bad_record: error` the run exits 2 naming the data file, the record and
the reason; under `skip` the sample is dropped from its batch, counted once by reason, and a run killed and
resumed drops the same samples and writes the same losses. A header claiming 100000 x 100000 pixels is a bad
record (`image_too_large`, `data.max_image_pixels`), and a JSONL line that is not UTF-8 is one bad record.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e_utils import read_metrics, write_yaml


def _noise(fmt: str) -> bytes:
    rng = np.random.default_rng(0)  # noise: the compressed pixels are most of the file
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_images(root: Path) -> dict[str, Path]:
    """kind -> an image file whose header reads but whose pixels do not (or, `bomb`, whose header claims 10^10)."""
    root.mkdir(parents=True, exist_ok=True)
    png, jpg = _noise("PNG"), _noise("JPEG")
    at = png.index(b"IDAT")
    n = struct.unpack(">I", png[at - 4:at])[0]
    idat = bytearray(png[at + 4:at + 4 + n])
    idat[n // 2:n // 2 + 40] = bytes(40)  # zeroed deflate data, with a correct CRC: a broken data stream
    files = {
        "truncated_png": png[: len(png) * 6 // 10],
        "truncated_jpeg": jpg[: len(jpg) * 6 // 10],
        "broken_png_stream": png[:at - 4] + _chunk(b"IDAT", bytes(idat)) + png[at + 8 + n:],
        "bomb": b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""),
    }
    out = {}
    for kind, data in files.items():
        out[kind] = root / f"{kind}.{'jpg' if 'jpeg' in kind else 'png'}"
        out[kind].write_bytes(data)
    return out


def test_bad_pixels_and_bombs_are_named_data_errors(tmp_path):
    from arctic_vl.data.images import image_size, open_image
    from arctic_vl.errors import DataError

    files = bad_images(tmp_path)
    for kind in ("truncated_png", "truncated_jpeg", "broken_png_stream"):
        assert image_size(str(files[kind])) == (64, 64)  # the header check at read time passes ...
        with pytest.raises(DataError) as e:  # ... the decode does not
            open_image(str(files[kind]))
        assert e.value.reason == "unreadable_image" and str(files[kind]) in str(e.value)
    for fn in (image_size, open_image):  # PIL's DecompressionBombError escaped as a traceback (exit 1)
        with pytest.raises(DataError) as e:
            fn(str(files["bomb"]))
        assert e.value.reason == "image_too_large" and "100000 x 100000" in str(e.value)
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 10)).save(good)
    assert image_size(str(good), max_pixels=200) == (20, 10)
    with pytest.raises(DataError, match=r"more than data\.max_image_pixels \(199\)"):
        open_image(str(good), max_pixels=199)


def _records(synthetic_data: Path, n: int, bad: dict[int, Path]) -> list[dict]:
    """The first `n` image records of the shapes data (absolute paths); record i gets image bad[i]."""
    records = [r for r in json.loads((synthetic_data / "train.llava.json").read_text()) if r.get("image")][:n]
    for i, r in enumerate(records):
        r["image"] = str(bad.get(i, synthetic_data / r["image"]))
    return records


def _config(path: Path, model: Path, data_file: Path, **data) -> Path:
    return write_yaml(path, {
        "model": {"name_or_path": str(model)},
        "data": {"sources": [str(data_file)], "micro_batch_size": 2, "shuffle": False, "max_length": 512, **data},
        "trainer": {"output_dir": "out", "max_steps": 6, "gradient_accumulation_steps": 2, "progress_bar": False,
                    "seed": 3},
        "optimizer": {"lr": 3e-3},
        "checkpoint": {"every_n_steps": 2, "keep_last": 1, "export_final": False},
    })


def test_decode_failure_in_worker_under_error_exits_2_naming_file_record_reason(synthetic_data, tiny_llava,
                                                                                tmp_path, cli):
    files = bad_images(tmp_path / "images")
    for kind, at in (("truncated_png", 5), ("broken_png_stream", 2)):
        data_file = tmp_path / f"{kind}.json"
        data_file.write_text(json.dumps(_records(synthetic_data, 8, {at: files[kind]})))
        config = _config(tmp_path / f"{kind}.yaml", tiny_llava, data_file, num_workers=2, on_bad_record="error")
        rc, _, err = cli("train", str(config))
        assert rc == 2, err[-3000:]
        assert f"{data_file}: record {at}: image {files[kind]}: cannot be decoded" in err, err[-3000:]
        assert "reason: unreadable_image" in err and "Traceback" not in err


def test_bad_header_sizes_and_utf8_lines_follow_the_policy(tmp_path, png):
    from arctic_vl.data.bad_records import BadRecordReport
    from arctic_vl.data.sources import SourceSpec, read_source
    from arctic_vl.errors import DataError

    files = bad_images(tmp_path / "images")
    png(tmp_path / "images" / "ok.png", (20, 10))

    def record(image: str | None, answer: str = "red") -> bytes:
        rec = {"conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": answer}]}
        if image:
            rec["image"] = image
        return json.dumps(rec).encode()

    def read(path: Path, policy: str, **kw) -> tuple[list, BadRecordReport]:
        report = BadRecordReport()
        convs = read_source(SourceSpec(path=str(path)), base_dir=tmp_path, seed=0, on_bad_record=policy,
                            report=report, **kw)
        return convs, report

    bomb = tmp_path / "bomb.jsonl"
    bomb.write_bytes(b"\n".join([record("images/ok.png"), record(str(files["bomb"])), record(None)]) + b"\n")
    with pytest.raises(DataError, match=r"bomb.jsonl: record 1 \(line 2\): field image: .*100000 x 100000.*"
                                        r"reason: image_too_large"):
        read(bomb, "error")
    convs, report = read(bomb, "skip")
    assert [c.index for c in convs] == [0, 2] and report.by_reason() == {"image_too_large": 1}
    convs, report = read(bomb, "skip", max_image_pixels=199)  # the limit is configurable: 20 x 10 is too large now
    assert [c.index for c in convs] == [2] and report.by_reason() == {"image_too_large": 2}

    # One line with a byte that is not UTF-8: that line is a bad record, named by its line; the rest trains.
    lines = [record(None, f"a{i}") for i in range(4)]
    lines[2] = lines[2].replace(b"a2", b"a\xff2")
    for name in ("latin.jsonl", "latin.json"):  # .json holding JSON Lines too
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(DataError, match=rf"{name}: record 2 \(line 3\): field <line>: not UTF-8 text "
                                            r"\(byte 0xff at column \d+\).*reason: invalid_json"):
            read(path, "error")
        convs, report = read(path, "skip")
        assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a3"]
        assert report.by_reason() == {"invalid_json": 1}
    whole = tmp_path / "list.json"  # a .json list must be UTF-8 throughout: the error names the line
    whole.write_bytes(b"[\n" + record(None) + b",\n" + record(None).replace(b"red", b"r\xe9d") + b"\n]\n")
    with pytest.raises(DataError, match=r"list.json: line 3: not UTF-8 text \(byte 0xe9\)"):
        read(whole, "skip")


CRASH_AT = """
from arctic_vl.callbacks.base import Callback
from arctic_vl.registry import CALLBACKS, ComponentConfig

class CrashConfig(ComponentConfig):
    type: str = "crash_at_step"
    step: int

@CALLBACKS.register("crash_at_step")
class CrashAt(Callback):
    config_class = CrashConfig
    def on_step_end(self, trainer, info):
        if info.step == self.config.step:
            raise RuntimeError("crash")
"""


def test_skip_drops_bad_pixels_deterministically_and_resumes_exactly(synthetic_data, tiny_llava, tmp_path):
    """12 image records; 1, 4 and 5 do not decode (4 and 5 are a whole micro-batch). 2 workers, 2 epochs, a
    crash after step 3 and a resume from the step-2 checkpoint: the same samples are dropped, the same losses
    written, and each bad record is counted once."""
    from arctic_vl import CALLBACKS
    from arctic_vl.engine import Engine

    if "crash_at_step" not in CALLBACKS.names():
        exec(CRASH_AT, {})
    files = bad_images(tmp_path / "images")
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(_records(synthetic_data, 12, {1: files["truncated_png"],
                                                                  4: files["broken_png_stream"],
                                                                  5: files["truncated_jpeg"]})))
    runs = {}
    for name in ("reference", "crashed"):
        d = tmp_path / name
        d.mkdir()
        config = _config(d / "run.yaml", tiny_llava, data_file, num_workers=2, on_bad_record="skip")
        if name == "crashed":
            with pytest.raises(RuntimeError, match="crash"):
                Engine(config, ["callbacks=[{type: crash_at_step, step: 3}]"]).train()
            assert [m["step"] for m in read_metrics(d / "out")] == [1, 2, 3]
        summary = Engine(config).train()
        runs[name] = (read_metrics(d / "out"), summary)
    (ref, ref_summary), (resumed, resumed_summary) = runs["reference"], runs["crashed"]
    # micro-batches of 2 samples, 2 a step: [0 1 | 2 3], [4 5 | 6 7], [8 9 | 10 11], then the same again
    assert [m["samples"] for m in ref] == [3, 2, 4] * 2
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["samples"] for m in resumed] == [m["samples"] for m in ref]
    assert [m["label_tokens"] for m in resumed] == [m["label_tokens"] for m in ref]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, resumed)) <= 1e-6
    assert ref_summary["skipped_records"] == resumed_summary["skipped_records"] == {"unreadable_image": 3}
    saved = json.loads((tmp_path / "crashed" / "out" / "summary.json").read_text())
    assert saved["skipped_records"] == {"unreadable_image": 3}
