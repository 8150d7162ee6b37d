"""Writes deploy/kserve/schema/kserve-v1beta1.json: a JSON Schema (2020-12) of KServe's InferenceService
(serving.kserve.io/v1beta1) and ServingRuntime (v1alpha1) resources, from the KServe Python SDK's models, which
KServe generates from the OpenAPI definitions of its CRD types. Each object allows only its own fields
(`additionalProperties: false`) with their JSON names and types, and requires the fields the SDK requires; the
Kubernetes types they embed (Container, Probe, ResourceRequirements, ...) are referenced from the strict
Kubernetes schemas that kubernetes-validate ships (`https://kubernetes.io/api/_definitions.json`), which the
test registers. Enums and numeric bounds are not in the SDK's models, so they are not checked here.

    python -m pip download --no-deps kserve==0.21.0 -d /tmp/kserve && unzip -q /tmp/kserve/kserve-*.whl -d /tmp/kserve
    python deploy/kserve/make_schema.py /tmp/kserve/kserve/models
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).parent / "schema" / "kserve-v1beta1.json"
K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
ROOTS = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
SOURCE = "kserve 0.21.0 (PyPI wheel, Apache-2.0): kserve/models/*.py, openapi_types, attribute_map, required fields"
SCALARS = {"int": {"type": "integer"}, "str": {"type": "string"}, "bool": {"type": "boolean"}}
SCALARS |= {"float": {"type": "number"}, "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"}}
K8S_NAMES = {
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
    "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
}


def read_models(folder: Path) -> dict[str, dict]:
    """Class name -> {"types": {attr: type}, "names": {attr: json name}, "required": [attr]}."""
    models = {}
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            found = {}
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
                if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
                    found[target.id] = ast.literal_eval(stmt.value)
            if "openapi_types" in found:
                required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", text)
                names = found["attribute_map"]
                models[node.name] = {"types": found["openapi_types"], "names": names, "required": required}
    return models


def k8s_ref(name: str) -> dict:
    if name in K8S_NAMES:
        return {"$ref": K8S + K8S_NAMES[name]}
    if m := re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", name):
        return {"$ref": K8S + f"io.k8s.api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"}
    if m := re.fullmatch(r"V1([A-Z]\w*)", name):
        return {"$ref": K8S + f"io.k8s.api.core.v1.{m.group(1)}"}
    raise ValueError(f"no Kubernetes definition for {name}")


def schema_of(kind: str, models: dict, defs: dict) -> dict:
    if kind in SCALARS:
        return SCALARS[kind]
    if m := re.fullmatch(r"list\[(.+)\]", kind):
        return {"type": "array", "items": schema_of(m.group(1), models, defs)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", kind):
        return {"type": "object", "additionalProperties": schema_of(m.group(1), models, defs)}
    if re.match(r"V1(alpha|beta)1", kind) and kind in models:
        if kind not in defs:
            defs[kind] = {}  # placeholder: recursive types
            model = models[kind]
            properties = {
                model["names"][attr]: schema_of(t, models, defs)
                for attr, t in model["types"].items()
                if not (attr == "status" and kind in ROOTS.values())  # what the controller writes, not the user
            }
            defs[kind] = {
                "type": "object",
                "properties": properties,
                "required": sorted(model["names"][a] for a in model["required"]),
                "additionalProperties": False,
            }
        return {"$ref": f"#/$defs/{kind}"}
    if re.match(r"V1(alpha|beta)1", kind):  # a KServe type with no model of its own (a number or a string)
        UNTYPED.add(kind)
        return {}
    return k8s_ref(kind)


UNTYPED: set[str] = set()


def main(folder: str) -> None:
    models = read_models(Path(folder))
    defs: dict = {}
    roots = {kind: schema_of(name, models, defs) for kind, name in ROOTS.items()}
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://nccr-guard.invalid/deploy/kserve/kserve-v1beta1.json",
        "$comment": f"Generated by deploy/kserve/make_schema.py from {SOURCE}; do not edit. "
        f"Unchecked (no model in the SDK): {', '.join(sorted(UNTYPED)) or 'none'}.",
        "oneOf": [
            {"allOf": [ref, {"properties": {"kind": {"const": kind}}, "required": ["apiVersion", "kind"]}]}
            for kind, ref in roots.items()
        ],
        "$defs": dict(sorted(defs.items())),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(schema, indent=1) + "\n")
    print(f"{OUT}: {len(defs)} KServe definitions")


if __name__ == "__main__":
    main(sys.argv[1])
