#!/usr/bin/env python3
"""The main job, end to end: a plant and a shop on loopback, one VM made, configured, found and collected.

Run by ``scripts/demo.sh`` (which sets the machine up first). It first makes
a site CA and credentials of its own with ``vmshop-ca`` (in ``var/demo/pki``):
the shop, the plant and the user ``demo`` each get a certificate, and each
server an authorisation file saying who may call it. The plant and the shop
then speak mutual TLS, and every step is a ``vmshop`` command as the user
``demo`` (``VMSHOP_CERT``/``VMSHOP_KEY``/``VMSHOP_CA``), printed before it
runs, so the output shows the CLI as a user would type it; a second user
(``bob``) is shown that demo's VM does not exist for him. Nothing is left
running afterwards; the servers' logs and configuration stay in
``var/demo/`` for a look.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VMSHOP = str(Path(PYTHON).with_name("vmshop"))
VMSHOP_CA = str(Path(PYTHON).with_name("vmshop-ca"))


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def start(name: str, module: str, config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server on a free loopback port and wait (with a deadline) until it listens."""
    out = open(log, "wb")  # noqa: SIM115 - the server writes to it for its whole life
    process = subprocess.Popen([PYTHON, "-m", module, "--config", str(config), "--port", "0"],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(config.parent))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on (https?://127\.0\.0\.1:(\d+)/)", log.read_text(errors="replace"))
        if found:
            print(f"{name} listening on {found.group(1)} (log: {log.relative_to(ROOT)})", flush=True)
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{name} did not start:\n{log.read_text(errors='replace')}")


def run(*args: str) -> None:
    """Run a command, echoing it; stop the demo if it fails."""
    print(f"$ {' '.join(shlex.quote(a) for a in (Path(args[0]).name, *args[1:]))}", flush=True)
    subprocess.run(list(args), check=True, cwd=str(ROOT))


def vmshop(url: str, *args: str, env: dict[str, str] | None = None, expect: int = 0) -> None:
    """Run one ``vmshop`` command against the shop, echoing it; stop the demo if its exit status is not
    ``expect``."""
    print(f"\n$ vmshop {' '.join(shlex.quote(a) for a in args)}", flush=True)
    result = subprocess.run([VMSHOP, "--shop", url, *args], cwd=str(ROOT), env=env)
    if result.returncode != expect:
        raise SystemExit(f"vmshop {args[0]} ended with exit status {result.returncode}, not {expect}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    warehouse = Path(os.environ.get("VMSHOP_WAREHOUSE", ROOT / "var" / "warehouse"))
    work = ROOT / "var" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data" / "appdata").mkdir(parents=True)
    (work / "data" / "appdata" / "input.txt").write_text("virtual machines for grid computing\n")
    servers: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    vm = "-"
    try:
        banner("A site CA of the demo's own, a certificate for each server and user, who may call whom")
        pki = work / "pki"
        plant_map, shop_map = work / "vmplant-mapfile", work / "vmshop-mapfile"
        run(VMSHOP_CA, "init", str(pki), "--org", "VMShop demo")
        run(VMSHOP_CA, "issue", str(pki), "plant1", "--role", "plant")
        run(VMSHOP_CA, "issue", str(pki), "shop", "--role", "shop", "--mapfile", str(plant_map))  # the plant obeys it
        run(VMSHOP_CA, "issue", str(pki), "demo", "--role", "user", "--mapfile", str(shop_map))
        run(VMSHOP_CA, "issue", str(pki), "bob", "--role", "user", "--mapfile", str(shop_map))

        banner("Configure and start a VMPlant (QEMU backend, host-only VDE segment, address pool, TLS)")
        subprocess.run([PYTHON, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--port", "0",
                        "--warehouse", str(warehouse), "--state-dir", str(work / "plant"), "--backend", "qemu",
                        "--network", "vde", "--datastore", str(work / "data"), "--shops-file",
                        str(work / "vmshop_addresses.txt"), "--output", str(work / "configuration_vmplant.xml"),
                        "--tls-cert", str(pki / "plant1.pem"), "--tls-key", str(pki / "plant1.key"),
                        "--tls-ca", str(pki / "ca.pem"), "--authorization", str(plant_map)],
                       check=True, cwd=str(work))
        plant, plant_url = start("VMPlant", "vmplant_service.main", work / "configuration_vmplant.xml",
                                 work / "plant.log")
        servers.append(plant)

        banner("Configure and start a VMShop that uses that plant")
        plant_address = plant_url.split("://", 1)[1].rstrip("/")
        plants_file = work / "vmplant_addresses.txt"
        plants_file.write_text(plant_address + "\n")
        # The shop hears notices for that address only from the plant's own certificate.
        with open(shop_map, "a", encoding="utf-8") as mapfile:
            mapfile.write(f'"CN=plant1,O=VMShop demo" plant1 plant {plant_address}\n')
        print(f"{shop_map.relative_to(ROOT)}:\n{shop_map.read_text()}", end="")
        subprocess.run([PYTHON, str(ROOT / "scripts" / "configure_vmshop.py"), "--yes", "--port", "0",
                        "--database", str(work / "registry.sqlite3"), "--plants-file", str(plants_file),
                        "--output", str(work / "configuration_vmshop.xml"),
                        "--tls-cert", str(pki / "shop.pem"), "--tls-key", str(pki / "shop.key"),
                        "--tls-ca", str(pki / "ca.pem"), "--authorization", str(shop_map)], check=True, cwd=str(work))
        shop, shop_url = start("VMShop", "vmshop_service.main", work / "configuration_vmshop.xml", work / "shop.log")
        servers.append(shop)
        # The plant tells the shops in its shop list of changes (it reads the list again at every change).
        shop_address = shop_url.split("://", 1)[1].rstrip("/")
        shops_file = work / "vmshop_addresses.txt"
        shops_file.write_text(f"{shop_address}\n")
        print(f"wrote {shops_file.relative_to(ROOT)} ({shop_address}: the plant tells this shop of changes)")

        banner("From here on, every command is the user 'demo' (its certificate says so)")
        for variable, value in (("VMSHOP_CERT", pki / "demo.pem"), ("VMSHOP_KEY", pki / "demo.key"),
                                ("VMSHOP_CA", pki / "ca.pem")):
            os.environ[variable] = str(value)
            print(f"$ export {variable}={value.relative_to(ROOT)}")

        banner("The shop's plants")
        vmshop(shop_url, "plants")
        banner("Ask every plant for a bid (nothing is made)")
        vmshop(shop_url, "estimate", "--dag", "scripts/sample_image.xml")
        banner("Create the VM where it costs least: cloned, booted, configured inside the guest")
        vm = "vm-demo-" + os.urandom(3).hex()
        vmshop(shop_url, "create", "--dag", "scripts/sample_image.xml", "--vm-key", vm)
        banner("Configure it with one more action; its output comes back from inside the guest")
        (work / "more.xml").write_text(
            '<vm xmlns="urn:vmshop:dag:1"><nodes><image id="vm" name="tiny"/>'
            '<script id="hello">echo "hello from $(hostname), kernel $(uname -r)"; cat /tmp/wordcount.out</script>'
            '</nodes><edges><edge from="vm" to="hello"/></edges></vm>\n')
        vmshop(shop_url, "configure", vm, "--dag", str(work / "more.xml"))
        banner("Find it by a query over built-in and user attributes")
        vmshop(shop_url, "query", "state=running application=wordcount memory>=128")
        vmshop(shop_url, "show", vm)
        banner("Another user does not even see it")
        vmshop(shop_url, "--cert", str(pki / "bob.pem"), "--key", str(pki / "bob.key"), "show", vm, expect=1)
        banner("Collect it: the guest is stopped, its clone deleted, its address released; the record stays")
        vmshop(shop_url, "collect", vm)
        vmshop(shop_url, "query", f"vm_id={vm}")
    finally:
        for process in reversed(servers):
            stop(process)
        leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
        for pid in leftovers:
            os.kill(int(pid), signal.SIGKILL)
    banner("Summary")
    print("a VMPlant and a VMShop ran on 127.0.0.1 over mutual TLS with the demo's own CA; the user 'demo' had")
    print(f"VM {vm} made from scripts/sample_image.xml on the cheapest plant, configured it with one more action,")
    print("found it by a query (another user could not see it) and collected it.")
    print(f"Everything took {time.monotonic() - started:.1f} s; nothing is left running "
          f"({len(leftovers)} stray processes had to be killed). Logs: var/demo/")
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
