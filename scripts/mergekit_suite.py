"""Run mergekit's own test suite with the mergekit-lrp plugin active, and again without it.

    python scripts/mergekit_suite.py [--cache-dir DIR]

Downloads the sdist of the installed mergekit version with pip and unpacks only its
``tests/`` and ``pyproject.toml`` (not its package, so the tests import the installed
mergekit), adds the ``tests/common.py`` the sdist lacks (scripts/mergekit_tests_common.py),
then runs pytest twice: plainly and with ``MERGEKIT_LRP_DISABLE=1``. A pytest plugin
added to both runs checks that ``lrp`` is registered exactly when the plugin is active.
Exits 1 if the plugin run fails or errors on a test that the run without it does not.
Two parametrisations that only exist with the plugin are deselected (see DESELECTED).
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = Path(__file__).with_name("mergekit_tests_common.py")
CHECK_PLUGIN = "mergekit_lrp_suite_check"
REPORT_ENV = "MERGEKIT_LRP_SUITE_REPORT"
# mergekit's conformance test runs every registered method with only generic parameters
# (weight, t, density). For lrp that means no score file, which lrp refuses by design (no
# silent magnitude fallback). tests/test_method.py runs the same strided-input check on
# lrp with score files; the same holds for regmean and its Gram files
# (tests/test_regmean.py).
DESELECTED = {
    "tests/test_merge_method_regressions.py::"
    "test_state_dict_methods_accept_strided_weights_without_mutation[lrp]": (
        "runs lrp without lrp_scores, which lrp refuses by design; the same check with "
        "score files is tests/test_method.py::test_strided_inputs_are_not_mutated"
    ),
    "tests/test_merge_method_regressions.py::"
    "test_state_dict_methods_accept_strided_weights_without_mutation[regmean]": (
        "runs regmean without Gram files, which regmean refuses by design; the same check "
        "with Gram files is tests/test_regmean.py::test_strided_inputs_are_not_mutated"
    ),
}
PLUGIN_SOURCE = f'''\
"""Loaded with -p: checks which mergekit the tests import and whether lrp is
registered (exactly when MERGEKIT_LRP_DISABLE is unset), and writes every test's
outcome, as pytest's terminal summary counts it, to the JSON file ${REPORT_ENV}."""

import json
import os
from pathlib import Path

import pytest

STATE = {{"outcomes": {{}}, "why": {{}}}}


def pytest_configure(config):
    import mergekit
    from mergekit import merge_methods

    source = Path(mergekit.__file__).resolve()
    if Path(config.rootpath).resolve() in source.parents:
        raise pytest.UsageError(f"mergekit was imported from the sdist: {{source}}")
    try:
        merge_methods.get("lrp")
    except RuntimeError:
        registered = False
    else:
        registered = True
    expected = os.environ.get("MERGEKIT_LRP_DISABLE", "") in ("", "0")
    if registered != expected:
        raise pytest.UsageError(f"lrp registered: {{registered}}, expected {{expected}}")
    STATE.update(config=config, mergekit=str(source), lrp_registered=registered)


def _record(report, category):
    STATE["outcomes"].setdefault(category, []).append(report.nodeid)
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        STATE["why"][report.nodeid] = crash.message.splitlines()[0]
    elif isinstance(report.longrepr, tuple):
        STATE["why"][report.nodeid] = report.longrepr[2]


def pytest_collectreport(report):
    if report.failed:
        _record(report, "error")


def pytest_runtest_logreport(report):
    hook = STATE["config"].hook
    category = hook.pytest_report_teststatus(report=report, config=STATE["config"])[0]
    if category:
        _record(report, category)


def pytest_sessionfinish(session, exitstatus):
    record = {{key: value for key, value in STATE.items() if key != "config"}}
    Path(os.environ["{REPORT_ENV}"]).write_text(json.dumps(record, indent=1))
'''


def unpack_tests(cache: Path, version: str) -> None:
    """Fill ``cache`` with the sdist's tests/ and pyproject.toml, unless already there."""
    stamp = cache / "SDIST"
    wanted = f"mergekit=={version}"
    if stamp.is_file() and stamp.read_text() == wanted and (cache / "tests").is_dir():
        return
    with tempfile.TemporaryDirectory() as tmp:
        download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:"]
        subprocess.run([*download, "--no-deps", "-q", wanted, "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("mergekit-*.tar.gz")
        top = f"mergekit-{version}"
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name == f"{top}/pyproject.toml" or m.name.startswith(f"{top}/tests/")
            ]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        shutil.move(Path(tmp, top, "tests"), cache / "tests")
        shutil.move(Path(tmp, top, "pyproject.toml"), cache / "pyproject.toml")
    stamp.write_text(wanted)


def run_suite(cache: Path, plugin_active: bool) -> dict:
    """Run pytest on the unpacked tests; return the check plugin's record plus timing."""
    label = "with plugin" if plugin_active else "without plugin (MERGEKIT_LRP_DISABLE=1)"
    print(f"\n=== mergekit suite {label} ===", flush=True)
    report = cache / f"report-{'active' if plugin_active else 'disabled'}.json"
    report.unlink(missing_ok=True)
    env = dict(os.environ, **{REPORT_ENV: str(report)})
    env.pop("MERGEKIT_LRP_DISABLE", None)
    if not plugin_active:
        env["MERGEKIT_LRP_DISABLE"] = "1"
    command = [sys.executable, "-m", "pytest", "tests", "-c", "pyproject.toml"]
    command += ["--rootdir", ".", "-p", CHECK_PLUGIN, "-p", "no:cacheprovider", "-q", "-rfE"]
    for nodeid in DESELECTED:
        command += ["--deselect", nodeid]
    start = time.monotonic()
    returncode = subprocess.run(command, cwd=cache, env=env).returncode
    seconds = time.monotonic() - start
    if returncode not in (0, 1) or not report.is_file():
        sys.exit(f"pytest {label} did not complete (exit code {returncode})")
    return dict(json.loads(report.read_text()), seconds=seconds)


def counts(record: dict) -> str:
    """``N passed, N failed, N skipped, N errors``, plus any other outcome that occurred."""
    outcomes = record["outcomes"]
    names = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "errors"}
    parts = [f"{len(outcomes.get(key, []))} {name}" for key, name in names.items()]
    parts += [f"{len(ids)} {key}" for key, ids in sorted(outcomes.items()) if key not in names]
    return ", ".join(parts)


def problems(record: dict) -> set[str]:
    """Node ids of the tests that failed or errored."""
    return {*record["outcomes"].get("failed", []), *record["outcomes"].get("error", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / ".cache" / "mergekit-lrp" / "mergekit-sdist",
        help="where the sdist's tests are unpacked and kept (default: %(default)s)",
    )
    cache = parser.parse_args().cache_dir.resolve()

    unpack_tests(cache, importlib.metadata.version("mergekit"))
    shutil.copyfile(COMMON, cache / "tests" / "common.py")
    (cache / f"{CHECK_PLUGIN}.py").write_text(PLUGIN_SOURCE)

    active = run_suite(cache, plugin_active=True)
    disabled = run_suite(cache, plugin_active=False)

    print()
    for label, record in (("with plugin:   ", active), ("without plugin:", disabled)):
        print(f"{label} {counts(record)} ({record['seconds']:.0f} s)")
        print(f"  mergekit {record['mergekit']}, lrp registered: {record['lrp_registered']}")
        reasons = Counter(record["why"][i] for i in record["outcomes"].get("skipped", []))
        for reason, number in reasons.most_common():
            print(f"  skipped {number}: {reason}")
    for title, ids in (
        ("failed or errored in both runs", problems(active) & problems(disabled)),
        ("failed or errored only without the plugin", problems(disabled) - problems(active)),
        ("FAILED OR ERRORED ONLY WITH THE PLUGIN", problems(active) - problems(disabled)),
    ):
        for nodeid in sorted(ids):
            print(f"{title}: {nodeid}: {active['why'].get(nodeid, disabled['why'].get(nodeid))}")
    for nodeid, reason in DESELECTED.items():
        print(f"deselected with the plugin: {nodeid}: {reason}")
    outcomes = active["outcomes"]
    print(
        f"mergekit suite with plugin: {len(outcomes.get('passed', []))} passed, "
        f"{len(problems(active))} failed, {len(outcomes.get('skipped', []))} skipped"
    )
    return 1 if problems(active) - problems(disabled) else 0


if __name__ == "__main__":
    sys.exit(main())
