"""The envelope rules of the injection server: which addresses and MAIL parameters it takes."""

from __future__ import annotations

import re

from twisted.mail import smtp

from appliance.smtp.auth import Reply

# What an address may hold: printable ASCII, and the space only Twisted's grammar lets in
# inside quotes. Its qstring takes anything between quotes (LF, CR, NUL, 8-bit): written
# into a Received: header or a MAIL command, an LF would start a header or a command.
_ADDRESS = re.compile(rb"[\x20-\x7e]*")


def address_allowed(path: bytes) -> bool:
    """Whether a MAIL or RCPT path may be written into headers and commands as it is."""
    return _ADDRESS.fullmatch(path) is not None


def mail_parameters_refusal(opts: bytes, max_size: int, auth_offered: bool) -> Reply | None:
    """Check MAIL's ESMTP parameters: only those of extensions we advertise."""
    for param in opts.split():
        key, _, value = param.partition(b"=")
        key = key.upper()
        if key == b"SIZE":  # RFC 1870: refuse now what would be refused after DATA
            if not value.isdigit():
                return 501, b"5.5.4 Bad SIZE parameter"
            if int(value) > max_size:
                return 552, b"5.3.4 Message size exceeds fixed maximum message size"
        elif key == b"BODY":  # RFC 6152: we take 8-bit text as it is
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                return 555, b"5.5.4 Unsupported BODY type"
        elif key == b"AUTH" and auth_offered:
            pass  # RFC 4954 §5: the identity the message was submitted by; informational
        else:
            return 555, b"5.5.4 Unsupported MAIL parameter " + key[:32]
    return None


def same_mailbox(a: smtp.Address, b: smtp.Address) -> bool:
    """
    One mailbox twice in a transaction: the domain compared without case, the local part exactly.

    RFC 5321 §2.4 lets a local part be case-sensitive, so ``Joe@`` and ``joe@``
    may be two people; dropping one would lose mail, while a duplicate copy
    of one mailbox only costs a second message.
    """
    return a.local == b.local and a.domain.lower() == b.domain.lower()
