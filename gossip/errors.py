"""The one small family of errors the wire raises.

Who broke what: `LocalProtocolError` means we misused a protocol; `RemoteProtocolError` means
the peer sent something invalid. trio, OS and cryptography exceptions are translated into this
family once, at the transport boundary, never deep inside protocol logic.
"""


class MurmurError(Exception):
    """Base of every error murmur raises on purpose."""


class LocalProtocolError(MurmurError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(MurmurError):
    """The peer sent bytes or a message that break the protocol; its connection is dropped."""


class AuthenticationError(RemoteProtocolError):
    """The handshake failed: wrong swarm key, wrong version, bad signature or unexpected peer id."""


class PeerTimeout(MurmurError):
    """A peer did not answer before the deadline."""


class PeerUnreachable(MurmurError):
    """A peer could not be reached: refused, reset, closed, unresolvable or unroutable."""


class RemoteError(MurmurError):
    """The peer's handler raised; `kind` is its error class name, `message` its text.

    The peer only reports a name and a message: nothing it sends is turned back into a Python
    object, so a peer cannot make us raise arbitrary exception types.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"remote {kind}: {message}")
        self.kind = kind
        self.message = message
