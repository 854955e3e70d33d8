"""``.. entitysync-settings::`` lists every configuration key from ``entitysync_sync.settings.SETTINGS``.

Each key becomes a ``confval`` entry (its default, what it accepts and its
meaning), so pages link to a key with ``:confval:`ENTITYSYNC_PATH``` and the
keys are written once, in the code that checks them.
"""

from __future__ import annotations

import textwrap
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from entitysync_sync.settings import SETTINGS


class SettingsDirective(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for setting in SETTINGS:
            lines += [
                f".. confval:: {setting.key}",
                f"   :type: {setting.accepts}",
                f"   :default: ``{setting.default!r}``",
                "",
                *("   " + line for line in textwrap.dedent(setting.doc).strip().splitlines()),
                "",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="entitysync_sync/settings.py"), self.content_offset,
                                container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("entitysync-settings", SettingsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
