"""focus_detr.utils.output_files: a tool's output never replaces an input or an existing file."""

import os

import pytest

from focus_detr.utils.output_files import OutputPathError, check_not_an_input, check_output_file


def test_an_input_is_recognised_through_links_and_relative_paths(tmp_path, monkeypatch):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"w")
    os.symlink(source, tmp_path / "symlink.pth")
    os.link(source, tmp_path / "hardlink.pth")
    monkeypatch.chdir(tmp_path)
    for output in ("weights.pth", "./weights.pth", "symlink.pth", "hardlink.pth"):
        with pytest.raises(OutputPathError, match=f"The output {output} is the input"):
            check_not_an_input(output, [None, str(source)])
    check_not_an_input("other.pth", [str(source)])


def test_an_existing_output_needs_the_flag(tmp_path):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"x")
    with pytest.raises(OutputPathError, match=f"The output {existing} exists.* add --overwrite"):
        check_output_file(str(existing))
    with pytest.raises(OutputPathError, match="is the input"):
        check_output_file(str(existing), inputs=[str(existing)])
    check_output_file(str(existing), inputs=[str(existing)], overwrite=True)
    check_output_file(str(tmp_path / "new.onnx"), inputs=[str(existing)])
