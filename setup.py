"""VMShop: virtual machines for Grid computing, built on the plant that makes them cheapest."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
#: The published contracts: top-level folders in git (where the design card puts them), package data of
#: vmshop_common in a build (vmshop_common/published/<folder>), found through importlib.resources
#: (vmshop_common/contracts.py). Each file is in git once: the build copies it.
CONTRACTS = {"wsdl": "*.wsdl", "xsd": "*.xsd"}


class BuildWithContracts(build_py):
    """``build_py`` that also copies ``wsdl/`` and ``xsd/`` into the built ``vmshop_common/published/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's own folders (contracts.py falls back to them)
        for folder, pattern in CONTRACTS.items():
            source = HERE / folder
            files = sorted(source.glob(pattern))
            if not files:
                raise SystemExit(f"setup.py: no {pattern} in {source}: the package would ship without its contracts")
            target = Path(self.build_lib) / "vmshop_common" / "published" / folder
            target.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copyfile(path, target / path.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if getattr(self, "editable_mode", False):
            return outputs
        for folder, pattern in CONTRACTS.items():
            outputs += [str(Path(self.build_lib) / "vmshop_common" / "published" / folder / path.name)
                        for path in sorted((HERE / folder).glob(pattern))]
        return outputs


setup(
    name="vmshop",
    version="0.1.0",
    description="VMShop/VMPlant: a virtual machine shop for Grid computing (SOAP, QEMU)",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["vmshop_common", "vmshop_common.*", "vmshop_service", "vmshop_service.*",
                                    "vmplant_service", "vmplant_service.*"]),
    # Pinned: spyne 2.14.0 is its last release and needs exactly this stack (see README, "Stack").
    install_requires=[
        "spyne==2.14.0",
        "Twisted==26.10.0",
        "constantly==23.10.4",
        "zeep==4.3.3",
        "lxml==6.1.3",
        # TLS: Twisted's TLS needs pyOpenSSL and service-identity (Twisted[tls]); certificates, keys and
        # the site CA (vmshop-ca) use cryptography.
        "pyOpenSSL==26.4.0",
        "service-identity==26.1.0",
        "cryptography==50.0.2",
        # Metrics in the Prometheus text format at /metrics (vmshop_common/metrics.py).
        "prometheus-client==0.26.0",
        # cloud-init NoCloud seeds (ISO 9660 images) written in the plant's process (vmplant_service/seed.py).
        "pycdlib==1.22.0",
        # The registry on PostgreSQL (several shops sharing it); the binary build carries its own libpq.
        "psycopg[binary]==3.3.9",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-timeout==2.4.0",
            "hypothesis==6.170.15",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "suds-community==1.2.0",
            # tests/test_packaging.py builds the wheel with it.
            "build==1.6.1",
        ],
    },
    cmdclass={"build_py": BuildWithContracts},
    # The configuration writers, installed into the environment's bin/ (an installed site has no checkout).
    scripts=["scripts/configure_vmshop.py", "scripts/configure_vmplant.py"],
    entry_points={
        "console_scripts": [
            "vmshop=vmshop_service.cli:main",
            "vmplant=vmplant_service.main:main",
            "vmshop-server=vmshop_service.main:main",
            "vmshop-ca=vmshop_common.pki:main",
        ],
    },
)
