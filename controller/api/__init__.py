"""The gRPC contract of the controller, as Python.

- ``proto/passivisor/v1/controller.proto`` is the contract; ``constraints.proto``
  declares the field rules every request carries.
- ``controller.api.gen`` holds the stubs generated from them (committed;
  ``python -m controller.api.generate`` rewrites them, a test fails when stale).
- ``controller.api.constraints`` reads the rules from the descriptors and checks
  a request against them.  It imports protobuf only, never grpc.
"""
