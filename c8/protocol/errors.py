"""Error codes of the control protocol, in one place (as circus does)."""

OK = 0
BAD_MESSAGE = 1          # not msgpack, not a map, missing fields
UNKNOWN_COMMAND = 2
BAD_SPEC = 3             # subscription spec invalid (unknown event type, bad modifier)
BAD_FILTER = 4           # filter expression does not parse or type-check
NO_SUCH_SUBSCRIPTION = 5
UNSUPPORTED = 6          # the kernel cannot do it (no kprobes, probe refused)
INTERNAL = 7             # a bug: logged in the broker, never a traceback to the client
FORBIDDEN = 8            # the peer's role may not do this (docs/security.md "Roles"); names what
LIMIT_EXCEEDED = 9       # a bounded cost (limits.*) would be passed: names the limit and its key

NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and k.isupper()}


class ProtocolError(Exception):
    """A request the broker refuses; carries the code sent back to the client."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason
