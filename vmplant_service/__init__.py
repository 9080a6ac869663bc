"""The VMPlant server: makes real VMs on one host.

The plant never imports the shop package: they share only the SOAP
contract (``wsdl/``) and :mod:`vmshop_common`.
"""
