"""The preview as an operator reads it in a terminal: settings, links, pixels, notes."""

from __future__ import annotations

from appliance.preview import Preview

# Widths of the link table's columns that are cut; the full values are in --json.
_WIDTHS = {"anchor": 24, "target": 44, "name": 16}


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def render_text(preview: Preview, out: str | None, reading_notes: list[str]) -> str:
    lines = [f"Preview of the copy for {preview.rcpt} (listener {preview.listener})", ""]
    lines.append("Settings (highest first: policy hook, X-MSYS-API, listener, [smtpapi], default):")
    lines += ["  " + line for line in _table(
        ["setting", "value", "from"], [[s.name, s.value, s.source] for s in preview.settings])]
    lines += ["", "Parts:"] + [f"  {p}" for p in preview.parts]
    lines += ["", f"Links ({len(preview.links)}, {sum(r.tracked for r in preview.links)} tracked):"]
    if preview.links:
        rows = [[str(i), r.part.removeprefix("text/"), str(r.line), _cut(r.anchor_text, _WIDTHS["anchor"]),
                 _cut(r.target or r.written, _WIDTHS["target"]), _cut(r.link_name, _WIDTHS["name"]),
                 "tracked" if r.tracked else "left alone", r.why]
                for i, r in enumerate(preview.links, 1)]
        lines += ["  " + line for line in _table(
            ["#", "part", "line", "anchor text", "target", "link name", "decision", "why"], rows)]
    else:
        lines.append("  none")
    lines += ["", "Pixels:"]
    for pixel in preview.pixels:
        lines.append(f"  {pixel.kind}: {pixel.where}")
        if pixel.url:
            lines.append(f"    {pixel.url}")
    if not preview.pixels:
        lines.append("  none: no HTML part is tracked")
    notes = reading_notes + preview.notes
    if notes:
        lines += ["", "Notes:"] + [f"  {n}" for n in notes]
    lines += ["", "Links are signed with a key made for this preview: the tracker answers 404 to them.",
              "Only a real injection adds the Received: trace field and, if configured, the DKIM "
              "signature."]
    lines.append(f"The copy was written to {out}." if out else "Give --out FILE to write the copy.")
    return "\n".join(lines) + "\n"
