"""evalstream: streaming evaluation of many-class classifiers.

Layout: ``evalstream.v1`` holds the stubs generated from ``proto/`` (the
contract); ``evalstream.service`` (the ``service/`` folder) is the server, whose
``engine`` subpackage is the pure metric library; ``evalstream.client`` (the
``client/`` folder) is what training jobs import.
"""

__version__ = "0.1.0"
