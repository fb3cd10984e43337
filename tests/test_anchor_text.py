"""Anchor text: what a reader sees of each tracked link, carried in its clicks."""

from __future__ import annotations

import re
import time

import lxml.html
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from appliance.links import LinkCodec, read_keyring
from appliance.rewrite import prepare
from appliance.rewrite.edits import html_edits, text_edits
from appliance.rewrite.html_scan import ANCHOR_SCAN, ANCHOR_TEXT_MAX, anchor_text
from tests.memory import MemoryAppliance, sendmail
from tests.test_rewrite import CODEC, ID, crlf, html_part, message, render
from tests.test_tracking import TOKEN, TRACK_ALL

TOKEN_RE = re.compile(rb"http://track\.example/(?:f/[^/\s\"'<>]+|q)/([A-Za-z0-9_-]+)")


def anchors(html: str) -> list[tuple[str, str]]:
    """(target, anchor text) of each tracked link occurrence, in order."""
    edits, _ = html_edits(html)
    return [(e.link.target, e.link.anchor) for e in edits if e.link is not None]


def anchor_of(content: str) -> str:
    [(_, anchor)] = anchors(f'<body><a href="https://x.example/">{content}</a></body>')
    return anchor


class AnchorTextTests(SynchronousTestCase):
    def test_plain_text(self) -> None:
        self.assertEqual(anchor_of("Shop now"), "Shop now")

    def test_nested_tags_are_stripped(self) -> None:
        self.assertEqual(anchor_of('<span style="color:red"><b>Shop</b> <i>now</i></span>'), "Shop now")
        self.assertEqual(anchor_of("Sh<b>o</b>p"), "Shop")  # inline markup joins, as a reader sees it
        self.assertEqual(anchor_of("Shop<br>now"), "Shop now")  # a line break keeps words apart
        self.assertEqual(anchor_of("<table><tr><td>Shop</td><td>now</td></tr></table>"), "Shop now")

    def test_character_references_are_decoded(self) -> None:
        self.assertEqual(anchor_of("Fish &amp; Chips &copy; 2026 &#x263A;&nbsp;&lt;b&gt; &notit;"),
                         "Fish & Chips © 2026 ☺ <b> ¬it;")

    def test_white_space_is_collapsed(self) -> None:
        self.assertEqual(anchor_of("\r\n\t  Shop \r\n\r\n   now\t "), "Shop now")

    def test_image_only_links_give_the_alt_text(self) -> None:
        self.assertEqual(anchor_of('<img src="hero.png" alt="Spring &amp; summer\n sale">'),
                         "Spring & summer sale")
        self.assertEqual(anchor_of("<IMG SRC=x ALT=Hero>"), "Hero")
        self.assertEqual(anchor_of("<img><img/alt=Hero>"), "Hero")
        self.assertEqual(anchor_of('<img alt="" src=a><img src=b alt=" Second ">'), "Second")
        self.assertEqual(anchor_of('<img src="x.png" data-alt="no">'), "")
        self.assertEqual(anchor_of('Text <img src="x.png" alt="Image">'), "Text")  # text wins

    def test_area_gives_its_alt_text(self) -> None:
        edits, _ = html_edits('<map><area shape=rect href="https://x.example/" alt="North &amp; west"></map>')
        self.assertEqual([e.link.anchor for e in edits if e.link is not None], ["North & west"])

    def test_very_long_text_is_cut(self) -> None:
        long = anchor_of("word " * 100)
        self.assertEqual(len(long), ANCHOR_TEXT_MAX - 1)  # cut at 100 characters, then trimmed
        self.assertEqual(long, ("word " * 20).strip())
        self.assertEqual(anchor_of("é" * 300), "é" * ANCHOR_TEXT_MAX)

    def test_no_text(self) -> None:
        self.assertEqual(anchor_of(""), "")
        self.assertEqual(anchor_of("<img src=x.png>"), "")
        self.assertEqual(anchor_of("  <span> </span> "), "")

    def test_invisible_markup_is_dropped(self) -> None:
        button = ('<!--[if mso]><i style="letter-spacing:25px">&nbsp;</i><![endif]-->'
                  '<span>Shop now</span><!--[if mso]><i>&nbsp;</i><![endif]-->')
        self.assertEqual(anchor_of(button), "Shop now")
        self.assertEqual(anchor_of("<style>a{color:red}</style>Go<script>var a = '<b>';</script>!"), "Go!")

    def test_where_the_text_ends(self) -> None:
        html = ('<body><a href="https://a.example/">First <a href="https://b.example/">Second</A>'
                ' after</a><a href="https://c.example/">Last</body><p>not this</p>')
        self.assertEqual(anchors(html), [("https://a.example/", "First"), ("https://b.example/", "Second"),
                                         ("https://c.example/", "Last")])
        unclosed = '<a href="https://a.example/">Shop now and ' + "more " * 2000
        [(_, anchor)] = anchors(unclosed)
        self.assertEqual(anchor, ("Shop now and " + "more " * 20)[:ANCHOR_TEXT_MAX].strip())

    def test_only_the_first_characters_are_read(self) -> None:
        """Text past ``ANCHOR_SCAN`` characters of markup is not looked for."""
        filler = "<span>" * (ANCHOR_SCAN // 6 + 1)
        self.assertEqual(anchor_of(filler + "Late"), "")
        self.assertEqual(anchor_text('<a href="x">' + "<span>" * 10 + "Early", 12), "Early")

    def test_macros_are_expanded(self) -> None:
        self.assertEqual(anchor_of("{{opening_double_curly()}}x{{closing_double_curly()}}"), "{{x}}")

    def test_text_parts_have_none(self) -> None:
        edits, _ = text_edits("Shop now: https://x.example/a\n")
        self.assertEqual([e.link.anchor for e in edits if e.link is not None], [""])

    def test_untracked_links_and_the_copy_are_untouched(self) -> None:
        """Anchors change no byte of a copy: the same text, only tracked URLs differ."""
        html = ('<p><a href="https://x.example/a">Shop <b>now</b> &amp; save</a> '
                '<a href="mailto:a@b">mail</a> <a href="https://x.example/a">Other text</a></p>')
        original = message(crlf("MIME-Version: 1.0\n"), html_part(html, cte="7bit"))
        (part,) = prepare(original).parts
        self.assertEqual([link.anchor for link in part.links], ["Shop now & save", "Other text"])
        copy = render(original)
        tokens = [m.group(1) for m in TOKEN_RE.finditer(copy) if b"/f/" in m.group(0)]
        self.assertEqual([CODEC.decode(t).anchor for t in tokens], ["Shop now & save", "Other text"])
        self.assertEqual(TOKEN_RE.sub(b"URL", copy).split(b"\r\n\r\n", 1)[1],
                         crlf('<p><a href="URL">Shop <b>now</b> &amp; save</a> <a href="mailto:a@b">mail</a> '
                              '<a href="URL">Other text</a></p><img border="0" width="1" height="1" alt="" '
                              'src="URL">'))
        self.assertEqual(ID.rcpt_to, CODEC.decode(tokens[0]).rcpt_to)


class AnchorTextEndToEndTests(SynchronousTestCase):
    """A copy's click, followed through the tracker, says which text was clicked."""

    def test_click_event_carries_the_anchor_text(self) -> None:
        running = MemoryAppliance(self.mktemp())
        codec = LinkCodec(read_keyring(running.config.links.keys_file))
        running.start()
        self.addCleanup(running.stop)
        html = (b'<html><body><a href="https://shop.example/p?id=1&amp;x=2"><b>Shop</b>&nbsp;now</a> '
                b'<a href="https://shop.example/hero"><img src="h.png" alt="Spring sale"></a>'
                b'</body></html>\r\n')
        data = (b"From: Sender <s@example.net>\r\nSubject: Tracked\r\nX-MSYS-API: " + TRACK_ALL.encode()
                + b"\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html)
        sendmail(running.smtp(), "s@example.net", ["a@example.test"], data)
        [copy] = running.sink.messages
        clicks = [m for m in TOKEN.finditer(copy.data.replace(b"=\r\n", b"")) if b"/f/" in m.group(0)]
        self.assertEqual([codec.decode(m.group(1)).anchor for m in clicks], ["Shop now", "Spring sale"])
        # The injection clock is real time; the link expires long after now.
        self.assertGreater(codec.decode(clicks[0].group(1)).expiry, time.time())
        for m in clicks:
            path = m.group(0).split(b"/", 3)[3].decode()
            status, _, _ = running.get("/" + path)
            self.assertEqual(status, 302)
        events = [e for e in running.events() if e["type"] == "click"]
        self.assertEqual([e["target_link_anchor"] for e in events], ["Shop now", "Spring sale"])
        self.assertEqual([e["target_link_url"] for e in events],
                         ["https://shop.example/p?id=1&x=2", "https://shop.example/hero"])


# Anchor content from pieces a browser reads the same way lxml does: text, inline tags,
# character references, comments, white space.
inline_content = st.lists(st.sampled_from(
    ["Shop", "now", "é", " ", "\n", "\t", "<b>", "</b>", '<span class="x">', "</span>", "<i>", "</i>",
     "&amp;", "&copy;", "&#65;", "&#x263A;", "&lt;", "&gt;", "<!-- hidden -->", "<!--[if mso]>x<![endif]-->",
     "a&b", "x=1"]), max_size=30).map("".join)


class AnchorTextPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(inline_content)
    def test_reads_as_a_tree_parser_does(self, content: str) -> None:
        """The scanner's anchor text is lxml's text content of the link, collapsed and cut."""
        html = f'<div><a href="https://x.example/">{content}</a></div>'
        tree = lxml.html.fragment_fromstring(html)
        expected = " ".join(tree.find("a").text_content().split())[:ANCHOR_TEXT_MAX].rstrip()
        self.assertEqual(anchor_of(content), expected)
