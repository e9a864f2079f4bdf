"""Building blocks of the params.yaml schema, shared by the modules that own a section.

Each concept that has variants (noise processes, methods) keeps its choices in one registry
(a dict name -> class, each class carrying its own `Config` section); the schema is built from
those registries, so adding a variant touches its module and params.yaml only.
"""

from __future__ import annotations

from pydantic import AfterValidator, BaseModel, ConfigDict, create_model

# The longest string any key takes: Linux's PATH_MAX, for the paths; a longer value is a mistake that would
# otherwise reach MLflow (which refuses params above 6000 characters) and every log line that shows it.
MAX_STRING = 4096


class Section(BaseModel):
    """A params.yaml section: unknown keys rejected, values immutable, types strict (params are validated from
    JSON, so `'3'` or `true` is not an int, but 1 is a float), floats finite (a NaN passes every comparison's
    negation and fails in training, after DVC has deleted the outputs; a key that means something by .inf
    says so), strings bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              str_max_length=MAX_STRING)


def at_most(limit: int, why: str) -> AfterValidator:
    """An upper bound whose error says why it exists (pydantic's `le` gives only the number)."""
    def check(value: int) -> int:
        if value > limit:
            raise ValueError(f"{value} is above {limit}, the most this project takes ({why})")
        return value
    return AfterValidator(check)


def registry_section(name: str, registry: dict[str, type], attribute: str = "Config") -> type[Section]:
    """A section with one required sub-section per registry entry, typed by the entry's `attribute`."""
    fields = {key: (getattr(cls, attribute), ...) for key, cls in registry.items()}
    return create_model(name, __base__=Section, **fields)


def check_choice(key: str, value: str, registry: dict) -> str:
    if value not in registry:
        raise ValueError(f"{value!r} is not one of {', '.join(registry)} ({key})")
    return value
