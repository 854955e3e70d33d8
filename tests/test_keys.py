from __future__ import annotations

import pickle

import pytest

from entitysync_sync import MAX_ID_LENGTH, EntityKey, InvalidKeyError
from entitysync_sync.keys import as_key


def test_int_id_is_normalised_to_str_and_keys_compare_equal() -> None:
    assert EntityKey("items", 100) == EntityKey("items", "100")
    assert EntityKey("items", 100).id == "100"
    assert hash(EntityKey("items", 100)) == hash(EntityKey("items", "100"))
    assert len({EntityKey("items", 1), EntityKey("items", "1"), EntityKey("other", 1)}) == 2


def test_key_is_immutable() -> None:
    key = EntityKey("items", "1")
    with pytest.raises(AttributeError):
        key.id = "2"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del key.entity


def test_key_round_trips_through_pickle_and_prints_readably() -> None:
    key = EntityKey("a.b-c_D9", "x y")
    assert pickle.loads(pickle.dumps(key)) == key
    assert repr(key) == "EntityKey('a.b-c_D9', 'x y')"
    assert str(key) == "a.b-c_D9/x y"


@pytest.mark.parametrize("entity", ["", "a" * 65, "items!", "it ems", "ité", "a#ephemeral", None, 5])
def test_invalid_entity_names_say_what_is_allowed(entity: object) -> None:
    with pytest.raises(InvalidKeyError, match="1 to 64 characters"):
        EntityKey(entity, "1")  # type: ignore[arg-type]


def test_entity_name_of_64_characters_is_accepted() -> None:
    assert EntityKey("a" * 64, "1").entity == "a" * 64


@pytest.mark.parametrize("id", ["", "x" * (MAX_ID_LENGTH + 1), "a\nb", "a\x00", True, 1.5, None, ["1"]])
def test_invalid_ids_raise_value_error(id: object) -> None:
    with pytest.raises(ValueError, match="id"):
        EntityKey("items", id)  # type: ignore[arg-type]


def test_longest_id_is_accepted() -> None:
    assert len(EntityKey("items", "x" * MAX_ID_LENGTH).id) == MAX_ID_LENGTH


def test_as_key_accepts_a_key_or_a_pair_but_not_both() -> None:
    key = EntityKey("items", 1)
    assert as_key(key) is key
    assert as_key("items", 1) == key
    with pytest.raises(TypeError):
        as_key(key, 1)
    with pytest.raises(TypeError):
        as_key("items")
