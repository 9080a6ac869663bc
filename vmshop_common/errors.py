"""The project's exceptions.

Every error a client can cause is a :class:`VMShopError` with a stable
``code``. The code is the SOAP fault code (``Client.<Code>`` for problems
with the request, ``Server.<Code>`` for problems on our side), so a code
means the same thing in a Python exception, in a SOAP fault and in the
CLI's exit status. Codes are part of the public contract: never rename one.

Errors about a document carry the line and, where known, the id of the DAG
node they concern; ``str(error)`` names both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: a message, its line and its node."""

    message: str
    line: int | None = None
    node: str | None = None

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.node is not None:
            where.append(f"node '{self.node}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class VMShopError(Exception):
    """Base of the project's errors. ``CODE`` is stable and is the fault code."""

    CODE = "Server.InternalError"

    def __init__(self, message: str, problems: list[Problem] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems: list[Problem] = list(problems or [])
        self.code: str = code or self.CODE

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  {p}" for p in self.problems)

    @property
    def line(self) -> int | None:
        return self.problems[0].line if self.problems else None

    @property
    def node(self) -> str | None:
        return self.problems[0].node if self.problems else None

# Documents -------------------------------------------------


class XMLSyntaxError(VMShopError):
    """The document is not well-formed XML."""

    CODE = "Client.XMLSyntax"


class DoctypeRefusedError(VMShopError):
    """The document has a DOCTYPE; none is accepted."""

    CODE = "Client.DoctypeRefused"


class DocumentTooLargeError(VMShopError):
    """The document exceeds the size or depth limit."""

    CODE = "Client.DocumentTooLarge"


class WrongRootError(VMShopError):
    """The document's root element is not the one expected."""

    CODE = "Client.WrongRoot"


class SchemaInvalidError(VMShopError):
    """The document breaks the XSD."""

    CODE = "Client.SchemaInvalid"


class DagInvalidError(VMShopError):
    """The DAG breaks a rule XSD can't express (cycle, start node, reachability)."""

    CODE = "Client.DagInvalid"

# Requests --------------------------------------------------


class NoSuchImageError(VMShopError):
    """No cached image has that name."""

    CODE = "Client.NoSuchImage"


class NoSuchVMError(VMShopError):
    """No VM has that id."""

    CODE = "Client.NoSuchVM"


class NoSuchPlantError(VMShopError):
    """The plant is not one of this shop's plants."""

    CODE = "Client.NoSuchPlant"


class QueryInvalidError(VMShopError):
    """The query is malformed or names an unknown attribute."""

    CODE = "Client.QueryInvalid"


class NotSupportedError(VMShopError):
    """The operation or option is not supported here."""

    CODE = "Client.NotSupported"


class DeclinedError(VMShopError):
    """No cached image or resource can serve the request."""

    CODE = "Client.Declined"


class AddressNotLeasedError(VMShopError):
    """A static network action names an address that is not the VM's own lease."""

    CODE = "Client.AddressNotLeased"


class ImageExistsError(VMShopError):
    """A publish names an image that the plant's warehouse already has (or is making)."""

    CODE = "Client.ImageExists"


class ImageNameInvalidError(VMShopError):
    """A publish names an image with a name that is not ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``."""

    CODE = "Client.ImageNameInvalid"


class VMBusyError(VMShopError):
    """The VM is in the middle of other work (being created, configured, published or collected)."""

    CODE = "Client.VMBusy"


class ImageInUseError(VMShopError):
    """An unpublish names an image that a live VM or another image still uses as its base."""

    CODE = "Client.ImageInUse"


# Who is calling ---------------------------------------------


class CredentialsError(VMShopError):
    """A client's or server's own TLS credentials are unusable (unreadable, expired, a key that does not
    match), or the peer refused them in the handshake (unknown CA, expired), or an https URL has no CA."""

    CODE = "Client.BadCredentials"


class AuthenticationFailedError(VMShopError):
    """The caller proved no identity this server knows: no client certificate, a certificate whose subject
    is not in the authorisation file, or a WS-Security token that does not check."""

    CODE = "Client.AuthenticationFailed"


class NotAuthorizedError(VMShopError):
    """The caller's identity has no right to this operation (a role it lacks, an owner that is not its own,
    a plant notice for an address that is not its own)."""

    CODE = "Client.NotAuthorized"


class QuotaExceededError(VMShopError):
    """The VM would take the owner past a quota; the message names the limit and the current use."""

    CODE = "Client.QuotaExceeded"

# SOAP envelopes --------------------------------------------
# A request's envelope must be SOAP 1.1 with exactly one Body holding exactly one operation element
# (vmshop_common/soap/envelope.py checks it); each way of breaking that has its own code.


class VersionMismatchError(VMShopError):
    """The request's Envelope is not in SOAP 1.1's namespace (a SOAP 1.2 envelope, or none): SOAP 1.1's own
    ``VersionMismatch`` fault (section 4.4.1), the one code here without ``Client.``."""

    CODE = "VersionMismatch"


class NotAnEnvelopeError(VMShopError):
    """The request's root element is not a SOAP Envelope."""

    CODE = "Client.NotAnEnvelope"


class NoBodyError(VMShopError):
    """The Envelope has no Body."""

    CODE = "Client.NoBody"


class ExtraBodyError(VMShopError):
    """The Envelope has more than one Body."""

    CODE = "Client.ExtraBody"


class HeaderMisplacedError(VMShopError):
    """A Header that is not the Envelope's first element (after the Body, or a second one)."""

    CODE = "Client.HeaderMisplaced"


class StrayContentError(VMShopError):
    """Something SOAP 1.1 does not put where it is: text in the Envelope or beside the operation, an element
    other than Header and Body in the Envelope."""

    CODE = "Client.StrayContent"


class NoOperationError(VMShopError):
    """The Body holds no operation element (it is empty, or holds a SOAP Fault)."""

    CODE = "Client.NoOperation"


class ExtraOperationError(VMShopError):
    """The Body holds more than one operation element."""

    CODE = "Client.ExtraOperation"


# Stopping --------------------------------------------------


class ShuttingDownError(VMShopError):
    """The server is stopping: it takes no new request, and one still running when its grace ran out was
    cancelled."""

    CODE = "Server.ShuttingDown"


class BusyError(VMShopError):
    """More requests wait for the server's threads than it lets wait: this one is refused at once (try later)."""

    CODE = "Server.Busy"


class RegistryUnavailableError(VMShopError):
    """The shop's registry database cannot be reached (or the connection was lost during the call): nothing
    was half-written (a transaction is all or nothing); try again once it is back."""

    CODE = "Server.RegistryUnavailable"


class DeadlineExceededError(VMShopError):
    """Work for a request did not end within its stated deadline; the request is answered (the work may still
    end later, its result unused)."""

    CODE = "Server.DeadlineExceeded"

# Plants and guests -----------------------------------------


class CapacityExhaustedError(VMShopError):
    """The plant has no room for another VM."""

    CODE = "Server.CapacityExhausted"


class PoolExhaustedError(VMShopError):
    """The plant has no free address in its pool."""

    CODE = "Server.PoolExhausted"


class ActionFailedError(VMShopError):
    """A configuration action failed inside the guest."""

    CODE = "Server.ActionFailed"


class BackendError(VMShopError):
    """The hypervisor backend failed."""

    CODE = "Server.BackendError"


class DiskFullError(VMShopError):
    """The plant's warehouse has not the room a new image needs."""

    CODE = "Server.DiskFull"


class TransferFailedError(VMShopError):
    """An image could not be fetched from a peer: unreachable, refused, or its bytes are not what its manifest
    says (size or sha256); nothing of it is kept."""

    CODE = "Server.TransferFailed"


class NoPlantError(VMShopError):
    """No plant could create the VM."""

    CODE = "Server.NoPlantAvailable"


class PlantGoneError(VMShopError):
    """The plant holding the VM does not answer."""

    CODE = "Server.PlantGone"


class OfferInvalidError(VMShopError):
    """A plant's offer fails validation (or names another plant): refused, the offer held before stays."""

    CODE = "Client.OfferInvalid"


class OfferExceededError(VMShopError):
    """The plant re-priced a create with its live state: worse than the offer the shop chose it by (plus the
    shop's margin), so it declines; the shop tries the next plant."""

    CODE = "Server.OfferExceeded"


class ConfigurationError(VMShopError):
    """A configuration file is wrong."""

    CODE = "Server.Configuration"


ALL_ERRORS: tuple[type[VMShopError], ...] = (
    XMLSyntaxError, DoctypeRefusedError, DocumentTooLargeError, WrongRootError, SchemaInvalidError,
    DagInvalidError, NoSuchImageError, NoSuchVMError, NoSuchPlantError, QueryInvalidError, NotSupportedError,
    DeclinedError, AddressNotLeasedError, ImageExistsError, ImageNameInvalidError, VMBusyError, ImageInUseError,
    CredentialsError, AuthenticationFailedError, NotAuthorizedError,
    QuotaExceededError, VersionMismatchError, NotAnEnvelopeError, NoBodyError, ExtraBodyError, HeaderMisplacedError,
    StrayContentError, NoOperationError, ExtraOperationError, ShuttingDownError, BusyError, DeadlineExceededError,
    RegistryUnavailableError,
    CapacityExhaustedError, PoolExhaustedError, ActionFailedError, BackendError, DiskFullError, TransferFailedError,
    NoPlantError, PlantGoneError, OfferInvalidError, OfferExceededError, ConfigurationError,
)
ERROR_BY_CODE: dict[str, type[VMShopError]] = {cls.CODE: cls for cls in ALL_ERRORS}


def error_for_code(code: str, message: str) -> VMShopError:
    """Rebuild the project error for a fault code (clients use this); unknown codes give the base class."""
    code = code.split(":", 1)[-1]  # zeep reports 'soap11env:Client.X'
    cls = ERROR_BY_CODE.get(code)
    if cls is None:
        return VMShopError(message, None, code)
    return cls(message)
