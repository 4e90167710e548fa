"""The `retd.v1.ModelRepository` admin service: list, load and unload model versions."""

from __future__ import annotations

import grpc

from retd.server.calls import rpc
from retd.server.errors import invalid
from retd.server.repository import ModelRegistry
from retd.server.versions import ModelVersion, State, VersionStatus
from retd.v1 import repository_pb2 as pb
from retd.v1 import repository_pb2_grpc as pb_grpc

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["ModelRepository"].full_name
STATES = {
    State.AVAILABLE: pb.MODEL_STATE_AVAILABLE,
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.UNLOADING: pb.MODEL_STATE_UNLOADING,
    State.FAILED: pb.MODEL_STATE_FAILED,
}


def version_status(row: VersionStatus) -> pb.ModelVersionStatus:
    return pb.ModelVersionStatus(
        name=row.name,
        version=row.version,
        state=STATES[row.state],
        reason=row.reason,
        kind=row.kind,
        path=str(row.path),
        serving=row.serving,
        active_calls=row.active_calls,
    )


class RepositoryService(pb_grpc.ModelRepositoryServicer):
    service_name = ADMIN_SERVICE

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def _status_of(self, entry: ModelVersion) -> pb.ModelVersionStatus:
        rows = [r for r in self.models.status(entry.name) if r.version == entry.version]
        return version_status(rows[0]) if rows else pb.ModelVersionStatus(name=entry.name)

    def _model_name(self, model: str) -> str:
        if not model:
            known = sorted({row.name for row in self.models.status()})
            raise invalid(f"model: empty; expected a model name, one of {known}")
        return model

    @rpc
    async def List(
        self, request: pb.RepositoryListRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryListResponse:
        repository = self.models.repository
        return pb.RepositoryListResponse(
            models=[version_status(row) for row in self.models.status(request.model)],
            repository=str(repository) if repository is not None else "",
            default_model=self.models.default_model,
        )

    @rpc
    async def Load(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        entry = await self.models.load(self._model_name(request.model), request.version)
        return pb.LoadModelResponse(status=self._status_of(entry))

    @rpc
    async def Unload(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        released = await self.models.unload(self._model_name(request.model), request.version)
        return pb.UnloadModelResponse(
            unloaded=[
                pb.ModelVersionStatus(
                    name=e.name,
                    version=e.version,
                    state=pb.MODEL_STATE_AVAILABLE,
                    kind=e.kind,
                    path=str(e.spec.checkpoint),
                )
                for e in released
            ]
        )
