#!/usr/bin/env bash
# Build the JAX-WS Java client into OUT_DIR from the checked-in WSDL:
#   wsimport (WSDL + bindings.xml -> Java sources) -> javac.
# Needs a JDK (17 here) and Debian's libjaxws-java (JAX-WS RI 2.3: jaxws-tools.jar holds wsimport);
# scripts/setup_host.sh installs both. Run the client with: java -cp OUT_DIR/classes:$JAXWS_RT VMShopClient ...
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OUT=${1:?usage: build.sh OUT_DIR}
JARS=/usr/share/java
rm -rf "$OUT/src" "$OUT/classes"
mkdir -p "$OUT/src" "$OUT/classes"
# -wsdllocation: the generated service reads the checked-in WSDL at run time, never a server's ?wsdl.
java -jar "$JARS/jaxws-tools.jar" -quiet -Xnocompile -encoding UTF-8 -b "$HERE/bindings.xml" \
    -wsdllocation "file:$ROOT/wsdl/vmshop.wsdl" -p org.vmshop.generated -s "$OUT/src" -d "$OUT/classes" \
    "$ROOT/wsdl/vmshop.wsdl"
javac -nowarn -encoding UTF-8 -d "$OUT/classes" -cp "$JARS/jaxws-api.jar:$JARS/jaxb-api.jar:$JARS/jaxws-rt.jar" \
    "$OUT"/src/org/vmshop/generated/*.java "$HERE/VMShopClient.java"
