"""Stand-ins for outside services, shipped for tests and trials (as prefect.testing ships Prefect's harness).

`LocalEndpoint` speaks the SageMaker runtime protocol around a real model on 127.0.0.1; it backs
`shapline endpoint serve`. Nothing in shapline's pipeline imports this package.
"""

from __future__ import annotations

from shapline.testing.endpoint import EndpointModel, EndpointServer, serve

LocalEndpoint = EndpointServer

__all__ = ["EndpointModel", "EndpointServer", "LocalEndpoint", "serve"]
