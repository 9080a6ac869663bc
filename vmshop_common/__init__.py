"""Code shared by the VMShop server and the VMPlant servers.

The shop and the plant never import each other; what they share lives here:
the VM description language (the DAG model, its XML form and its rules),
the one hardened XML loader, step identity, matching and cost, and the
project's errors, each with the stable code that becomes a SOAP fault code.
"""

__version__ = "0.1.0"
