"""The run config: schema, composing, flat settings, content fingerprints, checks, resolvers."""

from fedad.config.compose import (
    CONF_DIR,
    CONFIG_NAME,
    available_options,
    compose,
    composition_error,
    load_option,
)
from fedad.config.content import (
    NONE_GROUPS,
    ROUNDS_KEY,
    RUNTIME_KEYS,
    content,
    differences,
    fingerprint,
)
from fedad.config.schema import SCHEMA_NAME
from fedad.config.settings import (
    FLOWER_KEYS,
    SETTINGS_GROUPS,
    Scalar,
    Settings,
    flatten,
    group_settings,
    make_settings,
    section,
    to_dict,
    unflatten,
)

__all__ = [
    "CONFIG_NAME",
    "CONF_DIR",
    "FLOWER_KEYS",
    "NONE_GROUPS",
    "ROUNDS_KEY",
    "RUNTIME_KEYS",
    "SCHEMA_NAME",
    "SETTINGS_GROUPS",
    "Scalar",
    "Settings",
    "available_options",
    "compose",
    "composition_error",
    "content",
    "differences",
    "fingerprint",
    "flatten",
    "group_settings",
    "load_option",
    "make_settings",
    "section",
    "to_dict",
    "unflatten",
]
