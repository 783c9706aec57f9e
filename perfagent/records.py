"""``NamedTuple`` without typing's per-field work at import time.

``class Mapping(NamedTuple): pid: int ...`` is how the package declares its
records.  typing.NamedTuple type-checks every annotation when the class is
made, and under ``from __future__ import annotations`` (every module here)
each one is a string it compiles into a ForwardRef: ~290 fields on the
capture path, ~4-7 ms of every start-up, for checks nothing reads.  This
base makes the same class, a ``collections.namedtuple`` with the
declaration's defaults, docstring, methods and constants, and keeps the
annotations as written.
"""

from __future__ import annotations

import collections

# As typing.NamedTuple: names a record may not define, and namespace
# entries that are not copied onto the class.
_PROHIBITED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
                         "_field_defaults", "_make", "_replace", "_asdict", "_source"})
_SPECIAL = frozenset({"__module__", "__name__", "__annotations__"})


class _RecordMeta(type):
    def __new__(mcls, typename, bases, namespace):
        if namespace.get("_root", False):
            return super().__new__(mcls, typename, bases, namespace)
        annotations = namespace.get("__annotations__", {})
        fields = list(annotations)
        defaults = []
        for name in fields:
            if name in namespace:
                defaults.append(namespace[name])
            elif defaults:
                raise TypeError("Non-default namedtuple field %s cannot follow default field%s %s"
                                % (name, "s" if len(defaults) > 1 else "",
                                   ", ".join(f for f in fields if f in namespace)))
        record = collections.namedtuple(typename, fields, defaults=defaults,
                                        module=namespace.get("__module__"))
        record.__annotations__ = dict(annotations)
        for key, value in namespace.items():
            if key in _PROHIBITED:
                raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
            if key not in _SPECIAL and key not in record._fields:
                setattr(record, key, value)
        return record


class NamedTuple(metaclass=_RecordMeta):
    """Base of the package's records (see the module's docstring)."""

    _root = True
