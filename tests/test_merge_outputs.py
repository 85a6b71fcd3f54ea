"""lrp merges are byte-reproducible and leave unrelated files in the output directory be."""

import torch
from helpers import lrp_config
from merge_runner import read_weights, run


def test_lrp_merges_are_byte_identical(family, tmp_path):
    first = run(lrp_config(family), tmp_path / "one")
    second = run(lrp_config(family), tmp_path / "two")
    assert all(torch.equal(first[n], second[n]) for n in first)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_existing_output_directory_keeps_unrelated_files(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    merged = run(lrp_config(family), out)
    assert (out / "notes.txt").read_text() == "mine" and merged
    assert read_weights(out).keys() == merged.keys()
