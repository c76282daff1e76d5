"""The README's commands are the ones CI runs, and the README's example runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install .*)$", readme, flags=re.MULTILINE)
    assert 'pip install -e ".[dev]" && pytest -q' in commands
    assert 'pip install -e ".[dev]" || exit 1\npytest -q' in ci


def test_readme_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "inspect_selection.py"), "--budget", "0.25"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) >= {"full", "csp", "snapkv", "h2o", "streaming", "lookm_text_prior", "random"}
    assert rows["full"][0] == "1.00"
    assert all(0.2 <= float(values[0]) <= 0.3 for name, values in rows.items() if name != "full")
