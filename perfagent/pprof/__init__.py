"""pprof output: a hand-written protobuf encoder/decoder for profile.proto.

See perfagent.pprof.profile for the API (ProfileBuilder for writing,
decode_profile / read_profile for reading).
"""

from perfagent.pprof.profile import *  # noqa: F401,F403
from perfagent.pprof.profile import __all__  # noqa: F401
