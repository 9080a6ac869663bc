#!/usr/bin/env bash
# Build the gSOAP C client into OUT_DIR from the checked-in WSDL:
#   wsdl2h (WSDL -> annotated C header) -> soapcpp2 (header -> stubs) -> gcc.
# Needs Debian's gsoap, libgsoap-dev, libssl-dev, zlib1g-dev and gcc (scripts/setup_host.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OUT=${1:?usage: build.sh OUT_DIR}
mkdir -p "$OUT"
cd "$OUT"
wsdl2h -c -x -t "$HERE/typemap.dat" -o vmshop.h "$ROOT/wsdl/vmshop.wsdl" >wsdl2h.log 2>&1 || { cat wsdl2h.log; exit 1; }
# -1: SOAP 1.1, as the WSDL's binding says. wsdl2h 2.8.124 marks the service SOAP 1.2 ('#import "soap12.h"')
# only because the WSDL's root declares xmlns:wsdlsoap12 (Spyne writes it; no binding uses it), and the
# shop, SOAP 1.1 only, answers every SOAP 1.2 envelope with SOAP 1.1's VersionMismatch fault.
soapcpp2 -1 -c -C -L -x -I/usr/share/gsoap/import vmshop.h >soapcpp2.log 2>&1 || { cat soapcpp2.log; exit 1; }
# shellcheck disable=SC2046
gcc -O0 -Wall -o vmshop_client -I. "$HERE/vmshop_client.c" soapC.c soapClient.c \
    $(pkg-config --cflags --libs gsoapssl) -lssl -lcrypto
