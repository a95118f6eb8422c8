"""One tool-enabled choice's stream: the model's text in, OpenAI chat deltas out, as OpenAI and vLLM
stream tool calls:

- content streams as it comes, less what may yet prove to be the start of a call's markup;
- once a call's name is known, a header delta: ``{"index": k, "id", "type": "function",
  "function": {"name", "arguments": ""}}`` (``k`` counts the choice's calls from 0);
- then each new part of the call's arguments JSON text: ``{"index": k, "function": {"arguments": ...}}``.

The fragments of a call add up to exactly the ``arguments`` the whole response has for it (the parsers'
scans only append, tool_parsers.py). A choice whose text ends up not being the format after all sends
the rest of its text as content at the end, so the content adds up to the whole response's. Once a
call's header went out the choice is a tool-call choice: if the text then breaks the format (max_tokens
cut a call), the stream ends with what the call had (finish_reason ``length``), where the whole response,
which can still choose, gives the text as content.
"""

from __future__ import annotations

from scheduler_svc.gateway.tool_parsers import Scan, Scanner, new_call_id


class ToolCallStream:
    def __init__(self, scan: Scanner, max_calls: int | None = None) -> None:
        self.scan = scan
        self.max_calls = max_calls  # 1 without parallel_tool_calls
        self.text = ""
        self.content_sent = 0  # characters of content sent (a prefix of the text)
        self.ids: list[str] = []  # the calls whose header went out
        self.args_sent: list[str] = []  # their arguments sent so far
        self.memo: dict = {}  # what the scans learned of the text, which only grows (partial_json.py)

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def feed(self, piece: str) -> list[dict]:
        """The deltas that ``piece`` (the choice's next text) makes certain."""
        self.text += piece
        return self._deltas(self.scan(self.text, False, self.memo))

    def finish(self) -> list[dict]:
        """The last deltas, once the choice ended; ``has_calls`` then says whether it made calls."""
        scan = self.scan(self.text, True, self.memo)
        if not self.ids and not (scan.parsed and scan.calls):
            rest = self.text[self.content_sent:]  # plain content after all
            self.content_sent = len(self.text)
            return [{"content": rest}] if rest else []
        return self._deltas(scan)

    def _deltas(self, scan: Scan) -> list[dict]:
        out = []
        if not self.ids and len(scan.content) > self.content_sent:
            out.append({"content": scan.content[self.content_sent:]})
            self.content_sent = len(scan.content)
        for k, call in enumerate(scan.calls[:self.max_calls]):
            if call.name is None:
                break  # calls go out in order
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append("")
                out.append({"tool_calls": [{"index": k, "id": self.ids[k], "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            sent = self.args_sent[k]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                out.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments[len(sent):]}}]})
                self.args_sent[k] = call.arguments
        return out
