"""perfagent.records.NamedTuple: the same classes typing.NamedTuple makes
(fields, defaults, docstring, methods, constants), without its per-field
type checks at import time."""

from __future__ import annotations

import pickle
import typing

import pytest

from perfagent.records import NamedTuple


class Point(NamedTuple):
    """A point."""

    x: int
    y: int = 2
    label: str = ""

    ORIGIN_NAME = "o"

    @property
    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)

    def moved(self, dx: int) -> "Point":
        return self._replace(x=self.x + dx)


class TypedPoint(typing.NamedTuple):
    """A point."""

    x: int
    y: int = 2
    label: str = ""


def test_same_record_as_typing():
    p = Point(1)
    assert p == (1, 2, "") == TypedPoint(1)
    assert Point._fields == TypedPoint._fields == ("x", "y", "label")
    assert Point._field_defaults == TypedPoint._field_defaults == {"y": 2, "label": ""}
    assert Point.__doc__ == "A point." and Point.__name__ == "Point"
    assert Point.__module__ == __name__ and Point.__qualname__ == "Point"
    assert Point.__annotations__ == {"x": "int", "y": "int", "label": "str"}
    assert Point.__mro__ == (Point, tuple, object)
    assert repr(Point(3, 4, "a")) == "Point(x=3, y=4, label='a')"
    assert Point(-3, 4).norm1 == 7 and Point(1).moved(2) == Point(3)
    assert Point.ORIGIN_NAME == "o"
    assert Point._make([5, 6, "b"])._asdict() == {"x": 5, "y": 6, "label": "b"}
    assert pickle.loads(pickle.dumps(Point(7, 8))) == Point(7, 8)
    with pytest.raises(AttributeError):
        Point(1).x = 3


def test_declaration_errors_as_typing():
    with pytest.raises(TypeError, match="Non-default namedtuple field b cannot follow default field a"):
        class Bad(NamedTuple):
            a: int = 0
            b: int
    with pytest.raises(AttributeError, match="Cannot overwrite NamedTuple attribute _replace"):
        class Worse(NamedTuple):
            a: int

            def _replace(self):
                return self
