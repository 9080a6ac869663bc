"""Project errors on the wire: VMShopError <-> SOAP fault, one-to-one by code.

Servers turn every failure of a service method into a spyne ``Fault`` with
:func:`to_fault` (a :class:`VMShopError` keeps its stable code; anything
else is ``Server.InternalError`` and is logged with its traceback, never
shown). Clients turn a zeep fault back into the project error with
:func:`from_fault`.
"""

from __future__ import annotations

import logging
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne.model.fault import Fault
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from vmshop_common.errors import ShuttingDownError, VMShopError, error_for_code

log = logging.getLogger("vmshop_common.soap.faults")


def to_fault(error: BaseException) -> Fault:
    """The spyne Fault for ``error``.

    A cancelled Deferred (``CancelledError``) is ``Server.ShuttingDown``, not logged: in these servers only a
    stopping server cancels a request's work (``vmshop_common.soap.listener``).
    """
    if isinstance(error, Fault):
        return error
    if isinstance(error, VMShopError):
        return Fault(faultcode=error.code, faultstring=str(error))
    if isinstance(error, CancelledError):
        return Fault(faultcode=ShuttingDownError.CODE, faultstring="the server is stopping: this request was "
                     "cancelled when its grace ran out")
    log.error("internal error", exc_info=(type(error), error, error.__traceback__))
    return Fault(faultcode="Server.InternalError", faultstring=f"internal error ({type(error).__name__})")


def failure_to_fault(failure: Failure) -> Failure:
    """Errback: replace the failure's exception with its Fault (keeps Deferred chains short)."""
    assert failure.value is not None
    return Failure(to_fault(failure.value))


def from_fault(fault: Any) -> VMShopError:
    """The project error for a ``zeep.exceptions.Fault`` (its code and message kept)."""
    code = str(getattr(fault, "code", "") or "Server.InternalError")
    message = str(getattr(fault, "message", "") or fault)
    return error_for_code(code, message)
