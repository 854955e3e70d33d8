"""Check that the wheel and the sdist in the given folder hold what a release must."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = ("entitysync_sync/py.typed", "entitysync_sync/static/entitysync.js", "entitysync_sync/static/entitysync.d.ts")
SDIST = (*WHEEL, "tests/conftest.py", "tests/typescript/package-lock.json", "tests/typescript/module_example.ts",
         "docs/conf.py", "docs/index.md", "docs/demo.png", "example_flask/templates/index.html", "CHANGES.md",
         "README.md")

dist = Path(sys.argv[1])
wheel = set(zipfile.ZipFile(next(dist.glob("*.whl"))).namelist())
with tarfile.open(next(dist.glob("*.tar.gz"))) as sdist:
    names = sdist.getnames()
root = names[0].split("/")[0]
missing = [f"wheel: {f}" for f in WHEEL if f not in wheel]
missing += [f"sdist: {f}" for f in SDIST if f"{root}/{f}" not in names]
if missing:
    sys.exit("the distributions lack " + ", ".join(missing))
print(f"{len(wheel)} files in the wheel, {len(names)} in the sdist: the client files, py.typed, tests, docs and demo")
