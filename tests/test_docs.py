"""The docs follow the code: every policy field is described, the README stays a map, and its
links lead somewhere."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def schema_fields(node: dict, defs: dict, seen: set) -> set[str]:
    """The property names of a JSON Schema node, through its references and sub-schemas."""
    fields = set(node.get("properties", {}))
    if "$ref" in node and (name := node["$ref"].rsplit("/", 1)[-1]) not in seen:
        fields |= schema_fields(defs[name], defs, seen | {name})
    children = [*node.get("properties", {}).values(), *node.get("allOf", []), *node.get("anyOf", []),
                *node.get("oneOf", []), *([node["items"]] if isinstance(node.get("items"), dict) else [])]
    for child in children:
        fields |= schema_fields(child, defs, seen)
    return fields


def test_every_policy_field_is_in_docs_policy():
    schema = json.loads((ROOT / "schema" / "policy.schema.json").read_text())
    fields = schema_fields(schema, schema["$defs"], set())
    for name in schema["$defs"]:
        fields |= schema_fields(schema["$defs"][name], schema["$defs"], set())
    text = (ROOT / "docs" / "policy.md").read_text()
    missing = sorted(f for f in fields if f"`{f}`" not in text)
    assert len(fields) > 40 and not missing, f"docs/policy.md does not describe: {', '.join(missing)}"


def test_the_readme_is_a_short_map_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert targets and all((ROOT / t).exists() for t in targets if "://" not in t), targets
