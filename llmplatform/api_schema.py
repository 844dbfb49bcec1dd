"""The management API's OpenAPI schema: drf-spectacular's, with the error answers every operation can give.

Each operation documents, in ``llmplatform.api_errors``'s ``{"error": ...}`` shape (``ApiErrorSerializer``):

* 401 and 403: every route needs a user, and ``llmplatform.permissions`` may refuse them;
* 400 when it reads input, a body or query parameters, which may be refused;
* 404 when its path names an object, which may not exist.

A view documents the other statuses it answers (409, 503, ...) in its ``extend_schema(responses=...)``; an
error response without a description gets the one of ``ERROR_DESCRIPTIONS``.
"""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema

from llmplatform.api_errors import ApiErrorSerializer

ERROR_DESCRIPTIONS = {
    "400": "The input was refused: `error` says why, `detail` holds the messages per field.",
    "401": "No credentials, or an API key that is unknown, revoked or expired.",
    "403": "The caller may not do this (see llmplatform/permissions.py).",
    "404": "No such object.",
    "409": "The request conflicts with the current state: a name that is taken, a job that has ended.",
    "413": "The body is over its size limit.",
    "500": "The operation failed on the server.",
    "502": "The Hugging Face Hub failed.",
    "503": "Redis, or every worker that could do it, is unavailable: try again later.",
}


class ManagementAutoSchema(AutoSchema):
    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        places = {parameter["in"] for parameter in operation.get("parameters", [])}
        codes = ["401", "403"]
        if "requestBody" in operation or "query" in places:
            codes.append("400")
        if "path" in places:
            codes.append("404")
        responses = operation["responses"]
        for code in codes:
            if code not in responses:
                responses[code] = self._get_response_for_code(ApiErrorSerializer, code)
        for code, response in responses.items():
            if code in ERROR_DESCRIPTIONS and not response.get("description"):
                response["description"] = ERROR_DESCRIPTIONS[code]
        operation["responses"] = dict(sorted(responses.items()))
        return operation
