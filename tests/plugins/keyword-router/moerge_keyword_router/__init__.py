"""A router in one file, installed as a plugin (the ``moerge.routers`` entry point): the expert
whose skill or domain word appears in the prompt, first match wins; none matched, no expert.

It is what docs/extending.md walks through, and the tests install it to check that moerge finds
and serves a router it does not ship.
"""

from __future__ import annotations

import re

from routers.base import Artifact, Decision, ExpertInfo, RouteRequest
from routers.common import QueryRouter
from routers.params import Param


class KeywordRouter(QueryRouter):
    name = "keyword"
    PARAMS = (Param("case_sensitive", "bool", False, "match the words' case exactly"),)

    def __init__(self, case_sensitive: bool = False) -> None:
        super().__init__()
        self.case_sensitive = case_sensitive

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        # nothing to fit: the words are the expert's own tags (stored, so the artifact says so)
        return Artifact(tensors={}, metadata={"words": ",".join([*expert.skills, *expert.domains])})

    def route(self, request: RouteRequest) -> Decision:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        for name in self.names:
            for word in filter(None, self.artifacts[name].metadata["words"].split(",")):
                if re.search(rf"\b{re.escape(word)}", request.prompt, flags):
                    return self.decision([(name, 1.0)], matched=word)
        return self.decision([], reason="no expert's word in the prompt")
