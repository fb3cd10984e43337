"""
The tracking rewriter: one message in, one copy per recipient out.

The work that does not depend on the recipient is done once, by ``prepare``:
find the first ``text/html`` and ``text/plain`` parts, decode them, find
their links, ``data-msys-*`` attributes, ``[[...]]`` suffixes, brace macros
and pixel positions, and compile each part into a list of byte strings in
which only the recipient's tracked URLs and pixels are left open. A copy is
then made by ``Prepared.render``: fill those in, join, re-encode the part,
splice it into the message. Rendering never parses anything.

Fidelity is by construction: the HTML is never re-serialised. The scanner
only finds positions in the decoded text (HTML5 tokenizer rules for tags,
attributes, comments and raw text), and the copy is the original text with
exactly the recorded changes applied.

Bad input never costs a message: a part that cannot be decoded, a charset
that does not fit, HTML that ends inside a tag, or MIME that is not well
formed leaves the part (or, for MIME, the message) exactly as it came, and
``Prepared.skipped`` says why.

The modules, in the order a message meets them:

- ``mime``: the MIME walk, transfer encodings and charsets, and re-encoding;
- ``html_scan``: where the tags and attributes of an HTML text are;
- ``edits``: what tracking may change in a decoded part (links, pixels,
  ``data-msys-*`` attributes, ``[[...]]`` suffixes, brace macros);
- ``prepared``: a message compiled once for all its copies;
- ``render``: one recipient's copy filled in from the compiled form;
- ``audit``: what was decided about each link, for the preview (off the delivery path).

Header fields are read by ``appliance.headers``, as DKIM and the injection
server read them. The copy cache that calls all this is
``appliance.delivery.copies``.
"""

from appliance.rewrite.audit import OVER_CAP, Audit, LinkAudit, PartAudit
from appliance.rewrite.edits import (
    CLICKTRACK_OFF,
    DEFAULT_LINK_NAME,
    MAX_LINK_NAME_BYTES,
    NOT_TRACKABLE,
    TOO_LONG,
    Link,
    expand_macros,
    html_edits,
    text_edits,
)
from appliance.rewrite.errors import MimeError, PartSkipped
from appliance.rewrite.html_scan import HtmlScan, scan_html, unescape_attribute
from appliance.rewrite.mime import MAX_DEPTH, MAX_LINE, MAX_PART_BYTES, encode_base64, encode_qp, find_parts
from appliance.rewrite.prepared import (
    Prepared,
    PreparedPart,
    footprint,
    prepare,
    prepare_part,
    strip_header,
    without_msys_api,
)
from appliance.rewrite.render import INITIAL_PIXEL, OPEN_PIXEL, Change, Identity

__all__ = [
    "CLICKTRACK_OFF",
    "NOT_TRACKABLE",
    "OVER_CAP",
    "TOO_LONG",
    "Audit",
    "LinkAudit",
    "PartAudit",
    "DEFAULT_LINK_NAME",
    "INITIAL_PIXEL",
    "MAX_DEPTH",
    "MAX_LINE",
    "MAX_LINK_NAME_BYTES",
    "MAX_PART_BYTES",
    "OPEN_PIXEL",
    "Change",
    "HtmlScan",
    "Identity",
    "Link",
    "MimeError",
    "PartSkipped",
    "Prepared",
    "PreparedPart",
    "encode_base64",
    "encode_qp",
    "expand_macros",
    "find_parts",
    "footprint",
    "html_edits",
    "prepare",
    "prepare_part",
    "scan_html",
    "strip_header",
    "text_edits",
    "unescape_attribute",
    "without_msys_api",
]
