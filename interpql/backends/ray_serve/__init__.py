"""Backends as Ray Serve deployments.

    protocol.py    the values that cross between GraphQL servers and replicas (no ray import)
    merging.py     several callers' requests as one forward pass, and its result split back
    deployment.py  the Serve deployment (`@serve.batch`) and `deploy`/`delete` of the app
    client.py      `RayBackend`: the Backend protocol over a DeploymentHandle, and `connect`

Only `deployment.py` and `client.py` import ray (the `interpql[ray]` extra).
"""

from interpql.backends.ray_serve.protocol import (
    DEFAULT_APP,
    Description,
    PassRecord,
    RemoteCall,
    ReplicaStats,
    ServedModel,
)

__all__ = [
    "DEFAULT_APP",
    "Description",
    "PassRecord",
    "RemoteCall",
    "ReplicaStats",
    "ServedModel",
]
