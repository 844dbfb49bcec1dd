"""Who may do what on the management API: one table, ``POLICY``, and the DRF permission class that
enforces it. A view declares its row in one line, ``permission_classes = access("nodes")``; a plain
Django view asks ``access_refusal``.

The callers, from least to most trusted:

* anonymous (no credentials): nothing under ``/api/v1/`` (401);
* an API key that belongs to no user: ``/v1`` only; the management API refuses it (403);
* a user: a session, or an API key that belongs to the user;
* staff (``is_staff``): everything.

A rule (``Who``) names the least trusted caller that may do an action. Rules are looked up by the
view's action: a viewset's (``list``, ``retrieve``, ``cordon``, ...) or the HTTP method of a plain
``APIView`` (``get``, ``post``, ``delete``). A rule for ``"<action>:<content type>"`` takes precedence
for requests whose body type starts with that one, for the one path that does two things by its body
(``POST /api/v1/models``: an upload, or an external registration as JSON). A method a view does not
handle needs only a user, so the caller gets its 405; an action the view handles but the table
lacks is refused to everyone, staff included (``tests/test_permissions.py`` checks there is none).
"""

from __future__ import annotations

from enum import StrEnum

from django.conf import settings
from rest_framework.permissions import BasePermission


class Who(StrEnum):
    USER = "user"  # any user
    OWNER = "owner"  # a user, on objects that are theirs (lists are filtered to them); staff on all
    UPLOADER = "uploader"  # staff; every user too while LLMP_USERS_MAY_UPLOAD is on
    UPLOADER_OWNER = "uploader-owner"  # staff; a user on their own objects while LLMP_USERS_MAY_UPLOAD is on
    STAFF = "staff"


USER, OWNER, UPLOADER, UPLOADER_OWNER, STAFF = Who.USER, Who.OWNER, Who.UPLOADER, Who.UPLOADER_OWNER, Who.STAFF

# The rules. Keys: route names for plain views, else a name the view's ``access(...)`` line gives.
POLICY: dict[str, dict[str, Who]] = {
    "nodes": {"list": USER, "retrieve": USER, "metrics": USER,
              "cordon": STAFF, "uncordon": STAFF, "drain": STAFF, "destroy": STAFF},
    "fit": {"get": USER},
    "registry": {"list": USER, "retrieve": USER, "clear_load_failures": STAFF},
    "external-models": {"list": USER, "retrieve": USER,
                        "create": STAFF, "update": STAFF, "partial_update": STAFF, "destroy": STAFF},
    "keys": {"list": OWNER, "retrieve": OWNER, "create": USER, "revoke": OWNER},
    "requests": {"list": OWNER, "retrieve": OWNER},
    "jobs": {"list": OWNER, "retrieve": OWNER, "cancel": STAFF, "retry": STAFF},
    "job-events": {"get": OWNER},
    "local-health": {"get": USER},
    # The server would call a URL of the caller's choosing, with a key it stores: staff.
    "local-models": {"get": USER, "post": UPLOADER, "post:application/json": STAFF},
    "local-model-delete": {"delete": UPLOADER_OWNER},
    "local-models-sync": {"post": STAFF},
    "local-generate": {"post": USER},
    "local-cache-clear": {"post": STAFF},
    "local-cache-status": {"get": USER},
    # Hub searches and listings go out with the server's HF_TOKEN, which may see private repos: staff.
    "hf-search": {"get": STAFF},
    "hf-files": {"get": STAFF},
    "hf-register": {"post": STAFF},
    "convert": {"post": STAFF},
    "quantize": {"post": STAFF},
    "model-blob": {"get": OWNER},  # nodes pull with a blob token instead (apps.models.services.blob_token_check)
    "node-cache": {"get": USER},
    "node-cache-unload": {"post": STAFF},
    "node-cache-delete": {"delete": STAFF},
}

# Where an object names its owner: a model or a job its creator, a key or a request its user.
OWNER_FIELDS = ("created_by_id", "user_id")

NO_USER = "This API key belongs to no user: it works for /v1 only, not for the management API"
REFUSED = {
    USER: "Sign in, or use an API key that belongs to a user",
    OWNER: "Only its owner or a staff user may do this",
    UPLOADER: "Only staff users may do this (LLMP_USERS_MAY_UPLOAD is off)",
    UPLOADER_OWNER: "Only staff users may do this (LLMP_USERS_MAY_UPLOAD is off)",
    STAFF: "Only staff users may do this",
}
NO_RULE = "This action has no access rule (llmplatform/permissions.py)"


def _refusal(who: Who) -> str:
    if who in (UPLOADER, UPLOADER_OWNER) and settings.LLMP_USERS_MAY_UPLOAD:
        return REFUSED[OWNER]  # with uploads open, a user is refused only what is not theirs
    return REFUSED[who]


def _owns(user, obj) -> bool:
    owner_id = next((getattr(obj, field) for field in OWNER_FIELDS if hasattr(obj, field)), None)
    return owner_id is not None and owner_id == user.pk


def who_permits(*, who: Who, user, obj=None) -> bool:
    """Whether ``who`` lets ``user`` (None or anonymous for no user) act; on ``obj`` when given, else on
    the view as a whole (whose objects are checked one by one afterwards)."""
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if user.is_staff:
        return True
    owns = obj is None or _owns(user, obj)
    return {
        USER: True,
        OWNER: owns,
        UPLOADER: settings.LLMP_USERS_MAY_UPLOAD,
        UPLOADER_OWNER: settings.LLMP_USERS_MAY_UPLOAD and owns,
        STAFF: False,
    }[who]


def access_refusal(*, view: str, action: str, user, obj=None) -> str | None:
    """For plain Django views: why ``POLICY[view][action]`` refuses ``user`` (on ``obj``), for a 403;
    None when it lets them act."""
    who = POLICY[view].get(action)
    if who is None:
        return NO_RULE
    return None if who_permits(who=who, user=user, obj=obj) else _refusal(who)


class PolicyPermission(BasePermission):
    """Enforces ``POLICY[policy]``; made by ``access``."""

    policy: str = ""

    def _who(self, request, view) -> Who | None:
        rules = POLICY[self.policy]
        method = "get" if request.method == "HEAD" else request.method.lower()
        if method == "options" or not hasattr(view, method):  # metadata, or a 405 to come
            return USER
        action = getattr(view, "action", None) or method
        content_type = request.content_type or ""
        for key, who in rules.items():
            qualified, _, body_type = key.partition(":")
            if body_type and qualified == action and content_type.startswith(body_type):
                return who
        return rules.get(action)

    def _refuse(self, request, who: Who | None) -> bool:
        if who is None:
            self.message = NO_RULE
        elif request.auth is not None and not request.user.is_authenticated:
            self.message = NO_USER
        else:
            self.message = _refusal(who)
        return False

    def has_permission(self, request, view) -> bool:
        who = self._who(request, view)
        return (who is not None and who_permits(who=who, user=request.user)) or self._refuse(request, who)

    def has_object_permission(self, request, view, obj) -> bool:
        who = self._who(request, view)
        return (who is not None and who_permits(who=who, user=request.user, obj=obj)) or self._refuse(request, who)


def access(policy: str) -> list[type[BasePermission]]:
    """A view's permission classes: ``POLICY[policy]`` (a KeyError at import for a name not in it)."""
    if policy not in POLICY:
        raise KeyError(f"no access rules named {policy!r} in llmplatform.permissions.POLICY")
    return [type(f"Access_{policy.replace('-', '_')}", (PolicyPermission,), {"policy": policy})]
