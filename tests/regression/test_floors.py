"""The lower bounds in pyproject.toml are the versions .ci/floors.txt pins (and .ci/floor_smoke.sh runs on)."""

from __future__ import annotations

import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

# The core dependencies whose floors CI installs and runs. torch is among them in pyproject, but its floor
# (the GPU machine's build) is checked by the GPU tier there; the floor env takes the CPU wheel 2.13.0.
CORE = [
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "mlflow",
    "optuna",
    "hydra-core",
    "omegaconf",
]
FLOOR_ENV_TORCH = "2.13.0"  # what .ci/floor_smoke.sh installs


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(line) for line in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def floor_pins() -> dict[str, Version]:
    pins = {}
    for raw in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*([0-9][0-9A-Za-z.+-]*)", line)
        assert match, f".ci/floors.txt: not a `name==version` pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f".ci/floors.txt pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return bounds[0] if len(bounds) == 1 else None


def test_every_core_floor_in_pyproject_is_the_pinned_floor():
    reqs, pins = pyproject_requirements(), floor_pins()
    problems = []
    for name in map(canonicalize_name, CORE):
        if name not in reqs:
            problems.append(f"{name}: not a dependency in pyproject.toml")
            continue
        bound = lower_bound(reqs[name])
        if bound is None:
            problems.append(f"{name}: pyproject's {reqs[name]} has no single `>=` lower bound")
        elif name not in pins:
            problems.append(f"{name}: pyproject says >={bound} but .ci/floors.txt has no pin")
        elif bound != pins[name]:
            problems.append(f"{name}: pyproject says >={bound} but .ci/floors.txt pins =={pins[name]}")
        elif not reqs[name].specifier.contains(pins[name]):
            problems.append(f"{name}: the pin {pins[name]} is outside pyproject's {reqs[name].specifier}")
    extra = sorted(set(pins) - set(map(canonicalize_name, CORE)))
    if extra:
        problems.append(f".ci/floors.txt pins non-core packages {extra}: add them to CORE here or drop the pins")
    assert not problems, "\n".join(problems)


def test_the_floor_env_torch_is_inside_pyprojects_range():
    torch = pyproject_requirements()["torch"]
    assert lower_bound(torch) is not None
    assert torch.specifier.contains(FLOOR_ENV_TORCH)
    smoke = (ROOT / ".ci" / "floor_smoke.sh").read_text()
    assert f'"torch=={FLOOR_ENV_TORCH}" -c .ci/floors.txt' in smoke
