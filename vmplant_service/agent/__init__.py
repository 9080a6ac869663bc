"""The plant's side of the guest agent channel: a bounded transport and typed qemu-ga commands."""

from .qga import ExecStatus, GuestAgent
from .transport import AgentCommandError, AgentError, AgentTimeout, AgentTransport, SocketTransport

__all__ = ["AgentCommandError", "AgentError", "AgentTimeout", "AgentTransport", "ExecStatus", "GuestAgent",
           "SocketTransport"]
