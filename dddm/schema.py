"""Building blocks of the params.yaml schema, shared by the modules that own a section.

Each concept that has variants (noise processes, methods) keeps its choices in one registry
(a dict name -> class, each class carrying its own `Config` section); the schema is built from
those registries, so adding a variant touches its module and params.yaml only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, create_model


class Section(BaseModel):
    """A params.yaml section: unknown keys rejected, values immutable, types strict
    (params are validated from JSON, so `'3'` or `true` is not an int, but 1 is a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def registry_section(name: str, registry: dict[str, type], attribute: str = "Config") -> type[Section]:
    """A section with one required sub-section per registry entry, typed by the entry's `attribute`."""
    fields = {key: (getattr(cls, attribute), ...) for key, cls in registry.items()}
    return create_model(name, __base__=Section, **fields)


def check_choice(key: str, value: str, registry: dict) -> str:
    if value not in registry:
        raise ValueError(f"{value!r} is not one of {', '.join(registry)} ({key})")
    return value
