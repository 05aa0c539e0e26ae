"""SpecPC in front of an OpenAI-compatible serving engine: the local draft compresses, the server answers.

Standard library HTTP only (`urllib.request`, `json`, server-sent events parsed by hand): importing this module loads
no HTTP or serving package.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import torch

from ..prompt.specpc import SpecPCOutput, SpecPCPreprocessor

PROMPT_FORMATS = ("auto", "ids", "text")
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_RESERVED_PARAMS = {"model", "prompt", "stream", "max_tokens"}
_NOTHING_LOST = "The compressed prompt and its stats are in `error.result` (nothing was lost)."
#: What an answer may weigh: this much, plus `response_bytes_per_token` for every token asked for (`max_tokens`).
_RESPONSE_BYTES_BASE = 1 << 20
#: What `json.loads` may meet in an answer: anything it raises on malformed, hostile or oversized input.
_DECODE_ERRORS = (ValueError, RecursionError, UnicodeDecodeError, TypeError, MemoryError)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: a 3xx answer becomes an `HTTPError`, so the key and headers never travel elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _ResponseTooSlow(Exception):
    """The answer did not come within the total deadline, or a stream made no progress for `timeout` seconds."""


class _ResponseTooLarge(Exception):
    """The answer (or one line of a stream) is larger than the cap."""


class _Reader:
    """Reads an HTTP response with a total deadline and a size cap, a chunk at a time (a server that trickles one byte
    at a time cannot hold a read open past the deadline, and a huge answer is never buffered whole)."""

    def __init__(self, response, deadline: float, cap: int):
        self.response = response
        self.deadline = deadline  # time.monotonic() value
        self.cap = cap
        self.buffer = b""
        self.read_total = 0
        self.idle_deadline: float | None = None  # a stream: the next event must come before this

    def _chunk(self) -> bytes:
        now = time.monotonic()
        if now > self.deadline or (self.idle_deadline is not None and now > self.idle_deadline):
            raise _ResponseTooSlow()
        chunk = self.response.read1(65536) if hasattr(self.response, "read1") else self.response.read(65536)
        self.read_total += len(chunk)
        if self.read_total > self.cap:
            raise _ResponseTooLarge()
        return chunk

    def body(self) -> bytes:
        declared = self.response.headers.get("Content-Length") if hasattr(self.response, "headers") else None
        if declared is not None and declared.strip().isdigit() and int(declared) > self.cap:
            raise _ResponseTooLarge()
        parts = []
        while chunk := self._chunk():
            parts.append(chunk)
        return b"".join(parts)

    def lines(self):
        """The response's lines (bytes, without the line break); a line longer than the cap raises."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
                yield line.rstrip(b"\r")
                continue
            chunk = self._chunk()
            if not chunk:
                if self.buffer:
                    yield self.buffer
                return
            self.buffer += chunk


class ServingError(RuntimeError):
    """The serving engine could not be reached, was too slow, or answered with an error.

    The message says what happened and what to do. Nothing is lost: `result` holds the compressed prompt, exactly
    what was sent and the stats (and, for a stream that broke off, the text received so far).

    Attributes:
        result ([`SpecPCCompletion`]): the compression, what was sent and the stats; `result.text` is `None` when no
            answer came (or the text streamed before the failure).
        status (`int`, *optional*): the HTTP status the server answered, if it answered one.
        body (`str`, *optional*): the start of the server's error answer, if any.
    """

    def __init__(self, message: str, *, result: SpecPCCompletion, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.result = result
        self.status = status
        self.body = body


@dataclass
class SpecPCCompletion:
    """What [`SpecPCClient.complete`] returns (and what [`SpecPCStream.result`] holds once the stream is over).

    Attributes:
        text (`str`, *optional*): the generated text (`choices[0].text`); `None` if no answer came.
        response (`dict` or `list[dict]`, *optional*): the server's JSON answer, or for a stream the list of its
            events (parsed `data:` payloads, `[DONE]` excluded).
        compressed ([`SpecPCOutput`]): the local compression (kept ids, kept positions, draft tokens, scores).
        sent_prompt (`list[int]` or `str`): exactly the `prompt` field that was sent (the last one, after a fallback).
        stats (`dict`): plain numbers: `original_tokens`, `kept_tokens`, `compression_ratio`, `draft_seconds` (from
            [`SpecPCOutput.stats`], for the one prompt), `compress_seconds` (tokenizing, the draft and preparing the
            prompt), `request_seconds` (sending until the whole answer is in, fallback included), `prompt_format`
            (`"ids"` or `"text"`: what was sent), `sent_tokens` (ids sent; for text, the tokens the tokenizer makes
            of it), `text_roundtrip_exact` (for text: whether those tokens are exactly the kept ids; `None` for
            ids), `text_fallback_reason` (`"auto"`: the server's refusal of token ids; `None` if it took them),
            `server_prompt_tokens` and `completion_tokens` (the server's `usage`; `None` when it reports none, as
            most servers do for streams unless asked with `stream_options={"include_usage": True}`), and for a
            stream `first_chunk_seconds` and `stream_complete`.
    """

    text: str | None
    response: dict | list | None
    compressed: SpecPCOutput
    sent_prompt: list | str | None
    stats: dict = field(default_factory=dict)


class SpecPCStream:
    """An answer streamed by the server: iterate it for the text chunks, in the order the server sent them.

    The compression and the request happen when [`SpecPCClient.complete`] is called, so a server that is down or
    refuses the request raises [`ServingError`] there; a stream that breaks off or stalls raises it while iterating.
    Once the stream is exhausted (or closed), `result` is a [`SpecPCCompletion`] with the whole text, the events and
    the stats. Use it as a context manager (or call `close`) to drop the connection early. Returned by
    [`SpecPCClient.complete`] with `stream=True`; not built directly.

    Attributes:
        compressed ([`SpecPCOutput`]): the local compression, available before the first chunk.
    """

    def __init__(self, client: SpecPCClient, result: SpecPCCompletion, response, started: float, reader: _Reader,
                 max_tokens: int):
        self.compressed = result.compressed
        self._client = client
        self._result = result
        self._response = response
        self._reader = reader
        self._max_tokens = max_tokens
        self._started = started
        self._chunks: list[str] = []
        self._done = False
        self._iterator = self._events()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        return next(self._iterator)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def result(self) -> SpecPCCompletion:
        """The [`SpecPCCompletion`]; available once the stream is exhausted or closed."""
        if not self._done:
            raise RuntimeError(
                "The stream is still open: iterate it to the end (or call `.close()`) before reading `.result`; "
                "`.compressed` is available now."
            )
        return self._result

    def close(self) -> None:
        """Closes the connection; the text received so far stays in `result` (`stats["stream_complete"]` is False
        unless the server had finished)."""
        if not self._done:
            self._finish(complete=False)

    def _finish(self, complete: bool) -> None:
        self._done = True
        self._result.text = "".join(self._chunks)
        self._result.stats["request_seconds"] = time.perf_counter() - self._started
        self._result.stats["stream_complete"] = complete
        try:
            self._response.close()
        except OSError:
            pass

    def _events(self):
        result, stats = self._result, self._result.stats
        events = result.response
        finished = False  # the server said so: `[DONE]` or a `finish_reason`
        client = self._client
        try:
            for data in _sse_data(self._reader, client.timeout):
                if data.strip() == "[DONE]":
                    finished = True
                    break
                try:
                    event = json.loads(data)
                except _DECODE_ERRORS:
                    raise client._error(
                        f"The server sent a stream event that is not JSON ({data[:200]!r}); it does not speak the "
                        "OpenAI completions protocol at this URL. Check `base_url`.", result) from None
                events.append(event)
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    raise client._error(
                        f"The server reported an error in the middle of the stream: {_error_text(event)}. Check the "
                        "server's log; the text streamed so far is in `error.result.text`.", result)
                _record_usage(stats, event)
                choice = _first_choice(event.get("choices"))
                if choice is _MALFORMED:
                    raise client._error(
                        f"The server sent a stream event whose `choices` is not a list of objects "
                        f"({repr(event.get('choices'))[:200]}); it does not speak the OpenAI completions protocol "
                        "at this URL. Check `base_url`.", result)
                chunk = choice.get("text") if choice else None
                if chunk is not None and not isinstance(chunk, str):
                    raise client._error(
                        f"The server sent a stream event whose text is not a string ({chunk!r:.200}). Check "
                        "`base_url`.", result)
                finished = finished or bool(choice and choice.get("finish_reason"))
                if chunk:
                    if not self._chunks:
                        stats["first_chunk_seconds"] = time.perf_counter() - self._started
                    self._chunks.append(chunk)
                    yield chunk
        except ServingError:
            self._finish(complete=False)
            raise
        except _ResponseTooSlow:
            self._finish(complete=False)
            raise client._error(
                f"The stream from {client.url} sent no event for {client.timeout:g} s (keep-alive comments and "
                f"partial lines are not progress), or went past the total deadline ({client.deadline:g} s): it "
                "stopped sending in the middle of the stream. Raise `timeout=` or `deadline=` if the server is only "
                "slow.", result) from None
        except _ResponseTooLarge:
            self._finish(complete=False)
            raise client._error(
                f"The stream from {client.url} sent more than {self._reader.cap} bytes for at most "
                f"{self._max_tokens} tokens (or one line that long); it was cut there. Raise "
                "`response_bytes_per_token=` if the server is right to send that much.", result) from None
        except _DECODE_ERRORS as error:
            self._finish(complete=False)
            raise client._error(
                f"The stream from {client.url} sent something that cannot be read as server-sent events "
                f"({type(error).__name__}: {str(error)[:200]}). Check `base_url`.", result) from None
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            self._finish(complete=False)
            raise client._transport_error(error, result, during_stream=True) from error
        if not finished:
            self._finish(complete=False)
            raise client._error(
                f"The stream from {client.url} ended before the server said the answer was finished (no "
                "`finish_reason`, no `[DONE]`): it may have crashed or dropped the connection. Check its log; the text "
                "streamed so far is in `error.result.text`.", result)
        self._finish(complete=True)


class SpecPCClient:
    """Compresses each prompt with SpecPC on the local draft, then sends the shorter prompt to an OpenAI-compatible
    `/v1/completions` endpoint (vLLM, SGLang, `transformers serve`, ...) and returns the answer with the stats.

    What is sent (`prompt_format`):

    * `"ids"`: the kept token ids, `"prompt": [id, ...]`: exactly what SpecPC kept, no re-tokenization. vLLM and
      SGLang accept this; the server's tokenizer must be the draft's (SpecPC already needs the target's).
    * `"text"`: the kept tokens decoded with `tokenizer` (special tokens kept; a leading BOS that the tokenizer adds
      by itself is dropped, since the server adds it again). The server tokenizes the text again, which may not give
      exactly the kept ids (`stats["text_roundtrip_exact"]` says whether it does with `tokenizer`). For servers that
      take strings only, such as `transformers serve`.
    * `"auto"` (default): ids first; if the server answers HTTP 400 or 422 and a `tokenizer` is available, the same
      request is sent once more as text. If that succeeds, the refusal is kept in `stats["text_fallback_reason"]` and
      this client sends text from then on; if it fails too, [`ServingError`] reports both answers.

    Only the completions endpoint is used (no chat template is applied): for a chat model, pass the templated string
    (`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`) or its ids, and give the
    template's special tokens to the preprocessor's `protected_token_ids` if they must survive.

    Args:
        preprocessor ([`SpecPCPreprocessor`]): the compressor (its draft runs here, on this machine); a method that
            keeps original position ids (SpecPrefill) cannot be used, since a server renumbers positions.
        base_url (`str`): the server's OpenAI API root, e.g. `"http://127.0.0.1:8000/v1"`; requests go to
            `base_url + "/completions"`.
        model (`str`): the model name the server serves (the `model` field of each request).
        tokenizer (`PreTrainedTokenizerBase`, *optional*, defaults to the preprocessor's `tokenizer`): needed for
            string prompts and for sending text.
        prompt_format (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"ids"` or `"text"` (see above).
        timeout (`float`, *optional*, defaults to `60.0`): seconds to wait for the connection and for the answer
            to start, and, for a stream, between two events (keep-alive comments and partial lines are not
            progress); past it, [`ServingError`].
        deadline (`float`, *optional*, defaults to `600.0`): seconds a whole request may take, answer included (a
            server trickling bytes cannot hold it open longer); past it, [`ServingError`].
        response_bytes_per_token (`int`, *optional*, defaults to `16384`): an answer (or one line of a stream) may
            weigh 1 MiB plus this many bytes per token of `max_tokens`; a larger one is not read, and
            [`ServingError`] says so.
        api_key (`str`, *optional*): sent as `Authorization: Bearer <api_key>`.
        headers (`dict[str, str]`, *optional*): more HTTP headers for every request.

    Redirects are never followed (the key and headers are never sent to another address): a 3xx answer is a
    [`ServingError`] naming where the server pointed.

    Raises:
        ValueError: for an unknown `prompt_format`, a `base_url` that is not `http(s)://...` (or holds credentials,
            a query or a fragment), a non-positive `timeout` or `deadline`, an `api_key` or header with line breaks
            or control characters, `prompt_format="text"` without a tokenizer, or a preprocessor that keeps
            original positions.
        TypeError: if `preprocessor` is not a [`SpecPCPreprocessor`].

    Example:

    ```python
    >>> from hf_specapprox import SpecPCClient, SpecPCPreprocessor, ServingError
    >>> specpc = SpecPCPreprocessor(draft=draft, max_capacity_prompt=1024)
    >>> client = SpecPCClient(specpc, "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct", tokenizer=tokenizer,
    ...                       prompt_format="ids")
    >>> answer = client.complete(long_prompt, max_tokens=64, temperature=0.0)
    >>> answer.text, answer.stats["kept_tokens"], answer.stats["request_seconds"]
    >>> for chunk in (stream := client.complete(long_prompt, max_tokens=64, stream=True)):
    ...     print(chunk, end="")
    >>> stream.result.stats
    ```
    """

    def __init__(self, preprocessor: SpecPCPreprocessor, base_url: str, model: str, *, tokenizer=None,
                 prompt_format: str = "auto", timeout: float = 60.0, deadline: float = 600.0,
                 api_key: str | None = None, headers: dict | None = None, response_bytes_per_token: int = 16384):
        if not isinstance(preprocessor, SpecPCPreprocessor):
            raise TypeError(
                f"`preprocessor` must be a SpecPCPreprocessor (or one of its baselines), got {type(preprocessor).__name__}."
            )
        if getattr(preprocessor, "keep_original_positions", False):
            raise ValueError(
                f"{type(preprocessor).__name__} gives the target the kept tokens' original positions, which a serving "
                "engine cannot receive (it numbers the prompt it gets from 0). Pass `keep_original_positions=False` "
                "or use SpecPCPreprocessor."
            )
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"`prompt_format` must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
        parsed = urllib.parse.urlsplit(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"`base_url` must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}."
            )
        if parsed.username is not None or parsed.password is not None:
            raise ValueError(
                "`base_url` holds credentials (`user:password@`); they would be sent in clear in every URL. Remove "
                "them and pass the key as `api_key=` (sent as `Authorization: Bearer ...`)."
            )
        if parsed.query or parsed.fragment:
            raise ValueError(
                f"`base_url` must be the API root without a query or fragment (`?...`, `#...`), got {base_url!r}: "
                "requests go to `base_url + '/completions'`. Pass headers as `headers=` and keys as `api_key=`."
            )
        for name, value in (("timeout", timeout), ("deadline", deadline)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"`{name}` must be a positive, finite number of seconds, got {value!r}.")
        if isinstance(response_bytes_per_token, bool) or not isinstance(response_bytes_per_token, int) \
                or response_bytes_per_token < 1:
            raise ValueError(f"`response_bytes_per_token` must be a positive int, got {response_bytes_per_token!r}.")
        for name, value in [("api_key", api_key), *((f"headers[{key!r}]", item) for key, item in
                                                    (headers or {}).items())]:
            if value is not None and (not isinstance(value, str) or any(ord(char) < 32 or ord(char) == 127
                                                                       for char in value)):
                raise ValueError(
                    f"`{name}` must be a string without line breaks or control characters (they would split the "
                    "HTTP header); check for a trailing newline read from a file."
                )
        for key in headers or {}:
            if not isinstance(key, str) or not key or any(not (32 < ord(char) < 127) or char == ":" for char in key):
                raise ValueError(f"Header names must be plain tokens, got {key!r}.")
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(preprocessor, "tokenizer", None)
        if prompt_format == "text" and self.tokenizer is None:
            raise ValueError("`prompt_format='text'` decodes the kept ids: pass `tokenizer=` (the draft's).")
        self.base_url = str(base_url).rstrip("/")
        self.url = self.base_url + "/completions"
        self.model = model
        self.prompt_format = prompt_format
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        self.response_bytes_per_token = response_bytes_per_token
        self.headers = {"Content-Type": "application/json", "User-Agent": "hf_specapprox"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.headers.update(headers or {})
        # Loopback servers are reached directly, whatever proxy the environment names; others as urllib would.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK_HOSTS else []
        self._opener = urllib.request.build_opener(*handlers, _NoRedirects())
        self._ids_refused: str | None = None  # "auto": the server's refusal of ids, once seen

    def complete(self, prompt, *, max_tokens: int, stream: bool = False, protected_mask=None, **params):
        """Compresses `prompt` with the draft, sends it, and returns the answer with the stats.

        Args:
            prompt (`str`, `list[int]` or `torch.LongTensor`): one prompt, as text (needs `tokenizer`) or token ids
                (a list, a 1-D tensor or a `(1, length)` tensor).
            max_tokens (`int`): the most tokens the server may generate.
            stream (`bool`, *optional*, defaults to `False`): stream the answer; then a [`SpecPCStream`] is returned.
            protected_mask (`torch.BoolTensor` of shape `(1, length)`, *optional*): prompt positions never dropped.
            **params: more fields of the completions request (`temperature`, `top_p`, `stop`, `seed`, ...), sent
                as given.

        Returns:
            [`SpecPCCompletion`], or with `stream=True` a [`SpecPCStream`] of text chunks whose `result` is the
            [`SpecPCCompletion`] once it is exhausted.

        Raises:
            ServingError: the server is down, timed out or answered an HTTP error (or, for a stream, broke off);
                `error.result` holds the compressed prompt and the stats.
            ValueError: before any work, for a string prompt without a tokenizer, a batch of prompts, or `params`
                that name `model`, `prompt`, `stream` or `max_tokens`; and SpecPC's own refusals (empty prompt,
                ids the draft cannot embed, ...).
            TypeError: before any work, for `params` that are not JSON values.
        """
        reserved = sorted(_RESERVED_PARAMS & set(params))
        if reserved:
            raise ValueError(
                f"{reserved} are set by the client; pass `max_tokens=` and `stream=` as arguments (the model and the "
                "prompt come from the client and the compression)."
            )
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"`max_tokens` must be a positive int, got {max_tokens!r}.")
        try:
            json.dumps(params)
        except (TypeError, ValueError) as error:
            raise TypeError(f"The request fields must be JSON values (numbers, strings, lists, dicts): {error}") from None
        try:
            json.dumps(params, allow_nan=False)
        except ValueError:
            raise ValueError(
                f"The request fields hold a NaN or an infinity ({params!r:.200}), which JSON cannot carry (a server "
                "would refuse the bare `NaN`). Give finite numbers."
            ) from None
        start = time.perf_counter()
        input_ids = self._prompt_ids(prompt)
        compressed = self.preprocessor(input_ids, torch.ones_like(input_ids), protected_mask=protected_mask)
        if compressed.position_ids is not None:
            raise ValueError(
                f"{type(self.preprocessor).__name__} keeps the kept tokens' original positions, which a serving engine "
                "cannot receive (it renumbers them). Use SpecPCPreprocessor."
            )
        kept_ids = compressed.input_ids[0][compressed.attention_mask[0].bool()].tolist()
        base_stats = compressed.stats
        stats = {name: values[0] if isinstance(values, list) else values for name, values in base_stats.items()}
        stats.update(compress_seconds=None, request_seconds=None, text_fallback_reason=None,
                     server_prompt_tokens=None, completion_tokens=None)
        result = SpecPCCompletion(text=None, response=None, compressed=compressed, sent_prompt=None, stats=stats)
        prompt_format = "text" if self.prompt_format == "text" or self._ids_refused else "ids"
        self._prepare(result, kept_ids, prompt_format)
        if prompt_format == "text" and self._ids_refused:
            stats["text_fallback_reason"] = self._ids_refused
        stats["compress_seconds"] = time.perf_counter() - start

        payload = {"model": self.model, "max_tokens": max_tokens, **params, "stream": bool(stream)}
        started = time.perf_counter()
        deadline = time.monotonic() + self.deadline
        response = self._send(payload, result, kept_ids, stream)
        reader = _Reader(response, deadline, _RESPONSE_BYTES_BASE + self.response_bytes_per_token * max_tokens)
        if stream:
            result.response = []
            return SpecPCStream(self, result, response, started, reader, max_tokens)
        try:
            with response:
                raw = reader.body()
        except _ResponseTooSlow:
            stats["request_seconds"] = time.perf_counter() - started
            raise self._error(
                f"The answer from {self.url} did not arrive within the total deadline ({self.deadline:g} s): the "
                "server sends it too slowly. Raise `deadline=` if it is only slow.", result) from None
        except _ResponseTooLarge:
            stats["request_seconds"] = time.perf_counter() - started
            raise self._error(
                f"The answer from {self.url} is larger than {reader.cap} bytes for at most {max_tokens} tokens; it "
                "was not read. Raise `response_bytes_per_token=` if the server is right to send that much.",
                result) from None
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            stats["request_seconds"] = time.perf_counter() - started
            raise self._transport_error(error, result) from error
        stats["request_seconds"] = time.perf_counter() - started
        try:
            answer = json.loads(raw)
        except _DECODE_ERRORS as error:
            raise self._error(
                f"The server's answer is not JSON ({raw[:200]!r}; {type(error).__name__}); it does not speak the "
                f"OpenAI completions protocol at {self.url}. Check `base_url`.", result) from None
        result.response = answer
        choice = _first_choice(answer.get("choices")) if isinstance(answer, dict) else _MALFORMED
        if choice is None or choice is _MALFORMED or not isinstance(choice.get("text"), str):
            detail = _error_text(answer) if isinstance(answer, dict) and "error" in answer else repr(answer)[:300]
            raise self._error(
                f"The server answered without a completion (`choices[0].text`): {detail}. Check the model name and "
                "the server's log.", result)
        result.text = choice["text"]
        _record_usage(stats, answer)
        return result

    # ----- preparing the prompt -----

    def _prompt_ids(self, prompt) -> torch.Tensor:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("A string prompt needs `tokenizer=` (the draft's); or pass the prompt's token ids.")
            return self.tokenizer(prompt, return_tensors="pt")["input_ids"][:1]
        if isinstance(prompt, torch.Tensor):
            ids = prompt
            if ids.dim() == 2 and ids.shape[0] == 1:
                return ids
            if ids.dim() != 1:
                raise ValueError(
                    f"One prompt per request: give a 1-D tensor or a (1, length) tensor, got shape {tuple(ids.shape)}."
                )
            return ids[None]
        if isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            return torch.tensor([list(prompt)], dtype=torch.long)
        raise ValueError(
            f"`prompt` must be a string, a list of token ids or a tensor of them (one prompt), got "
            f"{type(prompt).__name__}."
        )

    def _prepare(self, result: SpecPCCompletion, kept_ids: list, prompt_format: str) -> None:
        """Sets what will be sent: `result.sent_prompt` and the `prompt_format`/`sent_tokens` stats."""
        stats = result.stats
        stats["prompt_format"] = prompt_format
        if prompt_format == "ids":
            result.sent_prompt = list(kept_ids)
            stats["sent_tokens"] = len(kept_ids)
            stats["text_roundtrip_exact"] = None
            return
        tokenizer = self.tokenizer
        ids = list(kept_ids)
        added = tokenizer("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts before any text
        if added and ids[: len(added)] == list(added):
            ids = ids[len(added):]  # the server adds it again
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        reencoded = tokenizer(text, add_special_tokens=True)["input_ids"]
        result.sent_prompt = text
        stats["sent_tokens"] = len(reencoded)
        stats["text_roundtrip_exact"] = list(reencoded) == list(kept_ids)

    # ----- HTTP -----

    def _open(self, payload: dict, stream: bool):
        request = urllib.request.Request(
            self.url, data=json.dumps(payload, allow_nan=False).encode("utf-8"), method="POST",
            headers={**self.headers, "Accept": "text/event-stream" if stream else "application/json"},
        )
        return self._opener.open(request, timeout=self.timeout)

    def _send(self, payload: dict, result: SpecPCCompletion, kept_ids: list, stream: bool):
        """Opens the request (the status is known, the body not read yet); in `"auto"`, falls back to text once."""
        stats = result.stats
        started = time.perf_counter()
        try:
            return self._open({**payload, "prompt": result.sent_prompt}, stream)
        except urllib.error.HTTPError as error:
            status, body = error.code, _read_error_body(error)
            can_fall_back = (self.prompt_format == "auto" and stats["prompt_format"] == "ids"
                             and status in (400, 422) and self.tokenizer is not None)
            if not can_fall_back:
                stats["request_seconds"] = time.perf_counter() - started
                raise self._http_error(status, body, result) from None
            refusal = f"HTTP {status}: {_error_text(body)}"
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            stats["request_seconds"] = time.perf_counter() - started
            raise self._transport_error(error, result) from error
        # "auto": the server refused the token ids; send the same prompt once as text.
        text_start = time.perf_counter()
        self._prepare(result, kept_ids, "text")
        stats["compress_seconds"] += time.perf_counter() - text_start
        stats["text_fallback_reason"] = refusal
        try:
            response = self._open({**payload, "prompt": result.sent_prompt}, stream)
        except urllib.error.HTTPError as error:
            stats["request_seconds"] = time.perf_counter() - started
            status, body = error.code, _read_error_body(error)
            raise self._error(
                f"The server refused the token ids ({refusal}) and then the text prompt too (HTTP {status}: "
                f"{_error_text(body)}) at {self.url}. The request itself is refused (e.g. `max_tokens` or the prompt "
                f"is too long for the model, or the model name {self.model!r} is wrong); check the server's log.",
                result, status=status, body=body) from None
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            stats["request_seconds"] = time.perf_counter() - started
            raise self._transport_error(error, result) from error
        self._ids_refused = refusal
        return response

    # ----- errors -----

    def _error(self, message: str, result: SpecPCCompletion, status=None, body=None) -> ServingError:
        return ServingError(f"{message} {_NOTHING_LOST}", result=result, status=status, body=body)

    def _http_error(self, status: int, body: str, result: SpecPCCompletion) -> ServingError:
        detail = _error_text(body)
        if 300 <= status < 400:
            return self._error(
                f"The server at {self.url} answered HTTP {status}, a redirect to {_redirect_location(body)}. It was not "
                "followed (the API key and headers are never sent to another address): set `base_url` to where the "
                "API really is.", result, status=status, body=body)
        if status == 404:
            hint = ("There is no completions endpoint there, or no such model: `base_url` must be the API root (it "
                    f"usually ends in /v1) and {self.model!r} a model the server serves.")
        elif status in (401, 403):
            hint = "The server wants credentials: pass `api_key=` (or the right one)."
        elif status in (400, 422):
            hint = "The server refused the request"
            if result.stats.get("prompt_format") == "ids":
                hint += (" (if it takes text prompts only, use `prompt_format='text'` or 'auto' with a tokenizer)")
            hint += "; check `max_tokens`, the other parameters and the model's context length."
        elif status == 429:
            hint = "The server is overloaded or rate-limits you; retry later."
        elif status >= 500:
            hint = "The server failed while answering; check its log (the model may have crashed or run out of memory)."
        else:
            hint = "Check the server's log."
        return self._error(f"The server answered HTTP {status} at {self.url}: {detail}. {hint}", result,
                           status=status, body=body)

    def _transport_error(self, error: BaseException, result: SpecPCCompletion,
                         during_stream: bool = False) -> ServingError:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, (TimeoutError, socket.timeout)):
            what = "stopped sending in the middle of the stream" if during_stream else "did not answer"
            message = (f"The server at {self.url} {what} within the timeout ({self.timeout:g} s). It may be "
                       "loading the model, overloaded or stuck; raise `timeout=` if it is only slow.")
        elif isinstance(reason, ConnectionRefusedError):
            message = (f"Nothing is listening at {self.url} (connection refused). Start the server (e.g. "
                       "`vllm serve MODEL --port 8000`) or fix `base_url`.")
        elif isinstance(reason, socket.gaierror):
            message = f"The host of {self.url} cannot be resolved ({reason}). Fix `base_url`."
        elif isinstance(reason, (ConnectionError, http.client.HTTPException)):
            message = (f"The connection to {self.url} was lost ({type(reason).__name__}: {reason}). The server may "
                       "have crashed or restarted; check its log and retry.")
        else:
            message = (f"Could not talk to the server at {self.url} ({type(reason).__name__}: {reason}). Check that "
                       "it is running and that `base_url` is right.")
        return self._error(message, result)


def _sse_data(reader: _Reader, timeout: float):
    """The `data` of each server-sent event (joined lines), as strings; comments and other fields are skipped. An
    event must come at least every `timeout` seconds: comments (keep-alives) and partial lines are not progress."""
    lines: list[str] = []
    reader.idle_deadline = time.monotonic() + timeout
    for raw in reader.lines():
        line = raw.decode("utf-8")
        if not line:
            if lines:
                yield "\n".join(lines)
                reader.idle_deadline = time.monotonic() + timeout
                lines = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


_MALFORMED = object()


def _first_choice(choices):
    """`choices[0]` of an answer or event: `None` when there is none, `_MALFORMED` when `choices` is not a list of
    objects."""
    if choices is None or choices == []:
        return None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        return _MALFORMED
    return choices[0]


def _read_error_body(error: urllib.error.HTTPError) -> str:
    try:
        location = error.headers.get("Location") if error.headers is not None else None
        text = error.read(4096).decode("utf-8", "replace")
        return f"Location: {location}\n{text}" if location and 300 <= error.code < 400 else text
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        error.close()


def _error_text(body) -> str:
    """The message of an OpenAI-style error answer (`{"error": {"message": ...}}`, `{"detail": ...}`, ...)."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError:
            return body.strip()[:500] or "(no message)"
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value:
                return str(value)[:500]
    return str(body)[:500]


def _redirect_location(body) -> str:
    """The redirect target of a 3xx answer, as `_read_error_body` noted it."""
    return body.split("Location: ", 1)[1].split("\n", 1)[0] if "Location: " in (body or "") else "another address"


def _record_usage(stats: dict, answer: dict) -> None:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if isinstance(usage, dict):
        if usage.get("prompt_tokens") is not None:
            stats["server_prompt_tokens"] = usage["prompt_tokens"]
        if usage.get("completion_tokens") is not None:
            stats["completion_tokens"] = usage["completion_tokens"]
