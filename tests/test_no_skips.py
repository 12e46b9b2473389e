"""CI's guard against silent skips (tests/conftest.py): with NANOGPT_TEST_NO_SKIPS=1 (`.ci/run` sets it) a skip
of any kind fails, a module-level one included, unless its reason starts with conftest.ENV_SKIP."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ENV_SKIP, NO_SKIPS_ENV, ROOT

FILES = {
    "conftest.py": f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("project_conftest", {str(ROOT / "tests" / "conftest.py")!r})
        project = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(project)
        pytest_runtest_makereport = project.pytest_runtest_makereport
        pytest_make_collect_report = project.pytest_make_collect_report
        """,
    "test_module_skip.py": """
        import pytest
        pytest.skip("the module needs X", allow_module_level=True)
        def test_never(): pass
        """,
    "test_module_importorskip.py": """
        import pytest
        pytest.importorskip("no_such_module_anywhere")
        def test_never(): pass
        """,
    "test_each.py": f"""
        import pytest
        @pytest.mark.skipif(True, reason="a skipif marker")
        def test_skipif(): pass
        def test_inline(): pytest.skip("inline")
        def test_importorskip(): pytest.importorskip("no_such_module_anywhere")
        @pytest.fixture
        def needs_x(): pytest.skip("a fixture skips")
        def test_fixture(needs_x): pass
        @pytest.mark.skipif(True, reason="{ENV_SKIP}needs root")
        def test_allowed_marker(): pass
        def test_allowed_inline(): pytest.skip("{ENV_SKIP}cannot mount")
        @pytest.mark.xfail(reason="known", strict=True)
        def test_xfail(): assert False
        def test_passes(): pass
        """,
}


OUTCOMES = {"PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"}


@pytest.mark.parametrize("ci", ["", "true"])
def test_every_kind_of_skip_fails_under_no_skips_but_environment_ones(tmp_path, ci):
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    # With CI set, pytest prints each failure message whole, over several lines.
    env = {**os.environ, NO_SKIPS_ENV: "1", "CI": ci, "BUILD_NUMBER": ""}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = done.stdout[done.stdout.rindex("short test summary info"):].splitlines()
    outcomes = {}
    for line in summary[1:-1]:
        kind, _, rest = line.partition(" ")
        if kind not in OUTCOMES:
            continue  # a message's later lines: pytest prints whole messages when it sees CI set (running_on_ci)
        if kind == "SKIPPED":
            outcomes[rest.split(": ", 1)[1]] = kind  # SKIPPED [1] test_each.py:10: <reason>
        else:
            outcomes[rest.split(" - ")[0]] = kind
    assert outcomes == {
        "test_module_skip.py": "ERROR", "test_module_importorskip.py": "ERROR",  # collection errors
        "test_each.py::test_skipif": "ERROR", "test_each.py::test_fixture": "ERROR",  # at setup
        "test_each.py::test_inline": "FAILED", "test_each.py::test_importorskip": "FAILED",
        f"{ENV_SKIP}needs root": "SKIPPED", f"{ENV_SKIP}cannot mount": "SKIPPED",
        "test_each.py::test_xfail": "XFAIL", "test_each.py::test_passes": "PASSED"}, done.stdout
    assert done.returncode == 1
    assert f"skipped, which {NO_SKIPS_ENV}=1 forbids: the module needs X" in done.stdout
    assert f"skipped, which {NO_SKIPS_ENV}=1 forbids: a skipif marker" in done.stdout
