"""Micro-batching of identify calls: concurrent requests share one forward pass.

Requests wait at most ``max_wait_ms`` for company; a batch runs in a worker thread so the event
loop keeps accepting requests meanwhile. On a CPU batching gains little; on a GPU it is large.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from app.metrics import BATCH_FACES, BATCH_REQUESTS, BATCH_SECONDS
from facegrad.recognition.gallery import Candidates
from facegrad.recognition.inference import LoadedModel


class Batcher:
    def __init__(self, max_wait_ms: float = 2.0, max_batch: int = 64):
        self.max_wait = max_wait_ms / 1000
        self.max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def embed(self, model: LoadedModel, crops: np.ndarray,
                    top_k: int = 5) -> tuple[torch.Tensor, Candidates, list[str]]:
        """(embeddings, each face's ``top_k`` best identities, the gallery's identities): see
        :meth:`LoadedModel.embed_and_score`; the gallery search runs in the batch's worker
        thread too, one index search for the batch (at the largest ``top_k`` asked), and off
        the event loop."""
        if self._queue is None:  # not started (e.g. used outside the app's lifespan)
            return await asyncio.to_thread(model.embed_and_score, crops, top_k)
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((model, crops, fut, top_k))
        return await fut

    def _drain(self, batch: list, size: int) -> int:
        """Move what is already queued into ``batch`` (up to ``max_batch`` faces), no waiting."""
        while size < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            batch.append(item)
            size += len(item[1])
        return size

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            # everything queued while the previous batch ran joins at once: waiting for each
            # item in turn let the event loop's other work (parsing the next requests) eat the
            # wait, and under load batches stayed at 1-2 faces
            batch = [first]
            size = self._drain(batch, len(first[1]))
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                size = self._drain(batch, size + len(item[1]))
            by_model: dict[int, list] = {}
            for item in batch:
                by_model.setdefault(id(item[0]), []).append(item)
            for items in by_model.values():
                await self._embed_group(items)

    @staticmethod
    async def _embed_group(items) -> None:
        model = items[0][0]
        try:
            crops = np.concatenate([c for _, c, _, _ in items])
            BATCH_FACES.observe(len(crops))
            BATCH_REQUESTS.observe(len(items))
            t0 = time.perf_counter()
            emb, sims, labels = await asyncio.to_thread(model.embed_and_score, crops,
                                                        max(k for *_, k in items))
            BATCH_SECONDS.observe(time.perf_counter() - t0)
        except Exception as e:
            for *_, fut, _ in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        i = 0
        for _, crops, fut, _ in items:
            if not fut.done():
                fut.set_result((emb[i:i + len(crops)], sims[i:i + len(crops)], labels))
            i += len(crops)
