"""docs/events.md is generated from the schema and kept up to date."""

from pathlib import Path

from c8 import schema
from c8.schema import docs

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def test_events_md_is_up_to_date():
    assert DOC.read_text() == docs.markdown(), "regenerate: c8ctl fields --markdown > docs/events.md"


def test_every_type_and_field_is_documented_with_a_source():
    text = docs.markdown()
    for category, payload in schema.PAYLOAD.items():
        assert f"## {category}" in text
        for kind in schema.KINDS[category]:
            assert f"`{kind}`" in text
        for f in payload:
            assert f"| `{f.name}` |" in text and f.source, (category, f.name)
