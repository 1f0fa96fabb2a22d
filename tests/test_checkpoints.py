"""Checkpoints: a manifest written last, verified on resume; corrupt checkpoints are skipped by name; every I/O
failure names its file (a full disk says so, with the bytes needed); DeepSpeed's files are never unpickled.

The checkpointer is exercised in-process on a toy model with the `single` backend (what the loop calls:
`save`, `latest`, `load`); the end-to-end fallback with exact losses is in test_resume.py.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from arctic_vl.checkpoint.checkpointer import CheckpointConfig, Checkpointer
from arctic_vl.checkpoint.manifest import MANIFEST, sha256_of
from arctic_vl.distributed.backends import DistributedConfig, Single
from arctic_vl.errors import CheckpointError
from tests.e2e_utils import run_python, write_yaml


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.frozen = torch.nn.Linear(8, 1)
        self.frozen.requires_grad_(False)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    model.a(torch.ones(2, 8)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@pytest.fixture
def run(tmp_path: Path):
    """Checkpoints step-1, step-2, step-3 of a toy run (all kept) and the parts that wrote them."""
    model, opt, sched = _parts()
    dist = Single(DistributedConfig())
    ck = Checkpointer(CheckpointConfig(keep_last=None), tmp_path)
    for step in (1, 2, 3):
        _train_step(model, opt, sched)
        ck.save(step=step, model=model, optimizer=opt, scheduler=sched, dist=dist,
                trainer_state={"step": step, "epoch": 0, "batch_in_epoch": step, "config": {}})
    return {"ck": ck, "dist": dist, "model": model, "opt": opt, "sched": sched, "root": tmp_path}


def test_manifest_lists_every_file_and_latest_verifies(run):
    ck = run["ck"]
    step3 = ck.dir / "step-3"
    manifest = json.loads((step3 / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in step3.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == on_disk == ["model.safetensors", "optimizer.pt", "rng-rank0.pt", "scheduler.pt",
                                           "trainer_state.json"]
    for name, entry in manifest.items():
        assert entry == {"size": (step3 / name).stat().st_size, "sha256": sha256_of(step3 / name)}
    assert ck.verify(step3) == [] and ck.latest() == step3


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_tensor_byte(path: Path) -> None:
    """Flip a byte inside the first tensor record of a torch (zip) file, past its local header."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _unreadable(path: Path) -> None:  # a directory where a file was (root reads any file, so no chmod)
    path.unlink()
    path.mkdir()


DAMAGE = {
    "flipped_weight_byte": ("model.safetensors", _flip, "contents differ from the manifest"),
    "truncated_optimizer": ("optimizer.pt", _truncate, "the manifest says"),
    "missing_rng": ("rng-rank0.pt", Path.unlink, "rng-rank0.pt: missing"),
    "unreadable_scheduler": ("scheduler.pt", _unreadable, "scheduler.pt"),
    "missing_manifest": (MANIFEST, Path.unlink, "manifest.json: missing"),
    "broken_manifest": (MANIFEST, lambda p: p.write_text("{"), "manifest.json: unreadable"),
    "broken_trainer_state": ("trainer_state.json", lambda p: p.write_text("{\"step\": 3"), "trainer_state.json"),
    "planted_file": ("extra.pt", lambda p: torch.save({"x": 1}, p), "extra.pt: not in the manifest"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_is_skipped_by_name(run, warnings, kind):
    name, damage, says = DAMAGE[kind]
    ck = run["ck"]
    damage(ck.dir / "step-3" / name)
    problems = ck.verify(ck.dir / "step-3")
    assert any(says in p for p in problems), problems
    assert ck.latest() == ck.dir / "step-2"
    text = "\n".join(warnings)
    assert "step-3: checkpoint fails verification" in text and says in text, text
    assert "falling back to step-2" in text


def test_no_checkpoint_verifies_exit_1_naming_files(run, tmp_path, cli):
    ck = run["ck"]
    for step in (1, 2, 3):
        _flip(ck.dir / f"step-{step}" / "optimizer.pt")
    with pytest.raises(CheckpointError) as err:
        ck.latest()
    for step in (1, 2, 3):
        assert f"step-{step}: optimizer.pt: contents differ" in str(err.value)
    # the same through the CLI (`export` verifies the checkpoint it reads): exit 1, the files named, no traceback
    (tmp_path / "data.json").write_text("[]\n")
    write_yaml(tmp_path / "config.yaml", {"model": {"family": "llava_next"},
                                          "data": {"sources": [str(tmp_path / "data.json")]},
                                          "trainer": {"output_dir": str(tmp_path)}})
    rc, _, err_text = cli("export", str(tmp_path), "--merge-lora", str(tmp_path.parent / "exported"))
    assert rc == 1 and "Traceback" not in err_text, err_text
    assert "no checkpoint verifies" in err_text and "step-3: optimizer.pt: contents differ" in err_text
    rc, _, err_text = cli("export", str(tmp_path), "--merge-lora", str(tmp_path.parent / "e2"),
                          "--checkpoint", "step-2")
    assert rc == 1 and "step-2: checkpoint fails verification: optimizer.pt" in err_text, err_text


def test_checkpoint_without_manifest_from_an_older_version(run, warnings):
    """No manifest and no checkpoint_format: accepted after structural checks (zip CRCs, safetensors headers)."""
    ck = run["ck"]
    for step in (2, 3):
        path = ck.dir / f"step-{step}"
        (path / MANIFEST).unlink()
        state = json.loads((path / "trainer_state.json").read_text())
        del state["checkpoint_format"]
        (path / "trainer_state.json").write_text(json.dumps(state))
    assert ck.latest() == ck.dir / "step-3"
    assert "written before checkpoints carried a manifest" in "\n".join(warnings)
    _flip_tensor_byte(ck.dir / "step-3" / "optimizer.pt")  # torch's zip records carry CRCs: a flip shows
    _truncate(ck.dir / "step-2" / "model.safetensors")
    assert any("fails its CRC" in p for p in ck.verify(ck.dir / "step-3"))
    assert any("not a complete safetensors file" in p for p in ck.verify(ck.dir / "step-2"))
    assert ck.latest() == ck.dir / "step-1"


def test_corrupt_files_fail_to_load_by_name(run):
    """What `load` reads is named when it cannot be read (e.g. a file damaged after verification)."""
    ck, dist = run["ck"], run["dist"]
    path = ck.dir / "step-3"
    model, opt, sched = _parts(seed=1)
    _truncate(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-3/model.safetensors: cannot load: .*not a complete safetensors"):
        ck.load(path, model=model, optimizer=opt, scheduler=sched, dist=dist)
    path = ck.dir / "step-2"
    (path / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"step-2/optimizer.pt: cannot load"):
        ck.load(path, model=model, optimizer=opt, scheduler=sched, dist=dist)


def test_load_restores_exactly(run):
    ck, dist = run["ck"], run["dist"]
    model, opt, sched = _parts(seed=5)
    state = ck.load(ck.dir / "step-3", model=model, optimizer=opt, scheduler=sched, dist=dist)
    assert state["step"] == 3 and state["batch_in_epoch"] == 3
    assert torch.equal(model.a.weight, run["model"].a.weight) and torch.equal(model.a.bias, run["model"].a.bias)
    mine, saved = opt.state_dict()["state"], run["opt"].state_dict()["state"]
    assert all(torch.equal(mine[i]["exp_avg_sq"], saved[i]["exp_avg_sq"]) for i in saved) and len(mine) == 2
    assert sched.state_dict() == run["sched"].state_dict()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "torch_enforce_fail"])
def test_full_disk_names_path_and_bytes_needed(run, monkeypatch, writer):
    import safetensors.torch

    from arctic_vl.checkpoint import files

    ck, dist, model = run["ck"], run["dist"], run["model"]
    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", _enospc)
    elif writer == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    else:  # what torch really raises on a full disk: no errno, only its zip writer's complaint
        def enforce_fail(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")
        monkeypatch.setattr(torch, "save", enforce_fail)
        monkeypatch.setattr(files, "free_bytes", lambda path: 512)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CheckpointError) as err:
        ck.save(step=4, model=model, optimizer=opt, scheduler=sched, dist=dist,
                trainer_state={"step": 4, "epoch": 0, "batch_in_epoch": 4, "config": {}})
    msg = str(err.value)
    needed = sum(p.stat().st_size for p in (ck.dir / "step-3").iterdir())
    assert f"{ck.dir / '.tmp-step-4'}" in msg and "the disk is full at" in msg, msg
    assert f"needs about {needed:,} bytes" in msg and "bytes (" in msg and "are free" in msg, msg
    assert not (ck.dir / ".tmp-step-4").exists(), "the partial write is removed"
    monkeypatch.undo()
    assert ck.latest() == ck.dir / "step-3", "the previous checkpoint is intact"


def test_write_failure_other_than_a_full_disk_names_file(run, monkeypatch):
    ck, dist, model = run["ck"], run["dist"], run["model"]

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(CheckpointError, match=r"\.tmp-step-5/rng-rank0.pt: cannot write this checkpoint file: "
                                              r"Permission denied"):
        ck.save(step=5, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                dist=dist, trainer_state={"step": 5, "epoch": 0, "batch_in_epoch": 5, "config": {}})


def test_engine_shard_write_failure_names_the_shard(run, monkeypatch):
    """DeepSpeed writes its shards itself (torch.save, whose full-disk error names no file): the message names
    the shard and says the disk is full."""
    from arctic_vl.checkpoint import files
    from arctic_vl.distributed.deepspeed_backend import _saves_name_their_file

    ck, model = run["ck"], run["model"]

    class ShardingBackend(Single):
        def save_state(self, model, optimizer, path):
            with _saves_name_their_file():
                (Path(path) / "deepspeed").mkdir()
                torch.save({"w": torch.zeros(3)}, Path(path) / "deepspeed" / "mp_rank_00_model_states.pt")
            return True

    def enforce_fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(files, "free_bytes", lambda path: 100)
    from arctic_vl.checkpoint import checkpointer

    monkeypatch.setattr(checkpointer, "save_torch", lambda obj, path, needed: None)  # the core's own files fit
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(CheckpointError, match=r"\.tmp-step-4/deepspeed/mp_rank_00_model_states.pt: the disk is full"):
        ck.save(step=4, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                dist=ShardingBackend(DistributedConfig()), trainer_state={"step": 4, "epoch": 0, "batch_in_epoch": 4})
    assert not (ck.dir / ".tmp-step-4").exists()


# ----------------------------------------------------------------------------------------------- DeepSpeed
DS_CHILD = r"""
import json, sys, types
from pathlib import Path
import torch
torch.set_num_threads(1)
import deepspeed.ops
# one process needs no shared-memory collectives: skip JIT-compiling DeepSpeed's C++ op for them (minutes)
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from arctic_vl.config.schema import load_config
from arctic_vl.distributed.deepspeed_backend import DeepSpeed, DeepSpeedConfig
from arctic_vl.errors import CheckpointError

root, marker = Path(sys.argv[1]), Path(sys.argv[2])
(root / "x.json").write_text("[]")
engine_config = load_config({"model": {"family": "llava_next"}, "data": {"sources": [str(root / "x.json")]},
                             "trainer": {"output_dir": str(root / "out")}})

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    def forward(self, batch, counts=None):
        return types.SimpleNamespace(loss_sum=self.b(torch.tanh(self.a(batch["x"]))).pow(2).sum())

class Planted:
    def __reduce__(self):  # unpickling this creates the marker file
        return (Path.touch, (marker,))

results, dist = {}, None
x = {"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(1))}
for stage in (2, 3):
    cfg = DeepSpeedConfig(zero_stage=stage)
    if dist is None:
        dist = DeepSpeed(cfg, engine_config)
        dist.setup()
    dist.config = cfg
    toy = Toy()
    opt = torch.optim.AdamW(toy.parameters(), lr=1e-2)
    model, opt, sched = dist.prepare(toy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    def step():
        dist.backward(model, model(x, None).loss_sum)
        dist.step(model, opt, sched, 1.0)
    step()
    ckpt = root / f"ck{stage}"
    dist.save_state(model, opt, str(ckpt))
    saved = float(model(x, None).loss_sum)
    step()
    after = float(model(x, None).loss_sum)
    step()
    dist.load_state(model, opt, str(ckpt))  # weights-only, with DeepSpeed's own types allowed
    back = float(model(x, None).loss_sum)
    step()
    again = float(model(x, None).loss_sum)
    name = "mp_rank_00_model_states.pt" if stage == 2 else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    target = ckpt / "deepspeed" / name
    torch.save({"module": Planted()}, target)
    try:
        dist.load_state(model, opt, str(ckpt))
        error = None
    except CheckpointError as e:
        error = str(e)
    results[stage] = {"saved": saved, "after": after, "back": back, "again": again, "error": error,
                      "target": str(target), "marker": marker.exists()}
torch.load(target, weights_only=False)  # the planted file really runs code when unpickled
results["marker_with_plain_load"] = marker.exists()
print("RESULT " + json.dumps(results))
"""


def test_deepspeed_resume_is_weights_only_and_refuses_a_planted_pickle(tmp_path):
    """ZeRO-2 and ZeRO-3 (one process, gloo): a resume restores the state exactly through weights-only loads;
    a pickle planted in DeepSpeed's files fails to load, named, and never runs."""
    from arctic_vl.distributed.deepspeed_backend import free_port

    marker = tmp_path / "MARKER"
    proc = run_python(DS_CHILD, str(tmp_path), str(marker), timeout=600, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for stage in ("2", "3"):
        r = results[stage]
        assert r["back"] == r["saved"] != r["after"], f"ZeRO-{stage}: the loaded state is the saved one exactly"
        assert r["again"] == r["after"], f"ZeRO-{stage}: the step after resume equals the uninterrupted one"
        assert r["error"] and r["error"].startswith(f"{r['target']}: refused to load"), r["error"]
        assert "never unpickled" in r["error"]
        assert not r["marker"], f"ZeRO-{stage}: the planted pickle ran"
    assert results["marker_with_plain_load"], "the planted file is a real exploit for a plain torch.load"
    shutil.rmtree(tmp_path / "ck2")


@pytest.mark.parametrize("stray", [{"step": 999, "epoch": 0, "batch_in_epoch": 0},
                                   {"step": 999, "epoch": 0, "batch_in_epoch": 0, "checkpoint_format": 2}],
                         ids=["no-format", "format-2"])
def test_a_stray_step_dir_holding_only_a_trainer_state_is_skipped_by_name(run, warnings, stray):
    """checkpoints/step-999/ with only trainer_state.json (before: taken as the latest, then refused with every
    setting 'differing'): incomplete, named in a warning, and the latest complete checkpoint is used."""
    ck = run["ck"]
    stray_dir = ck.dir / "step-999"
    stray_dir.mkdir()
    (stray_dir / "trainer_state.json").write_text(json.dumps(stray))
    assert ck.latest() == ck.dir / "step-3"
    text = "\n".join(warnings)
    assert f"{stray_dir}: checkpoint fails verification" in text, text
    assert "falling back to step-3" in text
    if "checkpoint_format" not in stray:
        assert "incomplete: no manifest.json and no scheduler.pt, model.safetensors, optimizer.pt" in text, text


def test_a_checkpoint_whose_state_names_another_step_is_skipped(run, warnings):
    """A whole checkpoint copied to another step's name (step-3 as step-7): its step does not match its folder."""
    ck = run["ck"]
    shutil.copytree(ck.dir / "step-3", ck.dir / "step-7")
    assert ck.latest() == ck.dir / "step-3"
    assert "trainer_state.json: step is 3, but the folder is step-7" in "\n".join(warnings)


def test_file_digest_hashes_small_files_whole_and_large_ones_in_spread_blocks(tmp_path):
    """Below `whole_below` every byte counts; above it, the blocks spread from the first byte to the last (and the
    size) do: the ends and the middle block are seen, a byte between blocks is not (what the README states)."""
    from arctic_vl.checkpoint.fingerprint import file_digest

    f = tmp_path / "data.bin"
    base = bytes(range(256)) * 16  # 4096 bytes
    f.write_bytes(base)
    kw = {"whole_below": 1024, "block": 16, "blocks": 5}  # blocks at 0, 1020, 2040, 3060, 4080

    def digest_with(offset: int) -> str:
        data = bytearray(base)
        data[offset] ^= 0xFF
        f.write_bytes(bytes(data))
        return file_digest(f, **kw)

    f.write_bytes(base)
    original = file_digest(f, **kw)
    for seen in (0, 2040 + 7, 4095):
        assert digest_with(seen) != original, seen
    assert digest_with(500) == original  # between two sampled blocks of a large file
    f.write_bytes(base[:-1])
    assert file_digest(f, **kw) != original  # any size change
    f.write_bytes(base)
    whole = file_digest(f)  # the default: a 4 KiB file is hashed whole
    digest_with(500)
    assert file_digest(f) != whole
