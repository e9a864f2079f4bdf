"""Training methods behind one interface (`base.Method`); METHODS is the registry params.yaml chooses from.

Each method is the class CLASSES names in dddm/methods/<name>.py. NAMES lists them without importing torch
(a stage's --help answers at once); the classes are imported when METHODS or one of them is first asked for.
"""

import sys

CLASSES = {"udddm": "UDDDM", "ict": "ICT", "edm": "EDM", "ect": "ECT", "cd": "CD"}  # params.yaml's name -> its class
NAMES = tuple(CLASSES)
BASE = ("LossOutput", "Method", "Progress")

__all__ = ["METHODS", "NAMES", *CLASSES.values(), *BASE]


def __getattr__(attribute: str):
    if attribute not in __all__ or attribute == "NAMES":  # (a submodule being imported, among others)
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    from . import base, cd, ect, edm, ict, udddm  # noqa: F401 - each sets its attribute of this package

    package = sys.modules[__name__]
    found = {cls: getattr(getattr(package, name), cls) for name, cls in CLASSES.items()}
    found |= {"METHODS": {name: found[cls] for name, cls in CLASSES.items()}} | {name: getattr(base, name) for name in BASE}
    globals().update(found)
    return found[attribute]
