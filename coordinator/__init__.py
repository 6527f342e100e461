"""covey: durable mail, locks and memory for agents that run asynchronously, on RabbitMQ.

The public API is re-exported here and imported on first use, so that
`import coordinator` (and so every `covey` command) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Address": "coordinator.names",
    "Covey": "coordinator.client",
    "CoveyError": "coordinator.errors",
    "Envelope": "coordinator.envelope",
    "ExitCode": "coordinator.errors",
    "Gateway": "coordinator.gateway",
    "Mail": "coordinator.mailbox",
    "MailStatus": "coordinator.mailbox",
    "MailStore": "coordinator.mailbox",
    "Namespace": "coordinator.namespace",
    "Roster": "coordinator.roster",
    "Settings": "coordinator.settings",
}

# Spelled out, not computed, so that static tools can read it.
__all__ = [
    "Address",
    "Covey",
    "CoveyError",
    "Envelope",
    "ExitCode",
    "Gateway",
    "Mail",
    "MailStatus",
    "MailStore",
    "Namespace",
    "Roster",
    "Settings",
]

if TYPE_CHECKING:
    from coordinator.client import Covey as Covey
    from coordinator.envelope import Envelope as Envelope
    from coordinator.errors import CoveyError as CoveyError
    from coordinator.errors import ExitCode as ExitCode
    from coordinator.gateway import Gateway as Gateway
    from coordinator.mailbox import Mail as Mail
    from coordinator.mailbox import MailStatus as MailStatus
    from coordinator.mailbox import MailStore as MailStore
    from coordinator.names import Address as Address
    from coordinator.namespace import Namespace as Namespace
    from coordinator.roster import Roster as Roster
    from coordinator.settings import Settings as Settings


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
