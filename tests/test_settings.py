"""The configuration keys: each defined once, in settings.SETTINGS, with a default, a check and a meaning."""

from __future__ import annotations

import dataclasses

import pytest

from entitysync_sync import ConfigError
from entitysync_sync.settings import DEFAULTS, SETTINGS, Settings, load_settings


def test_every_setting_fills_one_field_of_settings() -> None:
    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(Settings)]
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)
    assert all(s.key.startswith("ENTITYSYNC_") for s in SETTINGS)


def test_every_default_passes_its_own_check_and_every_key_is_documented() -> None:
    for setting in SETTINGS:
        setting.check(setting.default, setting.key)
        assert setting.doc.strip(), setting.key
        assert setting.accepts, setting.key


def test_load_settings_fills_in_every_default() -> None:
    config: dict[str, object] = {"ENTITYSYNC_MAX_SUBSCRIPTIONS": 5}
    settings = load_settings(config)
    assert settings.max_subscriptions == 5
    assert settings.path == "/ws/entity-sync/"
    assert config == {**DEFAULTS, "ENTITYSYNC_MAX_SUBSCRIPTIONS": 5}


def test_a_bad_value_raises_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="ENTITYSYNC_RATE_BURST must be a positive integer"):
        load_settings({"ENTITYSYNC_RATE_BURST": -1})
