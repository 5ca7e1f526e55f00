"""One version string: the package attribute, the report's versions and the project metadata agree."""

import re

import llmprune
from llmprune import _version, report

from .conftest import REPO


def test_version_has_one_source():
    assert llmprune.__version__ == _version.__version__
    assert report.versions()["llmprune"] == _version.__version__
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert declared == _version.__version__
