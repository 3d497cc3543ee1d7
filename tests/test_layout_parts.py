"""The command line, the settings and the mock upstream as parts (issue 16): the CLI declared as a table that the
parser is built from, no import cycle between the serving pieces and the command line, small modules, and the
public names other code imports still importable from each part's face.

Read from the source and from the objects themselves; the rules are tests/test_layout.py's, narrowed to these
three parts.
"""

from __future__ import annotations

import argparse
import ast
import importlib

import pytest

from tests.test_layout import _cycles, _graph, _modules, _package_parents

PARTS = ("proxy.cli", "proxy.config", "proxy.mock")
NEW_MODULE_MAX_LINES = 300  # the house rule for a module (tests/test_layout.py allows 400 for any module)


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PARTS)


def _subparsers(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str | None]]:
    """The parser's commands, and the help each has in the parent's list of commands."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not found:
        return {}, {}
    return dict(found[0].choices), {a.dest: a.help for a in found[0]._choices_actions}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {(a.option_strings or [a.dest])[0]: a for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)}


def test_the_command_line_is_the_table_it_is_built_from() -> None:
    """Every command, subcommand and argument the parser has is a row of main.COMMANDS (and main.OPTIONS) with
    the same help, default, type, choices and requiredness, and nothing else is added by hand."""
    from proxy.cli.argtable import Arg, Command
    from proxy.cli.main import COMMANDS, OPTIONS, build_parser

    def same(arg: Arg, action: argparse.Action) -> None:
        if arg.action != "version":  # argparse's own help for --version
            assert action.help == arg.help, arg.name
        assert action.type == arg.type, arg.name
        assert action.required == (arg.required or not arg.name.startswith("-")), arg.name  # positionals always are
        assert list(action.choices or []) == list(arg.choices or []), arg.name
        if arg.action == "store_true":
            assert isinstance(action, argparse._StoreTrueAction) and action.default is False, arg.name
        elif arg.action is None:
            assert action.default == arg.default, arg.name

    def check(parser: argparse.ArgumentParser, args: tuple[Arg, ...], commands: tuple[Command, ...]) -> int:
        options = _options(parser)
        assert sorted(options) == sorted(a.name for a in args)
        for arg in args:
            same(arg, options[arg.name])
        subs, helps = _subparsers(parser)
        assert list(subs) == [c.name for c in commands]
        assert helps == {c.name: c.help for c in commands}
        checked = 1
        for command in commands:
            sub = subs[command.name]
            assert sub.get_default("func") is command.run
            checked += check(sub, command.args, command.subcommands)
        return checked

    parser = build_parser()
    assert check(parser, OPTIONS, COMMANDS) == 1 + len(COMMANDS) + sum(len(c.subcommands) for c in COMMANDS)
    # every command can be run: a leaf or a group has a handler
    assert all(c.run is not None for c in COMMANDS)


def test_no_import_cycle_in_the_command_line_the_settings_or_the_mock() -> None:
    graph = _graph()
    # as in test_layout: a package's __init__ naming its own public surface is not a cycle with its modules
    ours = {n: {t for t in ts if _ours(t) and t not in _package_parents(n)} for n, ts in graph.items() if _ours(n)}
    assert _cycles(ours) == []
    # the serving pieces a worker needs do not bring the command line with them
    seen, todo = set(), ["proxy.cli.workers"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert "proxy.cli.main" not in seen and "proxy.cli.commands" not in seen
    assert "proxy.cli.serve" in seen


def test_the_modules_of_these_parts_stay_small() -> None:
    big_modules, big_functions = [], []
    for name, path in _modules().items():
        if not _ours(name):
            continue
        text = path.read_text()
        if text.count("\n") > NEW_MODULE_MAX_LINES:
            big_modules.append(f"{name} ({text.count(chr(10))})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    big_functions.append(f"{name}.{node.name} ({length})")
        assert ast.get_docstring(ast.parse(text)), f"{name} says why it exists"
    assert big_modules == [] and big_functions == []


# What the rest of the product, the tests and bench/ import from these parts' faces.
SURFACES = {
    "proxy.config": ["CacheSettings", "ConfigError", "DeploymentSettings", "KeySettings", "ModelSettings",
                     "QuotaSettings", "RedisSettings", "RedisType", "ServerSettings", "Settings", "UpstreamSettings",
                     "UsageSettings", "deployments_of", "load", "parse", "public_url", "DEFAULT_MODELS_TOML",
                     "ENV_NAME_RE", "MODEL_NAME_RE", "AZURE_DEPLOYMENT_RE"],
    "proxy.mock.upstream": ["HUGE_BODY_BYTES", "MOCK_SETTINGS", "MOCK_STATE", "MockModel", "MockSettings",
                            "MockState", "create_mock_app", "run", "serve_mock", "vector_for"],
    "proxy.cli.main": ["main", "build_parser"],
}


@pytest.mark.parametrize("module", sorted(SURFACES))
def test_each_part_names_its_public_surface(module: str) -> None:
    """Importable from the face, and named in its __all__ where the face only re-exports (strict mypy reads
    `__all__`, not the imports, as what a module offers)."""
    face = importlib.import_module(module)
    for name in SURFACES[module]:
        assert hasattr(face, name), f"{module}.{name}"
    if module != "proxy.cli.main":
        exported = set(face.__all__)
        assert [n for n in SURFACES[module] if n not in exported] == []
        assert all(hasattr(face, n) for n in exported)


def test_the_settings_dataclasses_live_in_the_part_for_their_concern() -> None:
    """`proxy.config` re-exports: each class is defined once, in a module of its own concern, so a newcomer
    finds `[redis]` in stores.py and `[models.NAME]` in fleet.py, not in one 500-line file."""
    config = importlib.import_module("proxy.config")
    homes = {name: getattr(config, name).__module__ for name in config.__all__
             if isinstance(getattr(config, name), type)}
    assert homes["RedisSettings"] == homes["CacheSettings"] == "proxy.config.stores"
    assert homes["ModelSettings"] == homes["UpstreamSettings"] == homes["DeploymentSettings"] == "proxy.config.fleet"
    assert homes["Settings"] == "proxy.config.settings"
    assert "proxy.config" not in homes.values()
