"""How a dependencies image's venv gets made: on the host only with an interpreter of the
image's Python (same major.minor and machine, an image with glibc), else inside the engine."""

from __future__ import annotations

import platform
import sys

import pytest

from modelcd.builders.image_deps import host_interpreter, plan
from modelcd.builders.wheelhouse import ImagePython
from modelcd.errors import BuildError

HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"


def image(version: str = HERE, libc: str = "2.36", machine: str = platform.machine()) -> ImagePython:
    return ImagePython(command="python3", version=version, implementation="cp", machine=machine, libc=libc)


def test_the_host_builds_the_venv_when_it_has_the_images_python() -> None:
    assert host_interpreter(image()) is not None
    how, interpreter, why = plan("auto", image())
    assert how == "host" and interpreter is not None and str(interpreter) in why


@pytest.mark.parametrize("other", [image(version="3.99"), image(libc=""), image(machine="riscv128")])
def test_otherwise_the_engine_installs_it(other: ImagePython) -> None:
    assert host_interpreter(other) is None
    how, interpreter, why = plan("auto", other)
    assert how in ("uv", "pip") and interpreter is None and "inside the engine" in why
    with pytest.raises(BuildError) as e:
        plan("host", other)
    assert e.value.field == "dependencies" and "dependencies 'auto'" in e.value.message


def test_modes_are_checked() -> None:
    assert plan("engine", image())[0] == "uv"
    assert plan("pip", image())[0] == "pip"
    with pytest.raises(BuildError) as e:
        plan("docker", image())
    assert e.value.field == "dependencies" and "auto, host, engine, pip" in e.value.message
