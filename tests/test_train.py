"""speckle-train / speckle-reproduce: resume after a kill, files, and the errors they promise
(speckle-reproduce's tables: test_reproduce.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speckle_models.training import checkpoint as C
from speckle_models.training import loop as L
from speckle_models.reproduction import reproduce
from speckle_models.training import train as T
from speckle_models.training.config import TrainConfig
from speckle_models import atomic_write

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "quick", "--image-size", "16", "--count", "24", "--test-count", "8",
        "--epochs", "1", "--batch-size", "4", "--width", "4", "--device", "cpu", "--no-progress"]

# the per-epoch columns that are measurements of time, not of the training
TIMINGS = ("epoch_time_s", "images_per_s", "train_tflops", "bf16_peak_fraction")


def tiny_config(out, **kw):
    base = dict(model="br-unet", out=str(out), noise_factor=5.0, epochs=2, batch_size=4, width=4,
                image_size=16, count=24, test_count=8, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _equal_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _strip_times(history):
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


@pytest.mark.parametrize("model,norm", [("br-unet", "fused"), ("di-conv-ae", None)])
def test_resume_after_kill_is_bit_exact(tmp_path, tiny_data, model, norm):
    straight = L.train(tiny_config(tmp_path / "a", model=model, norm=norm), data=tiny_data, plots=False)

    def kill(epoch, step):
        if epoch == 1 and step == 2:  # mid-way through the second epoch
            raise L.StopTraining

    with pytest.raises(L.StopTraining):
        L.train(tiny_config(tmp_path / "b", model=model, norm=norm), data=tiny_data, on_step=kill,
                plots=False)
    assert C.load_checkpoint(tmp_path / "b" / C.CHECKPOINT_NAME)["epoch"] == 1
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]  # no temp files
    resumed = L.train(tiny_config(tmp_path / "b", model=model, norm=norm), data=tiny_data,
                      resume=True, plots=False)
    _equal_state(straight.model.state_dict(), resumed.model.state_dict())
    assert _strip_times(straight.history) == _strip_times(resumed.history)
    a = torch.load(tmp_path / "a" / C.CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / C.CHECKPOINT_NAME, weights_only=True)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_checkpoint_and_metrics_files(tmp_path, tiny_data):
    L.train(tiny_config(tmp_path, epochs=1), data=tiny_data)
    ckpt = torch.load(tmp_path / C.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["format"] == C.CHECKPOINT_FORMAT and ckpt["epoch"] == 1
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in doc["history"]] == [1]
    assert {"train_loss", "val_loss", "val_psnr", "val_ssim", "epoch_time_s", "train_tflops",
            "bf16_peak_fraction"} <= set(doc["history"][0])
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,train_loss,val_loss")
    for name in ("train_loss.png", "train_samples.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_corrupt_and_foreign_checkpoints(tmp_path, tiny_data):
    path = tmp_path / C.CHECKPOINT_NAME
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        C.load_checkpoint(path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        L.train(tiny_config(tmp_path), data=tiny_data, resume=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a speckle-train checkpoint"):
        C.load_checkpoint(path)
    # A checkpoint of another model, or of other settings, is refused before anything is written.
    other = tmp_path / "other"
    L.train(tiny_config(other, model="d-unet", epochs=1), data=tiny_data, plots=False)
    before = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    with pytest.raises(ValueError, match="holds a 'd-unet' run"):
        L.train(tiny_config(other, model="br-unet"), data=tiny_data, resume=True)
    with pytest.raises(ValueError, match="other settings"):
        L.train(tiny_config(other, model="d-unet", noise_factor=1.0), data=tiny_data, resume=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        L.train(tiny_config(other, model="d-unet"), data=tiny_data)
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == before


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_write.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _cli_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys, cache_dir):
    out = tmp_path / "run"
    err = _cli_error(T.main, ["--model", "resnet", "--out", str(out)] + TINY, capsys)
    assert "invalid choice: 'resnet'" in err
    err = _cli_error(T.main, ["--model", "d-unet", "--out", str(out), *TINY, "--preset", "slow"], capsys)
    assert "unknown preset 'slow'" in err
    err = _cli_error(T.main, ["--model", "d-unet", "--out", str(out), *TINY, "--data", str(tmp_path / "nope")],
                     capsys)
    assert "does not exist" in err
    err = _cli_error(T.main, ["--model", "di-conv-ae", "--norm", "fused", "--out", str(out), *TINY], capsys)
    assert "U-Nets only" in err
    err = _cli_error(reproduce.main, ["--out", str(out), *TINY, "--preset", "slow"], capsys)
    assert "unknown preset" in err
    err = _cli_error(reproduce.main, ["--out", str(out), *TINY, "--models", "vgg"], capsys)
    assert "invalid choice" in err
    assert not out.exists()  # no half-written output


def test_cli_subprocess_resume(tmp_path, cache_dir):
    """The console entry point end to end: a run, a refused rerun, a resume to more epochs."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "speckle_models.training.train", "--model", "d-unet", "--noise-factor", "5",
           "--out", str(out), "--cache-dir", cache_dir, *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["epoch"] == 1
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr
    more = subprocess.run(cmd + ["--resume", "--epochs", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert more.returncode == 0, more.stderr
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]


def test_torchrun_two_processes_train_and_rank0_writes(tmp_path):
    # speckle-train under torchrun (gloo on CPU): synchronized Br-U-Net statistics, DDP,
    # each rank its shard of every global batch, one set of files written by rank 0.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "speckle_models.training.train", "--model", "br-unet", "--preset", "quick", "--count", "40",
           "--test-count", "8", "--image-size", "16", "--epochs", "2", "--batch-size", "2",
           "--width", "4", "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert all(math.isfinite(row["train_loss"]) for row in metrics["history"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert int(state["epoch"]) == 2
    # one JSON summary line on stdout: rank 1 stayed quiet
    assert sum(1 for line in proc.stdout.splitlines() if line.startswith("{")) == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
