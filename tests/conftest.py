import pytest

from tests.helpers import running_server


@pytest.fixture
def server(tmp_path):
    """A real server with the filter processor."""
    with running_server(tmp_path) as srv:
        yield srv
