"""tasks/settings.py, the record the deploy's settings are declared with (tasks/config.py uses it)."""

from typing import Annotated

import pytest

from tasks.settings import Check, Problem, Settings, SettingsError, entry, items, written


def _number(value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("expected a number")
    return value


Number = Annotated[int, Check(_number)]


class Part(Settings):
    size: Number
    mode: Annotated[int, Check(lambda value: int(str(value), 8))] = written("0644")


class Kit(Settings):
    name: Annotated[str, Check(str)]
    parts: Annotated[list[Part], Check(items(entry(Part), "expected a list of parts"))] = []


def test_a_setting_without_its_check_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match="each setting needs one Check: size"):
        class Unchecked(Settings):
            size: int = 1


def test_defaults_go_through_their_checks_and_entries_compare_dump_and_hash_by_value():
    kit = Kit(name="a", parts=[{"size": 1}, Part(size=2, mode="0755")])
    assert kit.parts == [Part(size=1, mode="0644"), Part(size=2, mode="755")] and kit.parts[1].mode == 0o755
    assert hash(kit.parts[0]) == hash(Part(size=1))
    assert kit.dump() == {"name": "a", "parts": [{"size": 1, "mode": 420}, {"size": 2, "mode": 493}]}
    assert kit.dump_json() == '{"name":"a","parts":[{"size":1,"mode":420},{"size":2,"mode":493}]}'
    assert Kit.defaults() == {"parts": []} and Kit.names() == ("name", "parts")


def test_every_problem_is_raised_at_once_each_at_its_place():
    with pytest.raises(SettingsError) as raised:
        Kit(parts=[{"size": "x"}, {"sise": 3}, 7], colour="red")
    assert raised.value.problems == [
        Problem(("name",), "missing"),
        Problem(("parts", 0, "size"), "invalid", "expected a number"),
        Problem(("parts", 1, "size"), "missing"),
        Problem(("parts", 1, "sise"), "unknown", known=("size", "mode")),
        Problem(("parts", 2), "invalid", "expected a mapping of size, mode"),
        Problem(("colour",), "unknown", known=("name", "parts"))]
