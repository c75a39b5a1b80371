"""Prompt and result files (JSON lines). Read by one rank; results written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class PromptError(ValueError):
    """The prompt file is malformed; the message names the file and line."""


@dataclass
class PromptRequest:
    id: str | int
    prompt: str
    max_tokens: int | None = None  # None: use --max-new-tokens
    stop: list[str] = field(default_factory=list)
    where: str = ""  # file:line, for messages about this prompt


def read_prompts(path: str | Path) -> list[PromptRequest]:
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise PromptError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise PromptError(f"{path}: is a directory, not a prompt file") from None
    requests = []
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"{where}: not valid UTF-8 (byte {e.start} of the line: {e.reason})") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where}: malformed JSON: {e.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise PromptError(f'{where}: each line must be a JSON object with a string "prompt"')
        if not item["prompt"]:
            raise PromptError(f'{where}: "prompt" is empty')
        max_tokens = item.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            raise PromptError(f'{where}: "max_tokens" must be a non-negative integer')
        stop = item.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise PromptError(f'{where}: "stop" must be a string or a list of non-empty strings')
        requests.append(PromptRequest(item.get("id", len(requests)), item["prompt"], max_tokens, stop, where))
    if not requests:
        raise PromptError(f"{path}: the prompt file is empty")
    return requests
