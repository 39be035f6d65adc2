"""Errors a user can act on. Each carries one clear line that names what is wrong."""


class MoergeError(Exception):
    """Base of every error moerge reports to a user (CLI: one line, non-zero exit).

    ``http_status``: what the gateway answers with it. By default 503: a model or strategy that
    exists cannot answer now (an engine, a router or a composer failed), so a client may retry.
    """

    http_status = 503


class RegistrationError(MoergeError):
    """A registration was refused; nothing was written."""

    http_status = 400


class NotFoundError(MoergeError):
    """A named expert, base model or artifact does not exist."""

    http_status = 404


class DefinitionError(MoergeError):
    """A strategy definition (or one of its parameters) was refused; nothing was stored."""

    http_status = 400
