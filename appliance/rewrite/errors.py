"""Why the rewriter leaves a message, or one of its parts, exactly as it came."""


class MimeError(ValueError):
    """The message's MIME structure cannot be trusted enough to change anything in it."""


class PartSkipped(ValueError):
    """One part cannot be rewritten faithfully; it is delivered as it came."""
