"""Type checks: unknown fields name themselves and close matches; mismatches name the field."""

import pytest

from c8.expr import ExprError, ExprFieldError, ExprTypeError, check, parse


@pytest.mark.parametrize("text, category", [
    ('filename like "*foo*" and (ret >= 0 or uid == 0)', "file"),
    ('kind == "EXEC" and exec_filename like "/usr/*"', "process"),
    ('kind in ("CONNECT_ATTEMPT", "BIND_ATTEMPT") and port == 443', "network"),
    ('kind like "*_RESULT" and ret < 0', "network"),
    ("kind == 2", "process"),
    ('type == "file" and container_name is not null', "file"),
    ('image_name like "busy*" or container_id in ("abc", "def")', "syscall"),
    ("container is null and id == 59", "syscall"),
    ('runtime == "docker"', "container"),
])
def test_valid_expressions_pass(text, category):
    check(parse(text), category)


def test_unknown_field_names_it_and_suggests():
    with pytest.raises(ExprFieldError) as info:
        check(parse('ret == 0 and filname like "x"'), "file")
    err = info.value
    assert err.field == "filname" and "filename" in err.suggestions
    assert "'filname'" in str(err) and "did you mean filename" in str(err)
    assert str(err).startswith("at column 14:")
    assert isinstance(err, ExprError)


def test_field_of_another_category_is_unknown():
    with pytest.raises(ExprFieldError, match="unknown field 'exec_filename' for file events"):
        check(parse('exec_filename == "x"'), "file")


@pytest.mark.parametrize("text, field", [
    ('uid == "0"', "uid"), ("filename == 3", "filename"), ('ret in (1, "2")', "ret"),
    ('uid like "1*"', "uid"), ("ret is null", "ret"), ('kind == "EXECVE"', "kind"),
    ('kind < "EXEC"', "kind"), ('kind like "Z*"', "kind"), ("kind is null", "kind"),
])
def test_type_mismatch_names_the_field(text, field):
    with pytest.raises(ExprTypeError) as info:
        check(parse(text), "process" if "kind" in text else "file")
    assert info.value.field == field
    assert f"'{field}'" in str(info.value) or "kind" in str(info.value)


def test_extra_fields_extend_the_schema():
    node = parse('arg_dport == 443 and arg_comm like "ssh*"')
    with pytest.raises(ExprFieldError, match="arg_dport"):
        check(node, "kernel_call")
    check(node, "kernel_call", {"arg_dport": "u2", "arg_comm": "S16"})
    with pytest.raises(ExprTypeError, match="arg_dport"):
        check(parse('arg_dport == "x"'), "kernel_call", {"arg_dport": "u2"})


def test_client_only_fields_are_refused():
    with pytest.raises(ExprFieldError, match="sensor_id"):
        check(parse('sensor_id == "x"'), "file")


def test_unknown_category():
    with pytest.raises(ExprFieldError, match="unknown event type"):
        check(parse("uid == 0"), "nope")
