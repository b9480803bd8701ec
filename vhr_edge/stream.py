"""Session.stream's iterator: a caption on a worker thread, its text pieces handed over as the
engine makes them (the engine's on_token), cancelled at the next token when the reader stops."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional

class _StreamState:
    """What the worker thread of a CaptionStream shares with it (the worker holds no reference
    to the stream itself, so dropping the stream can cancel the caption)."""

    END = object()

    def __init__(self):
        self.pieces: "queue.Queue" = queue.Queue()
        self.cancel = threading.Event()
        self.result: Optional[Any] = None  # the CaptionResult
        self.error: Optional[BaseException] = None

    def on_token(self, token: int, piece: str) -> bool:
        if piece:
            self.pieces.put(piece)
        return not self.cancel.is_set()

    def work(self, session: Any, image: Any, prompt: str, kwargs: dict) -> None:
        try:
            self.result = session.caption(image, prompt, on_token=self.on_token, **kwargs)
        except BaseException as e:  # raised to the reader
            self.error = e
        finally:
            self.pieces.put(self.END)


class CaptionStream:
    """Session.stream's iterator of text pieces; .result is the CaptionResult once it ended."""

    def __init__(self, session: Any, image: Any, prompt: str, kwargs: dict):
        self._state = _StreamState()
        self._ended = False
        self._thread = threading.Thread(target=self._state.work, args=(session, image, prompt, kwargs),
                                        name="vhr-edge-stream", daemon=True)
        self._thread.start()

    @property
    def result(self) -> Optional[Any]:
        """The CaptionResult, once the iteration ended (or after close()); None if it failed."""
        return self._state.result

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        item = self._state.pieces.get()
        if item is _StreamState.END:
            self._finish()
            raise StopIteration
        return item

    def _finish(self) -> None:
        self._ended = True
        self._thread.join()
        err, self._state.error = self._state.error, None
        if err is not None:
            raise err

    def close(self) -> None:
        """Stop the caption at the next token (if it still runs) and wait for it to end. An
        error the iteration has not raised yet (a bad image, a bad option) is raised here, so a
        stream that is never iterated does not lose it."""
        if not self._ended:
            self._state.cancel.set()
            self._finish()

    def __enter__(self) -> "CaptionStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the with block's own exception wins over the caption's
            self.close()
        except Exception:
            pass

    def __del__(self) -> None:
        self._state.cancel.set()  # a dropped stream stops its caption at the next token
