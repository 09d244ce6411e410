"""POSIX shared memory regions that hold a run's tensors, registered with a Triton server on this host."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from meddpm.retry import Backoff

log = logging.getLogger(__name__)
# A control call (liveness, config, shared memory registration) on a server that is up answers within this even
# when the server and this host are busy (2 s was not enough under load); an absent server fails at once anyway.
CONTROL_TIMEOUT_S = 10.0
CLEANUP_WINDOW_S = 60.0  # how long to keep asking a busy server to unregister a region before leaving it registered


class SharedMemoryRegions:
    """One POSIX shared memory region per tensor, registered with Triton; closed means unregistered and unlinked."""

    def __init__(self, prefix: str, tensors: dict[str, tuple[tuple[int, ...], type]]):
        self.layout = {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in tensors.items()}
        self.names = {name: f"{prefix}_{name}" for name in tensors}
        self.handles = {}
        try:
            for name, (shape, dtype) in self.layout.items():
                self.handles[name] = shm.create_shared_memory_region(
                    self.names[name], "/" + self.names[name], int(np.prod(shape)) * dtype.itemsize, create_only=True
                )
        except BaseException:
            self.close(None)
            raise

    @classmethod
    def probe(cls, client: grpcclient.InferenceServerClient) -> str | None:
        """None if the server can map a region of ours, else why not."""
        regions = cls(f"meddpm_probe_{uuid.uuid4().hex[:12]}", {"probe": ((1,), np.float32)})
        try:
            regions.register(client)
            return None
        except InferenceServerException as error:
            return error.message()
        finally:
            regions.close(client)

    def byte_size(self, name: str, samples: int | None = None) -> int:
        """Bytes of `samples` samples of a tensor (default: the whole batch); also the offset of sample `samples`."""
        shape, dtype = self.layout[name]
        return (shape[0] if samples is None else samples) * int(np.prod(shape[1:])) * dtype.itemsize

    def write(self, name: str, array: np.ndarray) -> None:
        shm.set_shared_memory_region(self.handles[name], [np.ascontiguousarray(array, dtype=self.layout[name][1])])

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        shape, dtype = self.layout[name]
        view = shm.get_contents_as_numpy(self.handles[name], dtype, [count, *shape[1:]], self.byte_size(name, start))
        return view.copy()

    def attach(self, tensor: grpcclient.InferInput | grpcclient.InferRequestedOutput, start: int, count: int) -> None:
        name = tensor.name()
        tensor.set_shared_memory(self.names[name], self.byte_size(name, count), offset=self.byte_size(name, start))

    def register(self, client: grpcclient.InferenceServerClient) -> None:
        for name, region in self.names.items():
            with contextlib.suppress(InferenceServerException):  # stale registration of the same name
                client.unregister_system_shared_memory(region, client_timeout=CONTROL_TIMEOUT_S)
            client.register_system_shared_memory(
                region, "/" + region, self.byte_size(name), client_timeout=CONTROL_TIMEOUT_S
            )

    def registered(self, client: grpcclient.InferenceServerClient) -> bool:
        status = client.get_system_shared_memory_status(client_timeout=CONTROL_TIMEOUT_S).regions
        return all(region in status for region in self.names.values())

    def close(self, client: grpcclient.InferenceServerClient | None) -> None:
        """Unregister and unlink every region; safe to call twice."""
        for name, handle in list(self.handles.items()):
            if client is not None:
                unregister(client, self.names[name])
            shm.destroy_shared_memory_region(handle)
            del self.handles[name]


def unregister(client: grpcclient.InferenceServerClient, region: str) -> None:
    """Unregister a region, waiting (up to CLEANUP_WINDOW_S) for a server that is busy or still holds the region for
    a request it is finishing; a server that is gone has forgotten its registrations, and is not waited for."""
    pauses = Backoff(first_s=0.1, max_s=1.0, window_s=CLEANUP_WINDOW_S).pauses()
    while True:
        try:
            client.unregister_system_shared_memory(region, client_timeout=CONTROL_TIMEOUT_S)
            if region not in client.get_system_shared_memory_status(client_timeout=CONTROL_TIMEOUT_S).regions:
                return
        except InferenceServerException as error:
            if error.status() == "StatusCode.UNAVAILABLE":  # the server is gone
                return
        pause = next(pauses, None)
        if pause is None:
            log.warning(
                "Triton: shared memory region %s may still be registered (not unregistered within %.0f s); "
                "unregister it or restart the server",
                region,
                CLEANUP_WINDOW_S,
            )
            return
        time.sleep(pause)
