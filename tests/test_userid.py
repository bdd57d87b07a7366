"""User ids are checked in one place: unsigned 64-bit ints, never bools or floats."""

from __future__ import annotations

import pytest

from pyserver.errors import BadRequest
from pyserver.userid import MAX_USER_ID, check_user_id, is_user_id


@pytest.mark.parametrize("value", [1, 42, MAX_USER_ID])
def test_user_ids_pass(value: int) -> None:
    assert is_user_id(value) and check_user_id(value) == value


@pytest.mark.parametrize("value", [0, -1, MAX_USER_ID + 1, True, 1.0, "1", None])
def test_what_is_not_a_user_id_is_refused_with_its_field_named(value: object) -> None:
    assert not is_user_id(value)
    with pytest.raises(BadRequest, match=r"^sender: must be a user id in 1\.\.2\*\*64-1"):
        check_user_id(value, "sender")


def test_zero_is_allowed_where_the_minimum_says_so() -> None:
    assert is_user_id(0, minimum=0) and check_user_id(0, "user", minimum=0) == 0
