"""The pprof profile API in one place: model, decoder, encoder and builder.

The implementation is split by direction (model.py, decode.py, encode.py,
builder.py, over wire.py); import from here so that split stays private.
"""

from perfagent.pprof.builder import ProfileBuilder
from perfagent.pprof.decode import decode_profile, read_profile
from perfagent.pprof.encode import encode_profile, gzip_profile, write_profile
from perfagent.pprof.model import (
    Function,
    Label,
    LabelValue,
    Line,
    Location,
    Mapping,
    Profile,
    Sample,
    ValueType,
    sample_labels,
)

__all__ = [
    "Function",
    "Label",
    "LabelValue",
    "Line",
    "Location",
    "Mapping",
    "Profile",
    "ProfileBuilder",
    "Sample",
    "ValueType",
    "decode_profile",
    "encode_profile",
    "gzip_profile",
    "read_profile",
    "sample_labels",
    "write_profile",
]
