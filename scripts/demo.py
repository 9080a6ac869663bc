#!/usr/bin/env python3
"""The main job, end to end: a plant and a shop on loopback, one VM made, configured, found and collected.

Run by ``scripts/demo.sh`` (which sets the machine up first). Every step is
a ``vmshop`` command, printed before it runs, so the output shows the CLI as
a user would type it. Nothing is left running afterwards; the servers' logs
and configuration stay in ``var/demo/`` for a look.
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


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def start(name: str, module: str, config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server on a free loopback port and wait (with a deadline) until it listens."""
    out = open(log, "wb")  # noqa: SIM115 - the server writes to it for its whole life
    process = subprocess.Popen([PYTHON, "-m", module, "--config", str(config), "--port", "0"],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(config.parent))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://127\.0\.0\.1:(\d+)/)", log.read_text(errors="replace"))
        if found:
            print(f"{name} listening on {found.group(1)} (log: {log.relative_to(ROOT)})", flush=True)
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{name} did not start:\n{log.read_text(errors='replace')}")


def vmshop(url: str, *args: str) -> None:
    """Run one ``vmshop`` command against the shop, echoing it; stop the demo if it fails."""
    print(f"\n$ vmshop {' '.join(shlex.quote(a) for a in args)}", flush=True)
    result = subprocess.run([VMSHOP, "--shop", url, *args], cwd=str(ROOT))
    if result.returncode != 0:
        raise SystemExit(f"vmshop {args[0]} failed with exit status {result.returncode}")


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
        banner("Configure and start a VMPlant (QEMU backend, host-only VDE segment, address pool)")
        subprocess.run([PYTHON, str(ROOT / "scripts" / "configure_vmplant.py"), "--yes", "--port", "0",
                        "--warehouse", str(warehouse), "--state-dir", str(work / "plant"), "--backend", "qemu",
                        "--network", "vde", "--datastore", str(work / "data"), "--shops-file",
                        str(work / "vmshop_addresses.txt"), "--output", str(work / "configuration_vmplant.xml")],
                       check=True, cwd=str(work))
        plant, plant_url = start("VMPlant", "vmplant_service.main", work / "configuration_vmplant.xml",
                                 work / "plant.log")
        servers.append(plant)

        banner("Configure and start a VMShop that uses that plant")
        plants_file = work / "vmplant_addresses.txt"
        plants_file.write_text(plant_url.removeprefix("http://").rstrip("/") + "\n")
        subprocess.run([PYTHON, str(ROOT / "scripts" / "configure_vmshop.py"), "--yes", "--port", "0",
                        "--database", str(work / "registry.sqlite3"), "--plants-file", str(plants_file),
                        "--output", str(work / "configuration_vmshop.xml")], check=True, cwd=str(work))
        shop, shop_url = start("VMShop", "vmshop_service.main", work / "configuration_vmshop.xml", work / "shop.log")
        servers.append(shop)
        # The plant tells the shops in its shop list of changes (it reads the list again at every change).
        shop_address = shop_url.removeprefix("http://").rstrip("/")
        shops_file = work / "vmshop_addresses.txt"
        shops_file.write_text(f"{shop_address}\n")
        print(f"wrote {shops_file.relative_to(ROOT)} ({shop_address}: the plant tells this shop of changes)")

        banner("The shop's plants")
        vmshop(shop_url, "plants")
        banner("Ask every plant for a bid (nothing is made)")
        vmshop(shop_url, "estimate", "--dag", "scripts/sample_image.xml")
        banner("Create the VM where it costs least: cloned, booted, configured inside the guest")
        vm = "vm-demo-" + os.urandom(3).hex()
        vmshop(shop_url, "create", "--dag", "scripts/sample_image.xml", "--owner", "demo", "--key", vm)
        banner("Configure it with one more action; its output comes back from inside the guest")
        (work / "more.xml").write_text(
            '<vm xmlns="urn:vmshop:dag:1"><nodes><image id="vm" name="tiny"/>'
            '<script id="hello">echo "hello from $(hostname), kernel $(uname -r)"; cat /tmp/wordcount.out</script>'
            '</nodes><edges><edge from="vm" to="hello"/></edges></vm>\n')
        vmshop(shop_url, "configure", vm, "--dag", str(work / "more.xml"))
        banner("Find it by a query over built-in and user attributes")
        vmshop(shop_url, "query", "state=running application=wordcount memory>=128")
        vmshop(shop_url, "show", vm)
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
    print(f"a VMPlant and a VMShop ran on 127.0.0.1; VM {vm} was made from scripts/sample_image.xml on the cheapest")
    print("plant, configured with one more action, found by a query and collected.")
    print(f"Everything took {time.monotonic() - started:.1f} s; nothing is left running "
          f"({len(leftovers)} stray processes had to be killed). Logs: var/demo/")
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
