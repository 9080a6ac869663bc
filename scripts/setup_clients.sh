#!/usr/bin/env bash
# Set up the toolkits of the clients in other languages that the tests build from
# wsdl/vmshop.wsdl (tests/clients/, tests/test_generated_clients.py), on a fresh Debian 12
# machine, idempotently (re-running only does what is missing, in well under a second):
#
# - gSOAP (C): gsoap (wsdl2h, soapcpp2), libgsoap-dev (stdsoap2.h, -lgsoapssl), and what its
#   TLS build compiles against (libssl-dev, zlib1g-dev), with gcc and pkg-config.
# - JAX-WS (Java): libjaxws-java (JAX-WS RI 2.3: wsimport in jaxws-tools.jar, the runtime in
#   jaxws-rt.jar) and a JDK (javac; it does not depend on one).
# - Node.js: node and npm (Debian's nodejs/npm only where there are none: this kind of machine
#   has Node 20 with its own npm, which Debian's npm package would conflict with), then the
#   npm packages pinned in tests/clients/node/package-lock.json (the soap package) into
#   tests/clients/node/node_modules with 'npm ci'.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gsoap libgsoap-dev libssl-dev zlib1g-dev gcc libc6-dev pkg-config libjaxws-java)
command -v javac >/dev/null || APT_PACKAGES+=(openjdk-17-jdk-headless)
command -v node >/dev/null || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null || APT_PACKAGES+=(npm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup_clients: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

NODE_DIR=tests/clients/node
stamp=$NODE_DIR/node_modules/.vmshop-installed
if [[ ! -f $stamp || $NODE_DIR/package-lock.json -nt $stamp ]]; then
  echo "setup_clients: installing the npm packages of $NODE_DIR (npm ci)"
  npm ci --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error >/dev/null
  touch "$stamp"
fi
