"""The VMShop server, its client library and the ``vmshop`` command.

The shop never imports the plant package: they share only the SOAP
contract (``wsdl/``) and :mod:`vmshop_common`.
"""
