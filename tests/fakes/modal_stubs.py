"""Stand-ins for the Modal objects `modal_app.ModalJobs` uses (a Dict, function calls), for
tests without a Modal account: each method is callable, and has `.aio`, as Modal's are."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable
from typing import Any

import modal.exception


class Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.fn, *args, **kwargs)


class FakeDict:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        lock = threading.Lock()

        def get(key: str, default: Any = None) -> Any:
            with lock:
                return self.data.get(key, default)

        def put(key: str, value: Any) -> bool:
            with lock:
                self.data[key] = value
            return True

        self.get, self.put = Method(get), Method(put)


class FakeCall:
    """A function call whose outcome is `outcome` (a value, or an exception raised by `get`),
    or, for `FakeCall.running`, a future's."""

    def __init__(self, outcome: Any = None, call_id: str | None = None,
                 future: concurrent.futures.Future[Any] | None = None) -> None:
        self.object_id = call_id or f"fc-{uuid.uuid4().hex}"
        self.cancelled = False

        def get(timeout: float | None = None) -> Any:
            if future is not None:
                try:
                    return future.result(timeout)
                except concurrent.futures.TimeoutError:
                    raise TimeoutError from None
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        def cancel() -> None:
            self.cancelled = True

        self.get, self.cancel = Method(get), Method(cancel)


class FakeCalls(dict[str, FakeCall]):
    """Known calls by id; `from_id` stands in for `modal.FunctionCall.from_id`."""

    def from_id(self, call_id: str) -> FakeCall:
        if call_id not in self:
            raise modal.exception.NotFoundError(f"no function call {call_id}")
        return self[call_id]

    def add(self, call: FakeCall) -> FakeCall:
        self[call.object_id] = call
        return call
