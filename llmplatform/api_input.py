"""What the management API takes from a request, bounded so bad input is a 400 and never a 500.

Settings make these the API's defaults (``DEFAULT_PARSER_CLASSES``, ``DEFAULT_PAGINATION_CLASS``);
a view that names its own parsers names ``JSONParser`` from here.
"""

from __future__ import annotations

from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.pagination import LimitOffsetPagination

from llmplatform.jsonbody import NESTED_TOO_DEEP, json_body_problem

MAX_PAGE_SIZE = 1000


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser that also refuses what ``llmplatform.jsonbody`` refuses: a body nested too deep
    (ParseError) and a string with a lone surrogate (a ValidationError naming the field)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - {NESTED_TOO_DEEP.sentence}") from None
        problem = json_body_problem(data)
        if problem is not None and problem.param is not None:
            raise ValidationError({problem.param: [f"{problem.message}."]})
        if problem is not None:
            raise ParseError(f"JSON parse error - {problem.sentence}")
        return data


def _query_int(request, name: str, *, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:  # not a number, or more digits than int() reads
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        upper = f" to {maximum}" if maximum is not None else " or more"
        raise ValidationError({name: [f"must be a whole number from {minimum}{upper}."]})
    return value


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """DRF's limit/offset pagination, with ``limit`` at most MAX_PAGE_SIZE; a ``limit`` or ``offset`` that is
    not a whole number in range is a 400, where DRF would ignore it or pass the database a number it
    cannot hold. An offset past the end is an empty page."""

    max_limit = MAX_PAGE_SIZE

    def get_limit(self, request) -> int:
        return _query_int(request, self.limit_query_param, default=self.default_limit, minimum=1,
                          maximum=self.max_limit)

    def get_offset(self, request) -> int:
        return _query_int(request, self.offset_query_param, default=0, minimum=0)
