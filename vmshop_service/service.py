"""The shop's SOAP service: :class:`~vmshop_service.shop.Shop` on the wire.

The five operations of the original (create, configure, estimate, query,
collect), describe and the plants' health, and the WSRF-style resource
operations on a VM (its resource-properties document, GetResourceProperty,
QueryResourceProperties with XPath 1.0, SetTerminationTime, Destroy). Every
per-VM operation takes the VM's endpoint reference. Every method returns a
Deferred; failures become SOAP faults with the project's stable codes. Who
may call what is :mod:`vmshop_common.authz`'s to say; the shop applies it
with the caller's identity.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import Boolean, Double, Integer, ServiceBase, Unicode, rpc
from twisted.internet import defer

from vmshop_common.authz import Identity
from vmshop_common.errors import AuthenticationFailedError
from vmshop_common.soap.faults import failure_to_fault

from .wire import ActionRun, CreateResult, EndpointReference, Estimate, Offer, PlantStatus, PublishedImage, VMInfo

APP_NAME = "VMShop"
MAX_DAG_CHARS = 1024 * 1024

Dag = Unicode(max_len=MAX_DAG_CHARS, min_occurs=1, nillable=False)
Epr = EndpointReference.customize(min_occurs=1, nillable=False)
Strings = Unicode.customize(max_occurs="unbounded")


T = TypeVar("T")
#: A method's answer now, or a Deferred that fires with it.
Answer: TypeAlias = "T | defer.Deferred[Any]"


@runtime_checkable
class ShopOperations(Protocol):
    """What :class:`VMShopService` calls on ``ctx.app.vmshop``: the real :class:`~vmshop_service.shop.Shop` and
    the tests' ``FakeShop`` (``tests/fake_shop.py``) both satisfy it (``tests/test_shop_protocol.py`` checks
    both, with mypy and at run time).

    Each method is called with the caller's identity (already authenticated; authorising is the method's
    job) and the request's values, positionally, in the order below; it answers the value or a Deferred
    that fires with it (or fails with a :class:`~vmshop_common.errors.VMShopError`, which becomes the fault).
    ``vm`` is the VM's endpoint reference as sent (``Address``, ``VMKey``).
    """

    def create(self, caller: Identity, dag_xml: str, owner: str, termination: float | None, key: str | None,
               /) -> Answer[CreateResult]: ...

    def estimate(self, caller: Identity, dag_xml: str, /) -> Answer[Estimate]: ...

    def configure(self, caller: Identity, vm: Any, dag_xml: str, /) -> Answer[list[ActionRun]]: ...

    def query(self, caller: Identity, text: str, limit: int | None, /) -> Answer[list[VMInfo]]: ...

    def describe(self, caller: Identity, vm: Any, /) -> Answer[VMInfo]: ...

    def collect(self, caller: Identity, vm: Any, /) -> Answer[VMInfo]: ...

    def set_termination(self, caller: Identity, vm: Any, termination: float | None, /) -> Answer[VMInfo]: ...

    def resource_document(self, caller: Identity, vm: Any, /) -> Answer[str]: ...

    def resource_property(self, caller: Identity, vm: Any, name: str, /) -> Answer[list[str]]: ...

    def resource_query(self, caller: Identity, vm: Any, xpath: str, /) -> Answer[list[str]]: ...

    def publish(self, caller: Identity, vm: Any, image: str, public: bool, with_state: bool = False, /
                ) -> Answer[PublishedImage]: ...

    def unpublish(self, caller: Identity, image: str, /) -> Answer[list[str]]: ...

    def set_image_public(self, caller: Identity, image: str, public: bool, /) -> Answer[list[str]]: ...

    def set_image_movable(self, caller: Identity, image: str, movable: bool, /) -> Answer[list[str]]: ...

    def plants_list(self, caller: Identity, /) -> Answer[list[PlantStatus]]: ...

    def reload_plants(self, caller: Identity, /) -> Answer[list[PlantStatus]]: ...

    def plant_changed(self, caller: Identity, url: str, offer: Any, /) -> Answer[bool]: ...


#: The operation names of :class:`ShopOperations` (what ``_call`` may be asked to run).
SHOP_OPERATIONS = ("create", "estimate", "configure", "query", "describe", "collect", "set_termination",
                   "resource_document", "resource_property", "resource_query", "publish", "unpublish",
                   "set_image_public", "set_image_movable", "plants_list", "reload_plants", "plant_changed")


def _shop(ctx: Any) -> ShopOperations:
    return ctx.app.vmshop  # type: ignore[no-any-return]


def _call(ctx: Any, method: str, *args: Any) -> defer.Deferred[Any]:
    """Run ``shop.method(caller, *args)`` (which may return a Deferred) with failures turned into faults.

    ``caller`` is the identity the SOAP resource found for the request (``ctx.udc``: the subject of the
    client's certificate, mapped by the authorisation file); a request without one is refused.
    """
    caller = ctx.udc
    if caller is None:
        return defer.fail(AuthenticationFailedError("no identity: this shop serves only identified callers")) \
            .addErrback(failure_to_fault)
    return defer.maybeDeferred(getattr(_shop(ctx), method), caller, *args).addErrback(failure_to_fault)


class VMShopService(ServiceBase):
    """VMShop: virtual machines for Grid computing, made where they cost least."""

    @rpc(Dag, Unicode(max_len=256), Double, Unicode(max_len=64), _returns=CreateResult)
    def createVM(ctx, dag, owner, termination_time, vm_key):  # noqa: N802, N805
        """Create a VM from the DAG on the plant that bids least; re-bid if that plant fails.
        termination_time (epoch seconds) sets the VM's lease; vm_key lets the caller choose its key."""
        return _call(ctx, "create", dag, owner or "", termination_time, vm_key or None)

    @rpc(Dag, _returns=Estimate)
    def estimateCost(ctx, dag):  # noqa: N802, N805
        """The best bid for the DAG and the plants' bids (nothing is created): priced from the plants' offers
        (each bid says how old its offer is; the best 16 and 16 declines are listed, the rest counted), or in
        live mode every plant's own answer."""
        return _call(ctx, "estimate", dag)

    @rpc(Epr, Dag, _returns=ActionRun.customize(max_occurs="unbounded"))
    def configureVM(ctx, vm, dag):  # noqa: N802, N805
        """Run the DAG's actions inside the VM, in DAG order; their results."""
        return _call(ctx, "configure", vm, dag)

    @rpc(Unicode(max_len=4096), Integer, _returns=VMInfo.customize(max_occurs="unbounded"))
    def queryVMs(ctx, query, limit):  # noqa: N802, N805
        """VMs matching a conjunction of attribute-value terms, e.g. 'memory>=256 state=running project=x'."""
        return _call(ctx, "query", query or "", limit)

    @rpc(Epr, _returns=VMInfo)
    def describeVM(ctx, vm):  # noqa: N802, N805
        """The VM's registry entry (state kept current from its plant)."""
        return _call(ctx, "describe", vm)

    @rpc(Epr, _returns=VMInfo)
    def collectVM(ctx, vm):  # noqa: N802, N805
        """Destroy the VM on its plant and keep the record that it existed; collecting twice is fine."""
        return _call(ctx, "collect", vm)

    @rpc(Epr, _returns=VMInfo)
    def destroy(ctx, vm):  # noqa: N805
        """WSRF Destroy: collect the VM now."""
        return _call(ctx, "collect", vm)

    @rpc(Epr, Double, _returns=VMInfo)
    def setTerminationTime(ctx, vm, termination_time):  # noqa: N802, N805
        """WSRF SetTerminationTime: the VM is collected when this time (epoch seconds) passes; nil: never."""
        return _call(ctx, "set_termination", vm, termination_time)

    @rpc(Epr, _returns=Unicode)
    def getResourcePropertyDocument(ctx, vm):  # noqa: N802, N805
        """The VM's resource-properties document (namespace urn:vmshop:vm-resource:1)."""
        return _call(ctx, "resource_document", vm)

    @rpc(Epr, Unicode(max_len=256), _returns=Strings)
    def getResourceProperty(ctx, vm, name):  # noqa: N802, N805
        """WSRF GetResourceProperty: the property elements named (e.g. 'rp:Memory'), as XML."""
        return _call(ctx, "resource_property", vm, name)

    @rpc(Epr, Unicode(max_len=1024), _returns=Strings)
    def queryResourceProperties(ctx, vm, xpath):  # noqa: N802, N805
        """WSRF QueryResourceProperties: an XPath 1.0 expression over the document (prefix rp)."""
        return _call(ctx, "resource_query", vm, xpath)

    @rpc(Epr, Unicode(min_occurs=1, nillable=False, max_len=256), Boolean, Boolean, _returns=PublishedImage)
    def publishVM(ctx, vm, image, is_public, with_state):  # noqa: N802, N805
        """Make the VM's disk a new cached image named ``image`` on its plant: its changes over its base, with the
        steps it ran as the image's DAG. The image serves only the VM's owner unless ``is_public`` (admins
        only; not ``public``, a keyword of Java and C#, whose WSDL tools refuse it as a parameter name).
        ``with_state``: the image also carries the guest's running state; its clones resume from it instead of
        booting, on plants whose backend can (the others boot them)."""
        return _call(ctx, "publish", vm, image, bool(is_public), bool(with_state))

    @rpc(Unicode(min_occurs=1, nillable=False, max_len=256), _returns=Strings)
    def unpublishImage(ctx, image):  # noqa: N802, N805
        """Remove the caller's published image from every plant that has it (once no VM or image uses it as a
        base); the addresses of those plants."""
        return _call(ctx, "unpublish", image)

    @rpc(Unicode(min_occurs=1, nillable=False, max_len=256), Boolean(min_occurs=1, nillable=False), _returns=Strings)
    def setImagePublic(ctx, image, is_public):  # noqa: N802, N805
        """Make a published image public (it serves every owner's requests) or private again, on every plant that
        has it (admins only); the addresses of those plants."""
        return _call(ctx, "set_image_public", image, bool(is_public))

    @rpc(Unicode(min_occurs=1, nillable=False, max_len=256), Boolean(min_occurs=1, nillable=False), _returns=Strings)
    def setImageMovable(ctx, image, is_movable):  # noqa: N802, N805
        """Let the caller's private published image move between the site's plants that agree to serve and fetch
        owners' movable images (each fetched copy stays the owner's, private), or stop it, on every plant that
        has it (its owner or an admin; another owner's image does not exist to the caller); those plants."""
        return _call(ctx, "set_image_movable", image, bool(is_movable))

    @rpc(_returns=PlantStatus.customize(max_occurs="unbounded"))
    def listPlants(ctx):  # noqa: N802, N805
        """The plants this shop knows, with their health."""
        return _call(ctx, "plants_list")

    @rpc(_returns=PlantStatus.customize(max_occurs="unbounded"))
    def reloadPlants(ctx):  # noqa: N802, N805
        """Re-read the plant list (addresses/vmplant_addresses.txt) and check each plant."""
        return _call(ctx, "reload_plants")

    @rpc(Unicode(min_occurs=1, nillable=False, max_len=2048), Offer, _returns=Boolean)
    def plantChanged(ctx, plant, offer):  # noqa: N802, N805
        """A plant's notice that some of its VMs changed (it names its own URL), with its offer when that
        changed; the shop then asks that plant for its VMs. Only plants on the shop's list are heard (else
        Client.NoSuchPlant), only from that plant's identity (else Client.NotAuthorized); a bad offer is
        refused (Client.OfferInvalid)."""
        return _call(ctx, "plant_changed", plant, offer)
