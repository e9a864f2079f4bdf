"""Training methods behind one interface (`base.Method`); METHODS is the registry params.yaml chooses from."""

from .base import LossOutput, Method, Progress
from .edm import EDM
from .ict import ICT
from .udddm import UDDDM

METHODS: dict[str, type[Method]] = {m.name: m for m in (UDDDM, ICT, EDM)}

__all__ = ["METHODS", "EDM", "ICT", "UDDDM", "LossOutput", "Method", "Progress"]
