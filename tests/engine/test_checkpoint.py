"""
SafeCheckpointer (focus_detr.engine.checkpoint): atomic saves that survive a SIGKILL in the middle,
and clear errors or warnings for checkpoints that do not fit the model.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO_ROOT, build_tiny_model

from focus_detr.engine.checkpoint import CheckpointError, SafeCheckpointer

# A child process that saves checkpoint "model_a", then starts saving "model_b" and blocks at
# the point given by argv[2] until it is killed:
#   write:    half of model_b's bytes are written to disk
#   rename:   model_b is complete and flushed, not yet renamed
#   tag:      model_b is in place, last_checkpoint's new content is flushed, not yet renamed
_SAVER = textwrap.dedent("""
    import os, sys, time
    import torch
    from focus_detr.engine import checkpoint

    save_dir, block_at = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(3, 2)
    saver = checkpoint.SafeCheckpointer(model, save_dir)
    saver.save("model_a", iteration=1)
    with torch.no_grad():
        model.weight.add_(1.0)

    def block():
        print("BLOCKED", flush=True)
        time.sleep(600)

    real_save, real_fsync, fsyncs = torch.save, os.fsync, []

    def slow_save(obj, f):
        real_save(obj, f)
        f.flush()
        size = f.tell()
        f.seek(size // 2)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
        block()

    def blocking_fsync(fd):
        fsyncs.append(fd)
        # model_b: file fsync (1), folder fsync (2); last_checkpoint: file fsync (3)
        if (block_at, len(fsyncs)) in (("rename", 1), ("tag", 3)):
            real_fsync(fd)
            block()
        real_fsync(fd)

    if block_at == "write":
        torch.save = slow_save
    else:
        os.fsync = blocking_fsync
    saver.save("model_b", iteration=2)
    print("SAVED", flush=True)
    """)


@pytest.mark.parametrize("block_at", ["write", "rename", "tag"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, block_at):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path), block_at],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "BLOCKED"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    # model_b is either absent or complete, never a half-written model_b.pth
    if block_at == "tag":
        assert torch.load(tmp_path / "model_b.pth", weights_only=True)["iteration"] == 2
    else:
        assert not (tmp_path / "model_b.pth").exists()
        assert (tmp_path / "model_b.pth.partial").exists()

    model = torch.nn.Linear(3, 2)
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    # the next save cleans up what the killed one left
    checkpointer.save("model_c")
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".partial")) == []
    assert (tmp_path / "last_checkpoint").read_text() == "model_c.pth"


def test_truncated_and_corrupt_checkpoints_are_named(tmp_path):
    model = torch.nn.Linear(3, 2)
    SafeCheckpointer(model, str(tmp_path)).save("model")
    path = tmp_path / "model.pth"
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"{bad}.*truncated, corrupt"):
            SafeCheckpointer(model).load(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        SafeCheckpointer(model).load(str(tmp_path / "missing.pth"))
    # a failed load does not block the next one
    checkpointer = SafeCheckpointer(model)
    with pytest.raises(CheckpointError):
        checkpointer.load(str(garbage))
    checkpointer.load(str(path))


def test_a_checkpoint_of_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": torch.nn.Conv2d(3, 4, 3).state_dict()}, path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r"No tensor of checkpoint .*other.pth fits"):
        SafeCheckpointer(model).load(str(path))
    # same names, other shapes everywhere: nothing fits either
    torch.save({"model": torch.nn.Sequential(torch.nn.Linear(5, 7)).state_dict()}, path)
    with pytest.raises(CheckpointError, match="fits the model"):
        SafeCheckpointer(model).load(str(path))


def test_a_partly_matching_checkpoint_loads_and_logs_what_did_not(tmp_path, caplog):
    source = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = source.state_dict()
    state.pop("1.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "partial.pth")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(model).load(str(tmp_path / "partial.pth"))
    assert torch.equal(model[1].weight, source[1].weight)
    text = caplog.text
    assert "1.bias" in text and "extra.weight" in text


def test_another_class_count_restarts_the_class_heads_with_one_warning(tmp_path, caplog):
    three = build_tiny_model(num_classes=3, seed=0)
    SafeCheckpointer(three, str(tmp_path)).save("three")
    five = build_tiny_model(num_classes=5, seed=1)
    initial = {k: v.clone() for k, v in five.state_dict().items()}
    reshaped = sorted(k for k, v in three.state_dict().items() if v.shape != initial[k].shape)
    assert reshaped, "the class count changes no tensor shape"
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(five).load(str(tmp_path / "three.pth"))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert all(key in message for key in reshaped), message
    for key, value in five.state_dict().items():
        expected = initial[key] if key in reshaped else three.state_dict()[key]
        assert torch.equal(value, expected), key
