"""Stored responses (`store: true`): the "responses" table set of the server's Store.

A row keeps the Response object as the client saw it and the request's own input items; the conversation behind
`previous_response_id` is rebuilt by walking the chain of rows, so each turn is stored once (images in early
turns are not copied into every later one). Deleting a response removes its row only: a later turn that built on
it then continues from what is left of the chain.
"""

from __future__ import annotations

import json

from omnimini.serve.responses_api import output_as_input
from omnimini.serve.store import Store

SCHEMA = [
    """CREATE TABLE responses (
         id TEXT PRIMARY KEY,
         created_at REAL NOT NULL,
         model TEXT NOT NULL,
         previous_response_id TEXT,
         input_items TEXT NOT NULL,   -- JSON list, the request's own input items (with ids)
         response TEXT NOT NULL       -- JSON Response object
       )""",
]

MAX_CHAIN = 10_000  # turns walked back through previous_response_id


class ResponseStore:
    def __init__(self, store: Store):
        self.store = store
        store.migrate("responses", SCHEMA)

    def put(self, response: dict, input_items: list[dict]) -> None:
        with self.store.tx() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (response["id"], response["created_at"], response["model"], response["previous_response_id"],
                        json.dumps(input_items, ensure_ascii=False), json.dumps(response, ensure_ascii=False)))

    def get(self, rid: str) -> dict | None:
        rows = self.store.query("SELECT response FROM responses WHERE id = ?", (rid,))
        return json.loads(rows[0]["response"]) if rows else None

    def delete(self, rid: str) -> bool:
        with self.store.tx() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    def _row(self, rid: str):
        rows = self.store.query("SELECT previous_response_id, input_items, response FROM responses WHERE id = ?",
                                (rid,))
        return rows[0] if rows else None

    def conversation(self, rid: str) -> list[dict] | None:
        """Items of the conversation up to and including response `rid` (inputs and outputs, oldest first);
        None when `rid` is not stored."""
        turns = []
        row, cur = self._row(rid), rid
        if row is None:
            return None
        while row is not None and len(turns) < MAX_CHAIN:
            turns.append(json.loads(row["input_items"]) + output_as_input(json.loads(row["response"])["output"]))
            cur = row["previous_response_id"]
            row = self._row(cur) if cur else None
        return [it for turn in reversed(turns) for it in turn]

    def input_items(self, rid: str) -> list[dict] | None:
        """What response `rid` was given as input: the earlier conversation, then its own input items."""
        row = self._row(rid)
        if row is None:
            return None
        prev = row["previous_response_id"]
        before = (self.conversation(prev) or []) if prev else []
        return before + json.loads(row["input_items"])
