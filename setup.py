"""Build hook: ship the config tree ``conf/`` inside the package, as ``fedad/conf``.

``conf/`` stays at the top of the checkout, where users look for it; a wheel gets a copy
inside the package, so an installed fedad finds its configs without the checkout
(``fedad.config.CONF_DIR``). An editable install reads the checkout's ``conf/`` itself.
Everything else about the package is declared in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    """``build_py`` that also copies ``conf/`` into the built package."""

    def run(self) -> None:
        """Build the package, then copy ``conf/`` into it (not for an editable install)."""
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = Path(__file__).resolve().parent / "conf"
        shutil.copytree(source, Path(self.build_lib) / "fedad" / "conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
