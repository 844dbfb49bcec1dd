"""The fit API: llmfit's endpoints for every node of the fleet, and the fleet matrix."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.fit import engine, selectors
from apps.nodes.models import Node
from apps.nodes.selectors import node_get
from llmplatform.permissions import access


def _query(request, **options) -> engine.FitQuery:
    return engine.parse_query(request.query_params, **options)  # FitQueryError: 400


def _node(ref: str) -> Node:
    node = node_get(ref=ref)
    if node is None:
        raise NotFound(f"node {ref} not found")
    return node


class NodeSystemView(APIView):
    """A node's identity and hardware, as llmfit's ``/api/v1/system`` shows it."""

    permission_classes = access("fit")

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, node: str):
        return Response(selectors.node_system(node=_node(node)))


class NodeModelsView(APIView):
    """Every model's fit on a node, filtered and sorted with llmfit's query parameters."""

    permission_classes = access("fit")
    top_only = False

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, node: str):
        target = _node(node)
        query = _query(request, top_only=self.top_only, default_limit=5 if self.top_only else None)
        return Response(selectors.node_fit_report(node=target, query=query))


class NodeTopModelsView(NodeModelsView):
    """The best runnable models of a node (5 unless ``limit`` says otherwise; never too_tight)."""

    top_only = True


class NodeModelByNameView(APIView):
    """Models whose name, provider or size contains ``name`` (case-insensitive), on a node."""

    permission_classes = access("fit")

    @extend_schema(operation_id="fit_node_models_by_name", responses=OpenApiTypes.OBJECT)
    def get(self, request, node: str, name: str):
        target = _node(node)
        query = _query(request, search=name, default_limit=20)
        return Response(selectors.node_fit_report(node=target, query=query))


class FitMatrixView(APIView):
    """Models x nodes with fit level, best quantization and tokens/s per cell (``nodes=a,b`` picks nodes)."""

    permission_classes = access("fit")

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        query = _query(request)
        names = [name.strip() for name in request.query_params.get("nodes", "").split(",") if name.strip()]
        return Response(selectors.fit_matrix(query=query, node_names=names or None))
