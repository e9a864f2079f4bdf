"""Training methods behind one interface (`base.Method`); METHODS is the registry params.yaml chooses from."""

from .base import LossOutput, Method, Progress
from .ect import ECT
from .edm import EDM
from .ict import ICT
from .udddm import UDDDM

METHODS: dict[str, type[Method]] = {m.name: m for m in (UDDDM, ICT, EDM, ECT)}

__all__ = ["METHODS", "ECT", "EDM", "ICT", "UDDDM", "LossOutput", "Method", "Progress"]
