"""The README's commands run as written from a fresh clone (issue 18): every file a shell command names is in the
repository (or made by `make`, or by an earlier line of the same block), every `embedding-proxy` line is a valid
invocation, every `make` target exists. `--config config/proxy.toml` named a file that did not exist, and `keys list
[--team search] [--json]` was a synopsis, not a command."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from proxy.cli.main import build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMANDS = ("embedding-proxy", "make", ".venv/bin/", "python", "cp", ". ", "docker", "kubectl", "export", "KEY_ID=")
PATH = re.compile(r"^(?:\./)?(?:\.venv|\.ci|config|deploy|tests|bench|proxy|docs)/[^\s'\"]*$")


def _tracked() -> set[str]:
    """The repository's files (what a fresh clone has), and the folders holding them."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a source archive): what is on disk
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".venv" not in p.parts]
    return set(files) | {str(Path(f).parent) for f in files} | {str(p) for f in files for p in Path(f).parents}


def _made_by_make() -> set[str]:
    """What `make` (make install) creates: the venv with its python, activate script and the package's commands."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {".venv", ".venv/bin", ".venv/bin/python", ".venv/bin/activate", ".venv/bin/pip",
            *(f".venv/bin/{name}" for name in scripts)}


def shell_blocks() -> list[tuple[int, list[str]]]:
    """(line number, lines) of each fenced `sh` block."""
    return [(README[:m.start()].count("\n") + 1, [ln for ln in m.group(2).splitlines() if ln.strip()])
            for m in FENCE.finditer(README) if m.group(1) == "sh"]


def test_every_block_of_commands_is_marked_as_shell() -> None:
    """A block holding commands but no `sh` tag would escape the checks below (output is tagged `text`)."""
    untagged = [(README[:m.start()].count("\n") + 1, ln) for m in FENCE.finditer(README) if m.group(1) == ""
                for ln in m.group(2).splitlines() if ln.startswith(("embedding-proxy ", "make ", ".venv/bin/"))]
    assert untagged == []
    assert len(shell_blocks()) >= 3


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _code(line: str) -> str:
    """The line without its comment: from a `#` after a space, outside quotes."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _paths(words: list[str]) -> list[str]:
    after = {"--config", "-f", "-k"}  # options whose value is a file or folder
    return [w.rstrip("/") for i, w in enumerate(words)
            if PATH.match(w) or (i > 0 and words[i - 1] in after)]


def test_shell_commands_name_only_files_a_fresh_clone_has() -> None:
    tracked, made = _tracked(), _made_by_make()
    assert "config/proxy.example.toml" in tracked and "README.md" in tracked
    missing = []
    for start, lines in shell_blocks():
        created: set[str] = set()  # by an earlier line of the block (`cp SRC DEST`)
        for line in lines:
            words = _words(line)
            copied = words[:1] == ["cp"] and len(words) == 3
            for path in _paths(words[:2] if copied else words):  # a copy's destination is made here
                path = path.removeprefix("./")
                if path not in tracked | made | created:
                    missing.append(f"README.md:{start}: {path} ({line.strip()})")
            if copied:
                created.add(words[2].removeprefix("./"))
    assert missing == []


def test_inline_commands_name_only_files_a_fresh_clone_has() -> None:
    """The commands quoted in the text (`docker compose -f deploy/compose.yaml ...`, `kubectl apply -k ...`)."""
    tracked, made = _tracked(), _made_by_make()
    prose = FENCE.sub("", README)
    spans = [s for s in re.findall(r"`([^`\n]+)`", prose) if s.startswith(COMMANDS) and " " in s]
    assert any("deploy/compose.yaml" in s for s in spans)
    missing = []
    for span in spans:
        created = {w.removeprefix("./") for w in _words(span)[2:3]} if span.startswith("cp ") else set()
        missing += [f"{p} ({span})" for p in _paths(_words(span)) if p.removeprefix("./") not in
                    tracked | made | created | {"path"}]  # `--config path`: a placeholder in the text
    assert missing == []


def _invocations(line: str) -> list[list[str]]:
    """The `embedding-proxy ...` commands of a line, inside `$(...)` and pipes too, as argument lists."""
    out = []
    for m in re.finditer(r"\bembedding-proxy((?: [^|;&)]*)?)", _code(line)):
        out.append(shlex.split(m.group(1)))
    return out


@pytest.mark.parametrize("line", [ln for _, lines in shell_blocks() for ln in lines if "embedding-proxy" in _code(ln)],
                         ids=lambda ln: " ".join(ln.split("#")[0].split()[:4]))
def test_each_embedding_proxy_line_is_a_valid_invocation(line: str) -> None:
    parser = build_parser()
    assert _invocations(line)
    for args in _invocations(line):
        try:
            parsed = parser.parse_args(args)
        except SystemExit as exc:  # argparse refused it (exit 2, on stderr)
            raise AssertionError(f"not a valid command: embedding-proxy {' '.join(args)}") from exc
        assert callable(parsed.func)


def test_make_lines_name_targets_that_exist() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    wanted = {_words(ln)[1] for _, lines in shell_blocks() for ln in lines
              if ln.startswith("make ") and not _words(ln)[1].count("=")}
    assert wanted and wanted <= targets, wanted - targets


def test_the_readme_says_where_the_command_lives_after_make() -> None:
    assert "`.venv/bin/embedding-proxy`" in README and ". .venv/bin/activate" in README
