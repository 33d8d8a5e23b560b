"""The README's commands, read verbatim from its bash blocks, still parse against the code they name.

Every `main.py fit|validate|test|predict` line whose paths are real (no `<placeholder>`) is run through the CLI
with `--print_config` appended: the recipe files exist, every override names a real argument and the config
validates. Every `python -m emu_lightning.<module> <command>` line is checked against that command's `--help`:
the module and subcommand exist and each `--flag` the README passes is one the command takes. Training itself is
covered by the chain and fit tests; this keeps the user's guide from drifting away from the code.
"""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from emu_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _bash_lines() -> list[str]:
    """Commands of the README's ```bash blocks, continuation lines joined and comments dropped."""
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _argv_after(line: str, marker: str) -> list[str] | None:
    argv = shlex.split(line.replace("&&", " && "))
    if marker not in argv:
        return None
    rest = argv[argv.index(marker) + 1:]
    return rest[:rest.index("&&")] if "&&" in rest else rest


CLI_LINES = [line for line in _bash_lines() if "main.py" in line and "<" not in line and "…" not in line]
MODULE_LINES = [line for line in _bash_lines() if re.search(r"python -m emu_lightning\.", line)]


def test_the_readme_has_commands_to_check() -> None:
    assert len(CLI_LINES) >= 8 and len(MODULE_LINES) >= 10


@pytest.mark.parametrize("line", CLI_LINES, ids=lambda s: s[:80])
def test_main_py_lines_parse_as_written(line: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    argv = _argv_after(line, "main.py")
    assert argv and argv[0] in ("fit", "validate", "test", "predict"), line
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    assert all((ROOT / c).is_file() for c in configs if c.startswith("recipes/")), line
    if not all((ROOT / c).is_file() for c in configs):
        pytest.skip("reads a file an earlier README command writes (e.g. the converter's model.yaml)")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--print_config"])
    assert exit_.value.code in (0, None), line
    assert "class_path" in out.getvalue()  # the whole resolved config was printed


def _help(module: str, command: str | None) -> str:
    argv = [module] + ([command] if command else []) + ["--help"]
    out = io.StringIO()
    old = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit), warnings.catch_warnings():
            # runpy's note that the package already imported the module: true in a test process, not in `python -m`
            warnings.filterwarnings("ignore", message=r".* found in sys.modules after import of package",
                                    category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = old
    return out.getvalue()


@pytest.mark.parametrize("line", MODULE_LINES, ids=lambda s: s[:80])
def test_module_lines_name_real_commands_and_flags(line: str) -> None:
    module = re.search(r"python -m (emu_lightning[\w.]*)", line).group(1)
    argv = _argv_after(line, module) or []
    commands = argv[0].split("|") if argv and not argv[0].startswith(("-", "<")) and "/" not in argv[0] \
        and not argv[0].endswith((".yaml", ".json")) else [None]
    flags = {a.split("=")[0] for a in argv if a.startswith("--") and a != "--"}
    if "--" in argv:  # what follows `--` is passed through to main.py, checked by the fit tests
        flags = {a.split("=")[0] for a in argv[:argv.index("--")] if a.startswith("--")}
    for command in commands:
        text = _help(module, command)
        assert "usage" in text.lower(), (line, command)
        missing = sorted(f for f in flags if f not in text)
        assert not missing, f"{line}: {module} {command or ''} takes no {missing}"
