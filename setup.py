"""Build hook: generate the gRPC stubs from proto/ before the packages are collected.

The stubs (evalstream/v1/) are build outputs, never committed, so they must
exist before setuptools looks for packages; generating them here covers wheels,
sdists and editable installs alike.
"""

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
if (ROOT / "proto").is_dir():
    sys.path.insert(0, str(ROOT / "tools"))
    from gen_proto import generate

    generate(ROOT)

setup()
