import pytest

from marid import scopes


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("namespace:read build:write build:read", "build:read,write namespace:read"),
        ("  build:read,read   build:delete ", "build:read,delete"),
        ("", ""),
        ("   ", ""),
        ("app:read token:write webhook:delete", "webhook:delete token:write app:read"),
        ("key:delete,write,read cron:read", "key:read,write,delete cron:read"),
        ("runner:delete app:read build:read", "build:read app:read runner:delete"),
    ],
)
def test_canonical_form(text: str, canonical: str):
    assert scopes.canonical(text) == canonical


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("bogus:read", "unknown resource: bogus"),
        ("build:fly", "unknown permission: fly"),
        ("build", "invalid scope item: build"),
        ("build:", "invalid scope item: build:"),
        ("build:read,", "unknown permission: "),
    ],
)
def test_parse_errors(text: str, error: str):
    with pytest.raises(scopes.ScopeError) as caught:
        scopes.parse(text)
    assert str(caught.value) == error


def test_has_and_covers():
    scope = scopes.parse("build:read,write namespace:read")
    assert scope.has("build", "write")
    assert not scope.has("build", "delete")
    assert scope.covers(scopes.parse("build:read"))
    assert not scope.covers(scopes.parse("build:delete"))
    assert scopes.FULL.covers(scope)
    assert str(scopes.FULL).startswith("build:read,write,delete invite:read,write,delete")
