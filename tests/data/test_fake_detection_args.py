"""`selfsup fake-detection` never writes over an existing set, and refuses counts and sizes it cannot
use with the option and its valid range (issue 23)."""
import pytest

from selfsup.cli import main

from conftest import cli_error

SMALL = ["--trainval", "2", "--test", "1", "--size", "16"]


def test_fake_detection_refuses_a_non_empty_folder(tmp_path, capsys):
    lists = tmp_path / "VOCdevkit/VOC2007/ImageSets/Main"
    lists.mkdir(parents=True)
    (lists / "trainval.txt").write_text("000005\n")   # a real devkit's list
    err = cli_error(capsys, ["fake-detection", str(tmp_path), *SMALL])
    assert "is not empty" in err and "new or empty folder" in err
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["trainval.txt"]
    assert (lists / "trainval.txt").read_text() == "000005\n"
    (tmp_path / "f").write_text("x")
    assert "is a file" in cli_error(capsys, ["fake-detection", str(tmp_path / "f"), *SMALL])
    (tmp_path / "empty").mkdir()
    assert main(["fake-detection", str(tmp_path / "empty"), *SMALL]) == 0
    assert (tmp_path / "empty/VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text() == "000002\n"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("option,value,valid", [
    ("--trainval", "-3", "at least 1"), ("--test", "-1", "at least 1"), ("--trainval", "0", "at least 1"),
    ("--size", "8", "from 16 to 4096"), ("--size", "-64", "from 16 to 4096"), ("--max-objects", "0", "at least 1"),
    ("--max-objects", "-2", "at least 1"), ("--difficult-size", "40", "from 0 to 16 (--size)"),
    ("--difficult-size", "-1", "from 0 to 16"), ("--seed", "-1", "at least 0")])
def test_fake_detection_names_the_option_and_its_range(option, value, valid, tmp_path, capsys):
    args = dict(zip(SMALL[::2], SMALL[1::2]))
    args[option] = value
    err = cli_error(capsys, ["fake-detection", str(tmp_path / "out"), *[x for kv in args.items() for x in kv]])
    assert f"--{option.lstrip('-')} {value}: out of range, give a whole number {valid}" in err
    assert not (tmp_path / "out").exists()
