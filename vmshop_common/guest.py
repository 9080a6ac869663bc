"""What an image's ``<guest>`` says, and which plants can run it for a request.

Shared by the plant (its bids, :mod:`vmplant_service.checkimage`) and the
shop (pricing a plant's offer, :mod:`vmshop_common.offers`): an image a plant
cannot run is never bid with, whoever prices.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dag import Dag, MountAction

AGENTS = ("qemu-ga",)
CONTEXTUALIZATIONS = ("none", "cloud-init")
KERNELS = ("own", "any")
DATA_SHARES = ("9p", "none")


@dataclass(frozen=True)
class GuestTraits:
    """What an image's ``<guest>`` says (the defaults are a 1.0 file's, which has none).

    ``agent``: the agent the plant talks to ('qemu-ga'); ``contextualization``:
    'none' or 'cloud-init' (the plant attaches a NoCloud seed to each VM and
    waits for cloud-init's result before the actions); ``kernel``: 'own' (it
    boots its own kernel, on a virtual machine) or 'any' (its root file
    system also boots under a backend's kernel: User-Mode Linux);
    ``data_share``: '9p' (its kernel mounts the read-only data share) or
    'none'.
    """

    agent: str = "qemu-ga"
    contextualization: str = "none"
    kernel: str = "own"
    data_share: str = "9p"

    @property
    def cloud_init(self) -> bool:
        return self.contextualization == "cloud-init"


def unfit(guest: GuestTraits, dag: Dag, backend: str, kernel_limit: str, seed_disk: bool) -> str | None:
    """Why an image with ``guest`` traits cannot serve the request ``dag`` on ``backend`` (whose
    ``kernel_limit`` and ``seed_disk`` are its capabilities), or None."""
    if guest.agent != "qemu-ga":
        return f"its agent is {guest.agent}; this plant speaks only to qemu-ga"
    if guest.kernel == "own" and kernel_limit:
        return f"it boots its own kernel (<guest kernel='own'>), and {kernel_limit}"
    if guest.cloud_init and not seed_disk:
        return (f"cloud-init configures it from a seed disk (<guest contextualization='cloud-init'>), which "
                f"backend {backend} cannot attach")
    if dag.start.cloud_config is not None and not guest.cloud_init:
        return (f"the DAG's <cloud-config> needs an image with cloud-init, and this one has none "
                f"(<guest contextualization='{guest.contextualization}'>)")
    if guest.data_share == "none":
        mounts = [action.id for action in dag.actions if isinstance(action, MountAction)]
        if mounts:
            return (f"its kernel cannot mount the data share (<guest data-share='none'>), which action "
                    f"'{mounts[0]}' needs")
    return None


__all__ = ["GuestTraits", "unfit"]
