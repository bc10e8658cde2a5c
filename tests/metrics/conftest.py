import shutil

import pytest

# The official jars (meteor-1.5, Stanford PTB) need Java: CI installs Debian's JRE (.ci/run). A machine without it
# skips only the tests that compare with the jars.
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="needs java (apt-get install default-jre-headless)")
