"""MkDocs hooks: pages whose content is generated from the code at build time.

A page holds a marker pair (``<!-- scenario-reference -->`` ... ``<!-- /scenario-reference
-->``); what stands between the markers on GitHub is replaced in the built site by the
generated Markdown, so the reference has one source of truth, the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from abm.reference import cli_reference, scenario_reference

GENERATORS: dict[str, Callable[[], str]] = {
    "scenario-reference": scenario_reference,
    "cli-reference": cli_reference,
}


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace each generated section of a page with its freshly generated Markdown."""
    for marker, generate in GENERATORS.items():
        pattern = re.compile(rf"<!-- {marker} -->.*?<!-- /{marker} -->", re.S)
        if pattern.search(markdown):
            text = generate()
            markdown = pattern.sub(lambda _, text=text: text, markdown)
    return markdown
