"""A work-pool flow run's pull step (prefect.yaml): the worker's environment against the clone's pins.

    python -m flows.envcheck constraints.txt

Exits 1 naming each installed package whose version is not the pinned one (the commit being run pins
other versions than the worker was set up with: run `make env` in the worker's checkout and restart the
worker), so a flow run never trains with other libraries than the commit's. Packages the worker does not
have are not named: the pins cover the test extras too.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def mismatches(constraints: Path) -> list[str]:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    out = []
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = Requirement(line)
        have = installed.get(canonicalize_name(pin.name))
        if have is not None and not pin.specifier.contains(have, prereleases=True):
            out.append(f"{pin.name}: {have} installed, {constraints} pins {pin.specifier}")
    return out


def main() -> None:
    constraints = Path(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
    wrong = mismatches(constraints)
    if wrong:
        sys.exit(f"envcheck: this worker's environment ({sys.prefix}) is not the one {constraints.resolve()} pins:\n"
                 + "\n".join(wrong) + "\nrun `make env` in the worker's checkout and restart the worker")
    print(f"envcheck: {sys.prefix} has the versions {constraints} pins")


if __name__ == "__main__":
    main()
