"""Build hook: generate the gRPC stubs from proto/ before packaging."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).parent / "tools"))


class BuildWithProto(build_py):
    def run(self) -> None:
        from gen_proto import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
