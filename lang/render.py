"""HTML for a program state in Jupyter: one block per role message, generated values highlighted."""

from __future__ import annotations

import html
from typing import Optional, Sequence

_ROLE_COLORS = {"system": "#f3f0ff", "user": "#eef6ff", "assistant": "#effaf1"}
_STYLE = (
    "<style>"
    ".rl-state{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;line-height:1.45}"
    ".rl-role{border-radius:6px;padding:4px 8px;margin:4px 0}"
    ".rl-role-name{font-weight:bold;font-size:11px;text-transform:uppercase;opacity:.6}"
    ".rl-gen{background:#fff3b0;border-bottom:2px solid #e0b000}"
    ".rl-select{background:#d8f0ff;border-bottom:2px solid #2a8ad4}"
    ".rl-error{color:#b00020;font-weight:bold}"
    "</style>"
)


def _inline(text: str, start: int, end: int, marks: Sequence) -> str:
    """text[start:end] with the generated spans inside it wrapped in <span>s."""
    out, pos = [], start
    for m in marks:
        a, b = max(m.start, start), min(m.end, end)
        if a >= b or a < pos:
            continue
        out.append(html.escape(text[pos:a]))
        title = html.escape(f"{m.kind}: {m.name}" if m.name is not None else m.kind)
        out.append(f'<span class="rl-{m.kind}" title="{title}">{html.escape(text[a:b])}</span>')
        pos = b
    out.append(html.escape(text[pos:end]))
    return "".join(out)


def render_state_html(text: str, spans: Sequence, error: Optional[BaseException] = None) -> str:
    """``spans`` are interpreter ``Span``s: kind "role" blocks and "gen"/"select" marks."""
    roles = sorted((s for s in spans if s.kind == "role"), key=lambda s: s.start)
    marks = sorted((s for s in spans if s.kind != "role"), key=lambda s: s.start)
    parts, pos = [_STYLE, '<div class="rl-state">'], 0
    for r in roles:
        if r.start < pos:
            continue
        if r.start > pos:
            parts.append(_inline(text, pos, r.start, marks))
        color = _ROLE_COLORS.get(r.name, "#f5f5f5")
        parts.append(
            f'<div class="rl-role" style="background:{color}"><div class="rl-role-name">{html.escape(str(r.name))}'
            f"</div>{_inline(text, r.start, r.end, marks)}</div>"
        )
        pos = r.end
    if pos < len(text):
        parts.append(_inline(text, pos, len(text), marks))
    if error is not None:
        parts.append(f'<div class="rl-error">error: {html.escape(repr(error))}</div>')
    parts.append("</div>")
    return "".join(parts)
