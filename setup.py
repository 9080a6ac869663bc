"""VMShop: virtual machines for Grid computing, built on the plant that makes them cheapest."""

from setuptools import find_packages, setup

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
        ],
    },
    entry_points={
        "console_scripts": [
            "vmshop=vmshop_service.cli:main",
            "vmplant=vmplant_service.main:main",
            "vmshop-server=vmshop_service.main:main",
            "vmshop-ca=vmshop_common.pki:main",
        ],
    },
)
