"""The User-Mode Linux backend: one ``linux.uml`` (Debian's ``user-mode-linux``) per VM, with its relay.

A UML guest is a Linux kernel running as an ordinary host process: there
is no machine to emulate, no KVM/TCG, and guest code runs natively (its
system calls are caught through ptrace). The guest is the same ``tiny``
image as everywhere (its ext4 root file system, its init and qemu-ga);
only the kernel is UML's own binary, so the image's ``vmlinux`` and
initramfs are not used: UML has ext4, ubd and hostfs built in. UML cannot
boot a stock x86 kernel, so it serves only images whose root file system
boots under any kernel (``<guest kernel="any">``, as tiny's does); a stock
system such as the Debian 12 cloud image is declined at bid time
(``capabilities().kernel_limit``), and no cloud-init seed disk is attached
(``seed_disk`` False).

One module per job:

- :mod:`.backend`: the contract (:class:`UmlBackend`); :mod:`.agent`: the
  agent's transport (requests small enough for UML's serial line);
- :mod:`.relay`: the per-VM daemon, UML's parent: the agent's socket, the
  console's keeper, the segment NICs' plugs, UML's exit record;
- :mod:`.launcher`: jails UML, drops it to the hypervisor user and execs it;
- :mod:`.jail`: what the jail holds; :mod:`.disk`: the disk UML gets;
  :mod:`.command`: UML's command line; :mod:`.states`: conditions and the
  state table; :mod:`.fpu`: the FPU probe; :mod:`.paths`, :mod:`.procs`.

What the backend makes in a VM's ``run_dir`` (0700; every file 0600 but
the disk file, 0660 root:hypervisor group):

- ``relay.pid``, ``uml.pid``, ``nicN.plug.pid``: the relay, UML (the
  launcher execs UML in place, so it keeps the launcher's pid) and the
  plugs of segment NICs. A pid is trusted only while its command line names
  the VM's marker ``RUN_DIR/`` (pids get reused); every process of a VM is
  in its relay's session;
- ``qga.sock``: the guest agent's stream, served by the relay
  (:meth:`UmlBackend.agent`), the VM's only configuration channel;
- ``console.log`` (``console.log.1``): the guest's console and UML's own
  output, kept by the relay, rotated at ``console_limit`` bytes;
- ``uml.exit``: how UML ended (its exit status or signal, recorded by the
  relay); ``relay.err``: what the relay itself said on stderr (a few lines at most);
- ``disk.cow`` or ``disk.raw``: the VM's disk (:mod:`.disk`);
- ``root/``: an empty directory, the mount point of the VM's jail.

**Channel.** UML has no virtio-serial, so qemu-ga runs in isa-serial mode
on the guest's ``/dev/ttyS0`` (UML's ``ssl0``), which UML maps to a host
descriptor: one end of a socketpair whose other end the **relay** holds and
serves on ``qga.sock``, one client at a time (as QEMU's chardev socket does),
with bounded buffers. A relay, not the plant, because the line must outlive
the plant: a host end that closes hangs the line up for good, and a
restarted plant must talk to the same agent again (it connects to the
socket, and the transport resynchronises). Requests sent before qemu-ga
opens the line may be lost: the plant's readiness probe
(:meth:`~vmplant_service.channel.Channel.wait_agent`) reconnects and sends
a new ``guest-sync-delimited`` every second until one is answered. The line
is a tty in the guest, which UML 6.1 loses for good once 4 KiB wait unread
in it (see :mod:`.relay`): the backend's transport
(:class:`.agent.SerialLineTransport`) keeps every request under 2 KiB
(large file writes and script inputs go in pieces), and the relay feeds
UML only what it has read, dropping stale probes.

**Confinement.** hostfs lets the guest's root mount *any* host path the
UML process can reach. So (``confine=namespace``, the default) UML runs in
a mount namespace whose root holds only what :mod:`.jail` lists: its
programs, the data store and the base image read-only, the VM's own disk
*file*, and a jail-private tmpfs for UML's memory file and ``uml_dir``
(where its mconsole socket lives: the plant never uses the mconsole, so
nothing a guest does there reaches the plant or a neighbour). No host
directory that the plant opens is in the jail. UML runs as the ``runas``
user with no capabilities, ``no_new_privs``, ``RLIMIT_FSIZE`` = the larger
of its disk file's and its memory file's size + 1 MiB (the guest can reach
its own disk file through hostfs, as the user UML runs as: the limit keeps
it from growing that file, or any file UML writes, past what the disk
legitimately holds; the file belongs to root, so the guest cannot chmod it
set-uid either), and the parent-death signal (it never outlives its relay).
Non-root plants get the namespace through a user namespace (no user switch
then). ``confine=none`` skips the jail (for hosts without namespaces; the
guest can then reach, through hostfs, whatever the UML user can).

**Host FPU state.** ``fpu_workaround`` (``auto``, ``yes``, ``no``): a
seccomp filter that makes UML keep only the legacy FPU state, with the
guest's glibc told not to use AVX. ``auto`` decides by a probe boot,
cached (see :mod:`.fpu`): on this host plain UML passes and the workaround
corrupts guest memory, so ``auto`` leaves it off.

**Networks.** 'user': ``ethN=vde,slirp:///v4/restricted/tcpfwd=...``:
UML's vde transport runs ``vde_plug`` (in the jail, as the UML user) with
vdeplug4's libslirp; DHCP gives the guest 10.0.2.15, ``restricted`` keeps it
from reaching anything (host included), and the host reaches its port 80 on
127.0.0.1 only, as with QEMU's ``restrict=on``. The forward listens once the
guest brings the NIC up (rcS does, before the agent answers). 'segment':
``ethN=vde,seqpacket://FD``: the relay's ``vde_plug``, outside the jail,
joins the descriptor's other end to the owner's switch (``Nic.switch``), so
the jail needs no switch directory.

**States.** From the process table and the relay's exit record, never from
anything the guest writes (:mod:`.states`): a guest that powers off is
``halted`` (STOPPED); a guest kernel panic makes UML abort (``panicked``,
CRASHED). UML is uniprocessor: one vCPU per guest. A reboot inside the
guest re-execs UML in place (same pid): the VM keeps running.

**Stop.** ``guest-shutdown`` through the agent (busybox ``poweroff``; UML
halts and exits with status 0), then every process of the VM is killed
after the timeout. Kills are by pid, each checked against the VM's marker
first; the plant never uses UML's mconsole.

Options (strings, from the plant's configuration):

- ``uml_binary``: default ``linux.uml`` (looked up in PATH);
- ``state_dir``: where the raw base images and the FPU probe's verdict are
  cached (default ``$XDG_CACHE_HOME/vmshop`` or ``~/.cache/vmshop``);
- ``confine``: ``namespace`` (default) or ``none`` (then UML, as the
  ``runas`` user, opens its disk, the cached base and the data store by their
  host paths, so they must be reachable by that user);
- ``runas``: the user UML runs as (default ``vmshop-qemu`` when the plant
  runs as root; ``none`` keeps the plant's user; a root plant without that
  user refuses to start guests unless ``runas=root`` says so);
- ``fpu_workaround``: ``auto`` (default), ``yes`` or ``no``;
- ``start_timeout``: seconds UML may take to start (default 30);
- ``probe_timeout``: seconds the FPU probe boot may take (default 60);
- ``console_limit``: bytes of console log kept before rotation (default 262144);
- ``memory_fraction``: share of the host's memory guests may use (default 0.75).
"""

from __future__ import annotations

from .backend import UmlBackend
from .command import DiskPlan, guest_cmdline, nic_plug_url, uml_command
from .paths import RunPaths
from .states import UML_STATES, translate_condition

__all__ = ["UML_STATES", "DiskPlan", "RunPaths", "UmlBackend", "guest_cmdline", "nic_plug_url",
           "translate_condition", "uml_command"]
