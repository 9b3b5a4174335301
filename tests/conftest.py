"""Shared pytest set-up: device parametrisation and the ``cuda`` marker.

* ``device`` fixture: a ``torch.device``, the test runs once per available device (``cpu`` always, ``cuda`` when
  ``torch.cuda.is_available()``). ``pytest --devices cuda`` (or ``cpu``, or ``cpu,cuda``) restricts the list; a
  requested device that is not available gives skipped tests saying so, never silently a CPU run.
* ``@pytest.mark.cuda``: a test of the GPU check's subset (``pytest -m cuda``, what ``benchmarks/gpu_check.sh``
  runs). Such tests are device-parametrised and run on the CPU as well wherever that is meaningful.
* ``@pytest.mark.cuda_only``: a device-parametrised test whose CPU variant is skipped (something CUDA-specific).
"""

from __future__ import annotations

import pytest
import torch

KNOWN_DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption(
        "--devices",
        default=None,
        help="comma-separated devices for the `device` fixture (cpu, cuda); default: every available one",
    )


def pytest_configure(config):
    # `make test` runs the suite in 2 pytest-xdist workers (one per core of the CI machine): one thread each, for
    # torch in the worker and for the scripts its tests start (they inherit OMP_NUM_THREADS), so that the two workers
    # do not fight over the cores (two threads each on 2 cores doubled the time of the subprocess-heavy tests).
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.addinivalue_line("markers", "cuda: the GPU check's subset (device-parametrised; runs on the CPU too)")
    config.addinivalue_line("markers", "cuda_only: device-parametrised test whose CPU variant is skipped")


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def requested_devices(config) -> list[str]:
    option = config.getoption("--devices")
    if not option:
        return available_devices()
    names = [name.strip() for name in option.split(",") if name.strip()]
    unknown = sorted(set(names) - set(KNOWN_DEVICES))
    if unknown:
        raise pytest.UsageError(f"--devices: unknown device(s) {unknown}; choose from {list(KNOWN_DEVICES)}")
    return names


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):  # a test that parametrises `device` itself wins
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if "device" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return
    # through the fixture below (indirect): one test item per device, ids `cpu` / `cuda`
    metafunc.parametrize("device", requested_devices(metafunc.config), indirect=True)


@pytest.fixture
def device(request) -> torch.device:
    name = getattr(request, "param", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA requested (--devices) but torch.cuda.is_available() is False")
    if name == "cpu" and request.node.get_closest_marker("cuda_only") is not None:
        pytest.skip("CUDA-only test")
    return torch.device(name)
