"""The tested dependency ranges come from the package's own metadata, and a version
outside them is one warning line, not an error."""

from importlib import metadata

import pytest

from mergekit_lrp import versions


def test_the_tested_ranges_are_the_declared_ones():
    ranges = versions.tested_ranges()
    assert set(ranges) == set(versions.WATCHED)
    assert all("<" in spec for spec in ranges.values())  # every watched range has an upper bound
    assert versions.untested_versions() == []  # the pinned environment is inside them


def test_an_untested_version_is_one_warning_line(monkeypatch, capsys):
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "99.0.0" if name == "transformers" else real(name)
    )
    versions.warn_if_untested.cache_clear()
    try:
        versions.warn_if_untested()
    finally:
        versions.warn_if_untested.cache_clear()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("warning: transformers 99.0.0 is outside the range")
    assert versions.tested_ranges()["transformers"] in lines[0]


@pytest.mark.parametrize("command", ["lrp-compute", "mergekit-yaml"])
def test_the_commands_warn_and_go_on(command, monkeypatch):
    """Both entry points call the check before their work (the guard only for our methods)."""
    calls = []
    monkeypatch.setattr(versions, "warn_if_untested", lambda: calls.append(command))
    if command == "lrp-compute":
        from helpers import invoke

        invoke("no-such-model", "--prompts", "nope.txt", "-o", "x.safetensors")
    else:
        from mergekit_lrp.plugin.run_guard import guarded_merge

        class Stop(Exception):
            pass

        def check_merge(*_):
            raise Stop

        monkeypatch.setattr("mergekit_lrp.merging.preflight.check_merge", check_merge)
        with pytest.raises(Stop):
            guarded_merge(None, None, None, None)
    assert calls == [command]
