import pytest

# The settings the unit tests start from: inventory/example_archon.py, whose stack_secrets these are.
ARCHON_SECRETS = {"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_KEY": "k$y"}


@pytest.fixture(autouse=True)
def archon_secrets(monkeypatch):
    """stack_secrets are read from the control node's environment while validating: the example's are set."""
    for name, value in ARCHON_SECRETS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def archon_secret_values() -> dict[str, str]:
    """The same values, for a child process's environment."""
    return dict(ARCHON_SECRETS)
