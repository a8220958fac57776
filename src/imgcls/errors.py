"""One exception type for everything a user can fix; the CLI turns it into a one-line error."""


class ImgclsError(Exception):
    """A problem with the user's input, data, config or files, explained in the message."""
