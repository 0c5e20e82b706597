import os
import shutil
import tempfile

import pytest

# The container runtimes, session-wide: defined here once. A fixture imported into
# several test modules is a fixture of each, so each would start its own dockerd
# and keep it to the end of the session.
from tests.integration.runtimes import busybox_rootfs, crun, docker, podman, runc  # noqa: F401
from tests.integration.sensor import Sensor


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        # Integration tests need root and the real kernel: fail loudly, never skip silently.
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(pytest.mark.root)


@pytest.fixture
def sensor(tmp_path):
    """A running private sensor; stopped (and checked to stop cleanly) afterwards."""
    s = Sensor(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shared_sensor(tmp_path_factory):
    """One sensor for a module's tests that only subscribe and watch."""
    s = Sensor(tmp_path_factory.mktemp("sensor")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rx():
    """The detection tests' alert receivers (webhook, syslog; test_detections_e2e.Receivers)."""
    from tests.integration.test_detections_e2e import Receivers

    r = Receivers()
    yield r
    r.close()


@pytest.fixture(scope="module")
def workdir():
    """A scratch dir under /tmp, readable by all (exec from it is the canary's trigger)."""
    d = tempfile.mkdtemp(prefix="c8-det-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
